"""The toy train step's weight-gradient GEMMs in isolation, in several formulations.

    python bench/dw_gemm.py [--tokens 32768] [--reps 20]

For each linear of the toy config (d_model 768: Mamba-2 in_proj as z | xBC dt, out_proj, attention
qkv / o, MLP gate_up / down) and M = B * T tokens, bf16: the forward product x W^T, the data
gradient dy W, and the weight gradient dW (out, in) as
  dyT_x     dy^T x (what `alloy.layers.common.matmul_t`'s VJP runs; cuBLAS picks split-K for the
            shapes whose output has few tiles),
  xT_dy_T   (x^T dy)^T made contiguous (the transposed product, then a copy),
  splitS    the rows in S slices: a batched (S, out, M/S) x (S, M/S, in) product summed over S in float32,
with each one's microseconds per call (10 calls queued back to back, median over --reps) and TFLOP/s. The step
runs these GEMMs beside its chain of activation-gradient kernels; on an H100 they are cuBLAS
persistent kernels (one CTA per SM), so the time they take is time the chain waits.
"""
from __future__ import annotations

import argparse
import statistics
import time

import alloy  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

SHAPES = {  # (out, in)
    "mamba2 in_proj z": (1536, 768),
    "mamba2 in_proj xBC|dt": (1816, 768),
    "mamba2 out_proj": (768, 1536),
    "attention qkv": (1280, 768),
    "attention o": (768, 768),
    "mlp gate_up": (4096, 768),
    "mlp down": (768, 2048),
}
COUNT = {"mamba2 in_proj z": 9, "mamba2 in_proj xBC|dt": 9, "mamba2 out_proj": 9, "attention qkv": 3,
         "attention o": 3, "mlp gate_up": 12, "mlp down": 12}


def timeit(f, reps: int, calls: int = 10) -> float:
    """Median over `reps` of the mean time of `calls` calls queued back to back (each its own
    `mx.async_eval`, so the host's dispatch hides behind the GPU), in microseconds per call."""
    mx.eval(f())
    ts = []
    for _ in range(reps):
        mx.synchronize()
        t = time.perf_counter()
        outs = []
        for _ in range(calls):
            outs.append(f())
            mx.async_eval(outs[-1])
        mx.synchronize()
        ts.append((time.perf_counter() - t) / calls)
    return statistics.median(ts) * 1e6


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--reps", type=int, default=20)
    a = p.parse_args(argv)
    M = a.tokens
    key = mx.random.key(0)
    tot = {}
    print(f"M = {M} tokens, bf16; us per call (TFLOP/s)")
    print(f"{'linear':24s} {'fwd':>14s} {'dx':>14s} {'dW dyT_x':>14s} {'dW xT_dy_T':>14s} {'dW split2':>14s} {'dW split4':>14s}")
    for name, (o, i) in SHAPES.items():
        k1, k2, k3, key = mx.random.split(key, 4)
        x = (mx.random.normal((M, i), key=k1) * 0.5).astype(mx.bfloat16)
        w = (mx.random.normal((o, i), key=k2) * 0.02).astype(mx.bfloat16)
        dy = (mx.random.normal((M, o), key=k3) * 0.1).astype(mx.bfloat16)
        mx.eval(x, w, dy)
        fl = 2.0 * M * o * i

        def split(S):
            return lambda: (dy.reshape(S, M // S, o).swapaxes(1, 2) @ x.reshape(S, M // S, i)).astype(mx.float32).sum(0)
        fs = {"fwd": lambda: x @ w.T, "dx": lambda: dy @ w, "dyT_x": lambda: dy.T @ x,
              "xT_dy_T": lambda: mx.contiguous((x.T @ dy).T), "split2": split(2), "split4": split(4)}
        us = {n: timeit(f, a.reps) for n, f in fs.items()}
        ref = (dy.T.astype(mx.float32) @ x.astype(mx.float32))
        errs = {n: float(mx.abs(fs[n]().astype(mx.float32) - ref).max() / mx.abs(ref).max())
                for n in ("dyT_x", "xT_dy_T", "split2")}
        for n, v in us.items():
            tot[n] = tot.get(n, 0.0) + COUNT[name] * v
        print(f"{name:24s} " + " ".join(f"{us[n]:7.1f} ({fl / us[n] / 1e6:4.0f})" for n in fs)
              + "   rel err " + " ".join(f"{n} {e:.1e}" for n, e in errs.items()))
    print("per toy step (us): " + ", ".join(f"{n} {v:.0f}" for n, v in tot.items()))


if __name__ == "__main__":
    main()

"""The SSD diagonal-block gradient kernels alone (`alloy.metal.ssd_chunked.ssd_chunked_diag_bwd`) at
the toy training shape, for a few launch shapes of BWD_SCORES (heads per group, head-dim columns per
shared tile load) and of BWD_SCORES_TC (tensor cores; heads per group); on a GPU. With --tc instead:
the chunk products' kernels alone, OUT vs CHUNK_OUT_TC (the forward's diagonal output) and BWD_DX vs
BWD_DX_TC (its dX), CUDA-core FMAs vs tensor cores (switches OUT_TC / DX_TC), at each --tc-chunks.

    python bench/ssd_bwd_tune.py [--batch 16] [--T 2048] [--chunk 128]
    python bench/ssd_bwd_tune.py --tc [--tc-chunks 256,128]
"""
from __future__ import annotations

import argparse

import mlx.core as mx

from alloy.metal import ssd_chunked as kern
from bench_timing import timeit, timeit_ms


def _diag_inputs(ks, b, T, K, h, p):
    """x, dy (b, T, h, p) bf16, dt (b, T, h), acs (b, c, h, K) and CB (b, c, 1, K, K) float32 from the
    keys ks[0..3], evaluated."""
    c = T // K
    x = mx.random.normal((b, T, h, p), key=ks[0]).astype(mx.bfloat16)
    dy = mx.random.normal((b, T, h, p), key=ks[1]).astype(mx.bfloat16)
    dt = mx.random.uniform(0.001, 0.1, (b, T, h), key=ks[2])
    acs = mx.cumsum(-dt.reshape(b, c, K, h), axis=2).transpose(0, 1, 3, 2)
    CB = mx.random.normal((b, c, 1, K, K), key=ks[3])
    mx.eval(x, dy, dt, acs, CB)
    return x, dy, dt, acs, CB


def chunk_products(b, T, K, h=24, p=64):
    """Times OUT / CHUNK_OUT_TC and BWD_DX / BWD_DX_TC launched as `ssd_chunked` /
    `ssd_chunked_diag_bwd` launch them (1 group, bf16); prints a table row each: ms per call, useful
    TFLOP/s (the causal product: 2 P per (l, s <= l) pair per head and chunk), and the relative
    difference of the tensor-core result from the CUDA-core one."""
    c = T // K
    ks = mx.random.split(mx.random.key(1), 6)
    x, dy, dt, acs, CB = _diag_inputs(ks, b, T, K, h, p)
    Yo = mx.random.normal((b, c, 1, K, h * p), key=ks[4]).astype(mx.bfloat16)
    D = mx.random.normal((h,), key=ks[5])
    mx.eval(Yo, D)
    old = [("T", mx.bfloat16), ("KC", K), ("PC", p), ("CG", kern.groups(p, 64)), ("SB", 32)]
    new = [("T", mx.bfloat16), ("KC", K), ("PC", p)]
    launch = dict(grid=(kern.groups(K, 64), h, b * c), threadgroup=128)
    runs = {
        "OUT": lambda k, t: k([CB, acs, x, dt, Yo, D], template=t, output_shapes=[x.shape],
                              output_dtypes=[mx.bfloat16], **launch)[0],
        "BWD_DX": lambda k, t: k([CB, acs, dy], template=t, output_shapes=[(b, c * K, h, p)],
                                 output_dtypes=[mx.float32], **launch)[0],
    }
    pairs = {"OUT": (kern.OUT, kern.CHUNK_OUT_TC), "BWD_DX": (kern.BWD_DX, kern.BWD_DX_TC)}
    flops = 2.0 * b * c * h * (K * (K + 1) // 2) * p
    for name, run in runs.items():
        cuda_core, tc = pairs[name]
        ref = run(cuda_core, old)
        diff = (run(tc, new).astype(mx.float32) - ref.astype(mx.float32)).abs().max() / mx.maximum(
            ref.astype(mx.float32).abs().max(), 1.0)
        ms = [timeit(lambda: run(k, t), reps=10, warm=3, batch=10) * 1e3 for k, t in ((cuda_core, old), (tc, new))]
        print(f"| {name} | {K} | {ms[0]:.3f} | {ms[1]:.3f} | {ms[0] / ms[1]:.2f}x | "
              f"{flops / ms[0] * 1e-9:.1f} / {flops / ms[1] * 1e-9:.1f} | {diff.item():.2e} |", flush=True)
    # the launchers with the switches off / on: the whole forward (d_state 128) and diagonal gradient
    B, C = (mx.random.normal((b, T, 1, 128), key=k).astype(mx.bfloat16) for k in mx.random.split(ks[5], 2))
    A, h0 = -mx.ones((h,)), mx.zeros((b, h, p, 128))
    mx.eval(B, C, A, h0)
    whole = {"ssd_chunked forward (OUT_TC)": ("OUT_TC", lambda: kern.ssd_chunked(x, dt, A, B, C, D, h0, K)),
             "ssd_chunked_diag_bwd (DX_TC)": ("DX_TC", lambda: kern.ssd_chunked_diag_bwd(CB, acs, x, dt, dy))}
    for name, (switch, fn) in whole.items():
        saved = getattr(kern, switch)
        ms = []
        for on in (False, True):
            setattr(kern, switch, on)
            ms.append(timeit(fn, reps=10, warm=3, batch=5) * 1e3)
        setattr(kern, switch, saved)
        print(f"| {name} | {K} | {ms[0]:.3f} | {ms[1]:.3f} | {ms[0] / ms[1]:.2f}x | | |", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--tc", action="store_true", help="time the chunk products' kernels (CUDA cores vs tensor cores)")
    ap.add_argument("--tc-chunks", default="256,128", help="chunk sizes for --tc")
    a = ap.parse_args(argv)
    if a.tc:
        print(f"| kernel (b={a.batch}, T={a.T}, 24 heads of 64, bf16) | chunk | CUDA-core ms | tensor-core ms | "
              "speedup | TFLOP/s CUDA-core / TC | rel diff |\n|---|---|---|---|---|---|---|")
        for K in (int(v) for v in a.tc_chunks.split(",")):
            chunk_products(a.batch, a.T, K)
        return
    b, T, K = a.batch, a.T, a.chunk
    x, dy, dt, acs, CB = _diag_inputs(mx.random.split(mx.random.key(0), 5), b, T, K, 24, 64)
    print(f"| BWD_SCORES heads per group, columns per load (b={b}, T={T}, K={K}) | diag gradient ms |\n|---|---|")
    for tc, rs, pb in [(False, 4, 32), (True, 4, 0), (True, 8, 0), (True, 2, 0), (False, 4, 64), (False, 2, 32),
                       (False, 8, 32), (False, 8, 64), (False, 24, 32)]:
        kern.SCORES_TC, kern._SCORE_HEADS, kern._SCORE_PB = tc, rs, pb or 32
        f = mx.compile(lambda *v: kern.ssd_chunked_diag_bwd(*v))
        name = f"BWD_SCORES_TC, {rs}" if tc else f"{rs}, {pb}"
        print(f"| {name} | {timeit_ms(lambda: f(CB, acs, x, dt, dy), reps=10, warm=3):.3f} |", flush=True)


if __name__ == "__main__":
    main()

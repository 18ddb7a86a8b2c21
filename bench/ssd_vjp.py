"""The Mamba-2 SSD gradient on the kernel path at the toy training shape: which chunk length of the
differentiated MLX chunked form is fastest (forward kernels + backward through `ssd_chunked`).

    python bench/ssd_vjp.py [--batch 16] [--T 2048] [--chunks 32,64,128,256]

Shape: the toy config's Mamba-2 mixer (24 heads x 64, d_state 128, 1 group), bf16 inputs. Prints the
median ms of forward + backward per chunk length: on a GPU the kernel forward with its gradient by
MLX autodiff of `ssd_chunked`, by the written-out `ssd_chunked_vjp`, and by the latter with its
diagonal blocks in GPU kernels (`alloy.ops.ssd.GRADIENT`: autodiff / explicit / kernels);
everywhere the MLX chunked form with autodiff and with `ssd_chunked_vjp` (the CPU path's choice,
`alloy.ops.ssd.CPU_GRADIENT`). `--heads/--head-dim/--d-state` change the shape.
"""
from __future__ import annotations

import argparse
import importlib
import json

import mlx.core as mx

from alloy import metal
from bench_timing import timeit_ms

ssd_mod = importlib.import_module("alloy.ops.ssd")  # the package re-exports a function named ssd


def timeit(fn):
    return timeit_ms(fn, reps=5, warm=2)



def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--chunks", default="32,64,128,256")
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--d-state", type=int, default=128)
    a = ap.parse_args(argv)
    b, T, h, p, n = a.batch, a.T, a.heads, a.head_dim, a.d_state
    ks = mx.random.split(mx.random.key(0), 6)
    x = mx.random.normal((b, T, h, p), key=ks[0]).astype(mx.bfloat16)
    dt = (mx.random.uniform(0.001, 0.1, (b, T, h), key=ks[1])).astype(mx.bfloat16)
    A = -mx.random.uniform(1.0, 16.0, (h,), key=ks[2])
    B = mx.random.normal((b, T, 1, n), key=ks[3]).astype(mx.bfloat16)
    C = mx.random.normal((b, T, 1, n), key=ks[4]).astype(mx.bfloat16)
    D = mx.ones((h,))
    ct = mx.random.normal((b, T, h, p), key=ks[5]).astype(mx.bfloat16)

    def loss(impl, chunk):
        return lambda x, dt, B, C: (ssd_mod.ssd(x, dt, A, B, C, D, chunk_size=chunk, impl=impl)[0] * ct).astype(mx.float32).sum()

    s0 = mx.zeros((b, h, p, n))
    def loss_explicit(chunk):
        f = ssd_mod._explicit_chunked(chunk)
        return lambda x, dt, B, C: (f(x, dt, A, B, C, D, s0)[0] * ct).astype(mx.float32).sum()

    rows = []
    for vc in [int(c) for c in a.chunks.split(",")]:
        ssd_mod._VJP_CHUNK = vc
        ssd_mod._fused_chunked.cache_clear()
        if metal.backend() is not None:
            was = ssd_mod.GRADIENT
            for grad_mode in ("autodiff", "explicit", "kernels"):
                ssd_mod.GRADIENT = grad_mode
                g = mx.compile(mx.grad(loss("kernel", 256), argnums=(0, 1, 2, 3)))
                rows.append({"row": f"kernel forward, gradient {grad_mode} (chunk {vc})",
                             "fwd+bwd ms": timeit(lambda: g(x, dt, B, C))})
                print(json.dumps(rows[-1]), flush=True)
            ssd_mod.GRADIENT = was
        g2 = mx.compile(mx.grad(loss("chunked", vc), argnums=(0, 1, 2, 3)))
        rows.append({"row": f"MLX ssd_chunked(chunk {vc}) forward + autodiff backward", "fwd+bwd ms": timeit(lambda: g2(x, dt, B, C))})
        print(json.dumps(rows[-1]), flush=True)
        g3 = mx.compile(mx.grad(loss_explicit(vc), argnums=(0, 1, 2, 3)))
        rows.append({"row": f"MLX ssd_chunked(chunk {vc}) forward + ssd_chunked_vjp", "fwd+bwd ms": timeit(lambda: g3(x, dt, B, C))})
        print(json.dumps(rows[-1]), flush=True)
    ssd_mod._VJP_CHUNK = None
    ssd_mod._fused_chunked.cache_clear()
    if metal.backend() is not None:
        f = mx.compile(lambda x, dt, B, C: ssd_mod.ssd(x, dt, A, B, C, D, chunk_size=256, impl="kernel")[0])
        rows.append({"row": "kernel forward alone", "fwd+bwd ms": timeit(lambda: f(x, dt, B, C))})
    print(f"\n| row (b={b}, T={T}, {h} heads x {p}, N {n}, bf16) | ms |\n|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['fwd+bwd ms']:.2f} |")


if __name__ == "__main__":
    main()

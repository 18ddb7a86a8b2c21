"""The SSD's chunk products CB = C Bᵀ (b, c, g, K, K) float32 at the toy Mamba-2 layer's shape on a GPU:
the float32 batched matmul of `alloy.metal.ssd_chunked.ssd_chunked` with `CB_TC` off (chunked,
transposed B / C cast to float32: two cast copies and a TF32 GEMM on MLX-CUDA) against
`alloy.metal.ssd_cb.chunk_cb` (switch `CB_TC` on: one kernel reading the 16-bit B / C in place).

    python bench/ssd_cb_tune.py [--batch 16] [--T 2048] [--chunk 128] [--d-state 128] [--groups 1]

Columns: us per call (median over `--reps` batches of `--calls` independent calls, each batch between
mx.synchronize calls, divided by the calls), the bandwidth against the bytes a call must move (B and
C read once, CB written), and max|d|: the largest difference from the matmul's CB on the tiles at or
below the diagonal (those the consumers read), relative to its largest entry.
"""
from __future__ import annotations

import argparse

import alloy  # noqa: F401  (before mlx.core)
import mlx.core as mx
import numpy as np

from alloy.metal import ssd_cb
from alloy.ops.ssd import _chunks
from bench_timing import timeit

_F32 = mx.float32


def old_cb(B, C, K):
    """`ssd_chunked`'s CB with the switch off: chunks of B / C (zero-padded), (b, c, g, K, n), cast, matmul."""
    Bc, Cc = (_chunks(v, K, v.dtype).transpose(0, 1, 3, 2, 4) for v in (B, C))
    return Cc.astype(_F32) @ Bc.astype(_F32).swapaxes(-1, -2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--d-state", type=int, default=128)
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    ap.add_argument("--calls", type=int, default=20, help="independent calls per timed batch")
    ap.add_argument("--reps", type=int, default=50, help="timed batches (the median is reported)")
    a = ap.parse_args(argv)
    dtype = {"bf16": mx.bfloat16, "fp16": mx.float16}[a.dtype]
    b, T, K, N, G = a.batch, a.T, a.chunk, a.d_state, a.groups
    if not ssd_cb.cb_tc_fits(dtype, K, N):
        raise SystemExit(f"chunk_cb does not take chunk {K}, d_state {N}")
    kb, kc = mx.random.split(mx.random.key(0), 2)
    B = (0.5 * mx.random.normal((b, T, G, N), key=kb)).astype(dtype)
    C = (0.5 * mx.random.normal((b, T, G, N), key=kc)).astype(dtype)
    mx.eval(B, C)
    nc = -(-T // K)
    nbytes = 2 * B.nbytes + b * nc * G * K * K * 4
    ref = np.array(old_cb(B, C, K))
    t = np.arange(K) // 16
    lower = t[None, :] <= t[:, None]
    scale = float(np.abs(ref).max())
    print(f"b {b}  T {T}  chunk {K}  d_state {N}  groups {G}  {a.dtype}  ({nbytes / 1e6:.1f} MB per call)")
    print(f"{'':<28}{'us':>9}{'GB/s':>9}{'max|d|':>11}")
    for name, fn in (("old: cast + f32 matmul", lambda: old_cb(B, C, K)),
                     ("chunk_cb (CB_TC)", lambda: ssd_cb.chunk_cb(B, C, K))):
        got = np.array(fn())
        d = float(np.abs(got - ref)[..., lower].max()) / scale
        s = timeit(fn, reps=a.reps, warm=3, batch=a.calls)
        print(f"{name:<28}{s * 1e6:9.1f}{nbytes / s / 1e9:9.0f}{d:11.2e}")


if __name__ == "__main__":
    main()

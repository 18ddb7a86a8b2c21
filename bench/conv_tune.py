"""The split causal conv1d kernels (`alloy.metal.conv1d.KERNEL_SPLIT` / `BWD_SPLIT`) at the toy
Mamba-2 layer's shape on a GPU, forward and gradient, over launch settings: tile length, steps of loads in
flight (AHEAD) and threads per group.

    python bench/conv_tune.py [--batch 16] [--T 2048] [--configs 64,4,128 32,4,128 64,2,128 ...]

Each config is TILE,AHEAD,GROUP. Prints ms per call (median over batches of 10 independent calls)
and the achieved bandwidth against the bytes each call must move (x, dy, y / dx read or written
once, the dweight / dbias shares ignored), one row per config.
"""
from __future__ import annotations

import argparse

import alloy  # noqa: F401  (before mlx.core)
import mlx.core as mx

from alloy.metal import conv1d as kern
from bench_timing import timeit


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--widths", default="1536,128,128")
    ap.add_argument("--configs", nargs="+", default=["64,4,128", "32,4,128", "128,4,128", "64,2,128",
                                                      "64,1,128", "64,4,64", "64,4,256", "32,2,64"])
    a = ap.parse_args(argv)
    widths = tuple(int(w) for w in a.widths.split(","))
    C, K = sum(widths), 4
    ks = mx.random.split(mx.random.key(0), 5)
    x = mx.random.normal((a.batch, a.T, C), key=ks[0]).astype(mx.bfloat16)
    w = (mx.random.normal((C, K), key=ks[1]) * 0.3).astype(mx.bfloat16)
    b = mx.zeros((C,), mx.bfloat16)
    s = mx.zeros((a.batch, K - 1, C), mx.bfloat16)
    dys = [mx.random.normal((a.batch, a.T, n), key=ks[2]).astype(mx.bfloat16) for n in widths]
    dns = mx.zeros_like(s)
    mx.eval(x, w, b, s, dys, dns)
    nbytes = x.nbytes
    print(f"| TILE, AHEAD, GROUP | forward ms | TB/s | gradient ms | TB/s |\n|---|---|---|---|---|")
    for cfg in a.configs:
        kern.TILE, kern.AHEAD, kern.GROUP = (int(v) for v in cfg.split(","))
        kern.TILE_MIN = min(kern.TILE_MIN, kern.TILE)
        fwd = timeit(lambda: kern.causal_conv1d_split(x, w, b, s, True, widths)[:3], batch=10)
        bwd = timeit(lambda: kern.causal_conv1d_split_vjp(x, w, b, s, *dys, dns, True, widths), batch=10)
        print(f"| {cfg} | {fwd * 1e3:.3f} | {2 * nbytes / fwd / 1e12:.2f} | {bwd * 1e3:.3f} | "
              f"{3 * nbytes / bwd / 1e12:.2f} |")


if __name__ == "__main__":
    main()

"""Sequential vs chunked scans on the CPU: which form `impl="auto"` should take there.

    python bench/cpu_scans.py

For Mamba-1's selective scan, Mamba-2's SSD and the gated delta rule, times the sequential
reference and the chunked form (eager forward, and forward + backward of sum(y)) at a few shapes,
float32, after one warm-up call. Prints a table.
"""
from __future__ import annotations

import alloy  # noqa: F401  (OpenBLAS before mlx.core on Linux)

import time

import mlx.core as mx

from alloy.ops.gated_delta import gated_delta
from alloy.ops.selective_scan import selective_scan
from alloy.ops.ssd import ssd


def timed(f):
    mx.eval(f())
    t = time.perf_counter()
    mx.eval(f())
    return (time.perf_counter() - t) * 1e3


def rows():
    r = mx.random
    for (b, T, d, n) in [(1, 512, 512, 16), (2, 64, 256, 16), (1, 2048, 256, 16)]:
        x, dt = r.normal((b, T, d)), r.uniform(0.01, 0.1, (b, T, d))
        A, B, C, D = -r.uniform(0.5, 2, (d, n)), r.normal((b, T, n)), r.normal((b, T, n)), mx.ones((d,))
        yield ("selective_scan", f"b={b} T={T} d={d} n={n}",
               lambda impl, x, dt=dt, A=A, B=B, C=C, D=D: selective_scan(x, dt, A, B, C, D, impl=impl), x)
    for (b, T, h, p, n) in [(1, 512, 8, 32, 32), (2, 128, 8, 16, 16)]:
        x, dt = r.normal((b, T, h, p)), r.uniform(0.01, 0.1, (b, T, h))
        A, B, C, D = -r.uniform(0.5, 2, (h,)), r.normal((b, T, 1, n)), r.normal((b, T, 1, n)), mx.ones((h,))
        yield ("ssd", f"b={b} T={T} h={h} p={p} n={n}",
               lambda impl, x, dt=dt, A=A, B=B, C=C, D=D: ssd(x, dt, A, B, C, D, impl=impl), x)
    for (b, T, H, K) in [(1, 512, 4, 64), (2, 128, 4, 32)]:
        q, k, v = r.normal((b, T, H, K)), r.normal((b, T, H, K)), r.normal((b, T, H, K))
        g, be = -r.uniform(0.01, 0.5, (b, T, H)), r.uniform(0.1, 0.9, (b, T, H))
        yield ("gated_delta", f"b={b} T={T} H={H} K=V={K}",
               lambda impl, q, k=k, v=v, g=g, be=be: gated_delta(q, k, v, g, be, impl=impl), q)


def main():
    print(f"device {mx.default_device()}, MLX {mx.__version__}")
    print("| op | shape | ref fwd ms | chunked fwd ms | ref fwd+bwd ms | chunked fwd+bwd ms |")
    print("|---|---|---|---|---|---|")
    for op, shape, f, x in rows():
        fwd = {i: timed(lambda i=i: f(i, x)) for i in ("ref", "chunked")}
        bwd = {i: timed(lambda i=i: mx.grad(lambda xx: f(i, xx)[0].sum())(x)) for i in ("ref", "chunked")}
        print(f"| {op} | {shape} | {fwd['ref']:.1f} | {fwd['chunked']:.1f} | {bwd['ref']:.1f} | {bwd['chunked']:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()

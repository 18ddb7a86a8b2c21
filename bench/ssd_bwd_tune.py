"""The SSD diagonal-block gradient kernels alone (`alloy.metal.ssd_chunked.ssd_chunked_diag_bwd`) at
the toy training shape, for a few launch shapes of BWD_SCORES (heads per group, head-dim columns per
shared tile load) and of BWD_SCORES_TC (tensor cores; heads per group); on a GPU.

    python bench/ssd_bwd_tune.py [--batch 16] [--T 2048] [--chunk 128]
"""
from __future__ import annotations

import argparse

import mlx.core as mx

from alloy.metal import ssd_chunked as kern
from bench_timing import timeit_ms


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=128)
    a = ap.parse_args(argv)
    b, T, h, p, n, K = a.batch, a.T, 24, 64, 128, a.chunk
    c = T // K
    ks = mx.random.split(mx.random.key(0), 5)
    x = mx.random.normal((b, T, h, p), key=ks[0]).astype(mx.bfloat16)
    dy = mx.random.normal((b, T, h, p), key=ks[1]).astype(mx.bfloat16)
    dt = mx.random.uniform(0.001, 0.1, (b, T, h), key=ks[2])
    acs = mx.cumsum(-dt.reshape(b, c, K, h), axis=2).transpose(0, 1, 3, 2)
    CB = mx.random.normal((b, c, 1, K, K), key=ks[3])
    mx.eval(x, dy, dt, acs, CB)
    print(f"| BWD_SCORES heads per group, columns per load (b={b}, T={T}, K={K}) | diag gradient ms |\n|---|---|")
    for tc, rs, pb in [(False, 4, 32), (True, 4, 0), (True, 8, 0), (True, 2, 0), (False, 4, 64), (False, 2, 32),
                       (False, 8, 32), (False, 8, 64), (False, 24, 32)]:
        kern.SCORES_TC, kern._SCORE_HEADS, kern._SCORE_PB = tc, rs, pb or 32
        f = mx.compile(lambda *v: kern.ssd_chunked_diag_bwd(*v))
        name = f"BWD_SCORES_TC, {rs}" if tc else f"{rs}, {pb}"
        print(f"| {name} | {timeit_ms(lambda: f(CB, acs, x, dt, dy), reps=10, warm=3):.3f} |", flush=True)


if __name__ == "__main__":
    main()

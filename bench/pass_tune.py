"""The SSD state-passing kernel (`alloy.metal.ssd_chunked.PASS`) at the toy Mamba-2 layer's shape on
a GPU: the forward sweep and the gradient's reverse sweep with the dot (`state_pass(...,
reverse=True, dot_with=Hs)`), one row per chunks-per-block `PASS_CBLK` (a block's loads issued
together, then its stores and sweep).

    python bench/pass_tune.py [--batch 16] [--T 2048] [--cblk 2 4 8]

Columns: us per launch of the kernel
alone (init given already in the kernel's (b, h, n, p) layout; median over `--reps` batches of
`--calls` independent launches, each batch between mx.synchronize calls, divided by the calls) and
the bandwidth against the bytes the launch must move (forward: chunk states read + entering states
written + init / final state; reverse with dot: dH and Hs read + dS written + the per-slice dots);
"launcher us": the whole `state_pass` (with its init transpose copy and, reversed, the dots' sums);
`max|d|`: the largest difference of the row's kernel outputs from the first row's (0: same bits).
"""
from __future__ import annotations

import argparse

import alloy  # noqa: F401  (before mlx.core)
import mlx.core as mx

from alloy.metal import ssd_chunked as kern
from alloy.metal.prelude import groups
from bench_timing import timeit

DEFAULT_CBLK = [2, 4, 8]


def _kernel(states, decay, init_t, dtype, reverse, dot_with):
    """PASS launched as `state_pass` launches it, init already (b, h, n, p): the kernel alone."""
    b, nc, G, N, RP = states.shape
    H, P = decay.shape[-1], init_t.shape[-1]
    per = G * N * RP
    dot = dot_with is not None
    return kern.PASS(
        [states, decay, init_t, dot_with if dot else mx.zeros((1,), dtype)],
        template=[("T", dtype), ("CBLK", kern.PASS_CBLK), ("REV", reverse), ("DOT", dot), ("VW", 8)],
        grid=(groups(b * per // 8, kern.GROUP), 1, 1),
        threadgroup=kern.GROUP,
        output_shapes=[states.shape, (b, H, N, P), (b, nc, per // 32) if dot else (1,)],
        output_dtypes=[dtype, mx.float32, mx.float32],
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--d-state", type=int, default=128)
    ap.add_argument("--calls", type=int, default=20, help="independent launches per timed batch")
    ap.add_argument("--reps", type=int, default=50, help="timed batches (the median is reported)")
    ap.add_argument("--cblk", nargs="+", type=int, default=DEFAULT_CBLK)
    a = ap.parse_args(argv)
    b, nc, H, P, N, dtype = a.batch, a.T // a.chunk, a.heads, a.head_dim, a.d_state, mx.bfloat16
    ks = mx.random.split(mx.random.key(0), 5)
    shape = (b, nc, 1, N, H * P)                                   # one group
    states = mx.random.normal(shape, key=ks[0]).astype(dtype)
    hs = mx.random.normal(shape, key=ks[1]).astype(dtype)
    decay = mx.random.uniform(0.2, 1.0, (b, nc, H), key=ks[2])
    init = mx.random.normal((b, H, P, N), key=ks[3])
    init_t = mx.contiguous(init.swapaxes(-1, -2))
    mx.eval(states, hs, decay, init, init_t)
    fwd_bytes = 2 * states.nbytes + 2 * init.nbytes
    rev_bytes = 3 * states.nbytes + 2 * init.nbytes + b * nc * states[0, 0].size // 32 * 4
    default = kern.PASS_CBLK
    print(f"b {b}, {nc} chunks of {a.chunk}, {H} heads x {P}, d_state {N}, bf16: chunk states "
          f"{states.nbytes / 1e6:.0f} MB; {a.reps} x {a.calls} launches per timing")
    print("| CBLK | forward us | TB/s | launcher us | reverse+dot us | TB/s | launcher us | max|d| |\n"
          "|---|---|---|---|---|---|---|---|")
    first = None
    for cblk in a.cblk:
        kern.PASS_CBLK = cblk
        fwd = lambda: _kernel(states, decay, init_t, dtype, False, None)[:2]  # noqa: E731
        rev = lambda: _kernel(states, decay, init_t, dtype, True, hs)  # noqa: E731
        fwd_l = lambda: kern.state_pass(states, decay, init, dtype)  # noqa: E731
        rev_l = lambda: kern.state_pass(states, decay, init, dtype, reverse=True, dot_with=hs)  # noqa: E731
        outs = [*fwd(), *rev()]
        mx.eval(outs)
        t_f, t_fl = timeit(fwd, reps=a.reps, batch=a.calls), timeit(fwd_l, reps=a.reps, batch=a.calls)
        t_r, t_rl = timeit(rev, reps=a.reps, batch=a.calls), timeit(rev_l, reps=a.reps, batch=a.calls)
        if first is None:
            first = outs
        d = max(mx.abs(o.astype(mx.float32) - f.astype(mx.float32)).max().item() for o, f in zip(outs, first))
        print(f"| {cblk} | {t_f * 1e6:.1f} | {fwd_bytes / t_f / 1e12:.2f} | {t_fl * 1e6:.1f} | {t_r * 1e6:.1f} | "
              f"{rev_bytes / t_r / 1e12:.2f} | {t_rl * 1e6:.1f} | {d:.3g} |", flush=True)
    kern.PASS_CBLK = default


if __name__ == "__main__":
    main()

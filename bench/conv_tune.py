"""The split causal conv1d kernels (`alloy.metal.conv1d`: the streaming KERNEL_SPLIT / BWD_SPLIT and
their "pipe" variants) at the toy Mamba-2 layer's shape on a GPU, forward and gradient timed
separately, one row per configuration of the module's switches.

    python bench/conv_tune.py [--batch 16] [--T 2048] [--set NAME=VALUE ...] [--configs CFG ...]

A configuration is `label` or `label:NAME=VALUE,NAME=VALUE` over module attributes of
`alloy.metal.conv1d` (FWD_VARIANT / BWD_VARIANT "stream" | "pipe", TILE, AHEAD, GROUP,
PIPE_AHEAD_FWD, PIPE_AHEAD_BWD, FWD_MIN_GROUPS, PREFETCH, BWD_PIPE_VW 8 | 4, BWD_PIPE4_MIN_GROUPS, ...);
each row starts from the module's defaults with the --set values applied, then its own. A label
naming a variant ("stream", "pipe") sets both switches to it. The pipe forward is rebuilt for its
launch bounds (GROUP, FWD_MIN_GROUPS), the VW 4 pipe gradient for (GROUP, BWD_PIPE4_MIN_GROUPS).

Columns: us per call (median over batches of `--calls` independent calls, each batch evaluated
between mx.synchronize calls, divided by the calls), and the bandwidth against the bytes each call
must move: forward x read + y written; gradient kernel x, dy read + dx written (its float32 dweight /
dbias shares, `shares MB`, not counted); "+sum" times the whole gradient launcher (the kernel and
`sum_rows` of the shares). `max|d|` is the largest difference of the row's outputs (y, dx, dweight,
dbias) from the first row's: 0 where the arithmetic is the same.
"""
from __future__ import annotations

import argparse
import dataclasses

import alloy  # noqa: F401  (before mlx.core)
import mlx.core as mx

from alloy.metal import conv1d as kern
from bench_timing import timeit

SETTABLE = ("FWD_VARIANT", "BWD_VARIANT", "TILE", "TILE_MIN", "MIN_ITEMS", "AHEAD", "GROUP", "PIPE_AHEAD_FWD",
            "PIPE_AHEAD_BWD", "FWD_MIN_GROUPS", "PREFETCH", "BWD_PIPE_VW", "BWD_PIPE4_MIN_GROUPS")
DEFAULT_CONFIGS = [
    "stream", "pipe",
    "pipe:PREFETCH=0", "pipe:PREFETCH=16", "pipe:PREFETCH=32",
    "pipe:PIPE_AHEAD_BWD=2", "pipe:PIPE_AHEAD_BWD=4",
    "pipe:BWD_PIPE_VW=4", "pipe:BWD_PIPE_VW=4,BWD_PIPE4_MIN_GROUPS=0", "pipe:BWD_PIPE_VW=4,PIPE_AHEAD_BWD=3",
    "pipe:FWD_MIN_GROUPS=0", "pipe:PIPE_AHEAD_FWD=4,FWD_MIN_GROUPS=0", "pipe:PIPE_AHEAD_FWD=1",
    "pipe:TILE=128", "pipe:TILE=32", "pipe:GROUP=64,FWD_MIN_GROUPS=8", "pipe:GROUP=32,FWD_MIN_GROUPS=16",
    "stream:TILE=128", "stream:GROUP=32",
]


def _value(v: str):
    try:
        return int(v)
    except ValueError:
        return v


def _parse(items) -> dict:
    out = {}
    for item in items:
        name, _, v = item.partition("=")
        if name not in SETTABLE:
            raise SystemExit(f"conv_tune: {name!r} is not one of {SETTABLE}")
        out[name] = _value(v)
    return out


def _apply(defaults: dict, kernels: dict, settings: dict) -> None:
    """The module at its defaults, then `settings`; the pipe forward kernels and the VW 4 pipe
    gradient rebuilt for their launch bounds."""
    for name, v in {**defaults, **settings}.items():
        setattr(kern, name, v)
    kern.TILE_MIN = min(kern.TILE_MIN, kern.TILE)
    bounds = (kern.GROUP, kern.FWD_MIN_GROUPS) if kern.FWD_MIN_GROUPS else ()
    bounds4 = (kern.GROUP, kern.BWD_PIPE4_MIN_GROUPS) if kern.BWD_PIPE4_MIN_GROUPS else ()
    for name, k in kernels.items():
        b = bounds if name.startswith("KERNEL") else bounds4 if name.endswith("PIPE4") else None
        setattr(kern, name, k if b is None else dataclasses.replace(k, launch_bounds=b))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--widths", default="1536,128,128")
    ap.add_argument("--calls", type=int, default=20, help="independent calls per timed batch")
    ap.add_argument("--reps", type=int, default=30, help="timed batches (the median is reported)")
    ap.add_argument("--set", nargs="*", default=[], help="NAME=VALUE for every row")
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
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
    defaults = {n: getattr(kern, n) for n in SETTABLE}
    kernels = {n: getattr(kern, n) for n in ("KERNEL_SPLIT_PIPE", "BWD_SPLIT_PIPE", "BWD_SPLIT_PIPE4")}
    common = _parse(a.set)
    print(f"B {a.batch}, T {a.T}, widths {widths}, K {K}, bf16, SiLU; {a.reps} x {a.calls} calls per timing")
    print("| config | forward us | TB/s | gradient kernel us | TB/s | +sum us | shares MB | max|d| |\n"
          "|---|---|---|---|---|---|---|---|")
    first = None
    for cfg in a.configs:
        label, _, rest = cfg.partition(":")
        settings = dict(common)
        if label in kern.VARIANTS:
            settings.update(FWD_VARIANT=label, BWD_VARIANT=label)
        settings.update(_parse([r for r in rest.split(",") if r]))
        _apply(defaults, kernels, settings)
        fwd = lambda: kern.causal_conv1d_split(x, w, b, s, True, widths)[:3]  # noqa: E731
        bwd_kernels = (kern.BWD_SPLIT, kern.BWD_SPLIT_PIPE, kern.BWD_SPLIT_PIPE4)
        bwd = lambda: kern._bwd_launch(bwd_kernels, x, w, b, s, dys, dns, True, widths)  # noqa: E731
        vjp = lambda: kern.causal_conv1d_split_vjp(x, w, b, s, *dys, dns, True, widths)  # noqa: E731
        outs = [*fwd(), *vjp()[:3]]
        mx.eval(outs)
        shares = bwd()[2].nbytes / 1e6
        t_f = timeit(fwd, reps=a.reps, batch=a.calls)
        t_b = timeit(bwd, reps=a.reps, batch=a.calls)
        t_v = timeit(vjp, reps=a.reps, batch=a.calls)
        if first is None:
            first = outs
        d = max(mx.abs(o.astype(mx.float32) - f.astype(mx.float32)).max().item() for o, f in zip(outs, first))
        print(f"| {cfg} | {t_f * 1e6:.1f} | {2 * nbytes / t_f / 1e12:.2f} | {t_b * 1e6:.1f} | "
              f"{3 * nbytes / t_b / 1e12:.2f} | {t_v * 1e6:.1f} | {shares:.1f} | {d:.3g} |", flush=True)
    _apply(defaults, kernels, {})


if __name__ == "__main__":
    main()

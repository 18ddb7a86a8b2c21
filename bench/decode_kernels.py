"""Decode steps of the Mamba-2 1.3B shape for a kernel profiler (GPU time per kernel, not host time).

    ncu --metrics gpu__time_duration.sum --launch-skip 3000 --launch-count 600 \
        --print-summary per-kernel python bench/decode_kernels.py --steps 14

Runs --steps compiled decode steps (the same step `alloy.generate` uses) on random weights, each
evaluated before the next, so the profiler sees whole steps after the warm-up ones.
"""
from __future__ import annotations

import alloy  # noqa: F401

import argparse

import mlx.core as mx

from alloy.inference.generate import compiled_step
from alloy.inference.sampling import SamplingParams
from alloy.model import build

from decode_profile import cfg  # noqa: E402  (bench/ is the script's directory)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--layers", type=int, default=48)
    a = ap.parse_args(argv)
    m = build(cfg(a.layers, 2048))
    p = m.init(mx.random.key(0))
    mx.eval(p)
    step = compiled_step(m, SamplingParams())
    state = m.init_state(1, 4096)
    tok, key = mx.array([1]), mx.random.key(0)
    for _ in range(a.steps):
        tok, _, state, key, _ = step(p, tok, state, key, None)
        mx.eval(tok, state)
    print("done", tok.item())


if __name__ == "__main__":
    main()

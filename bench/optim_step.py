"""The optimizer part of a train step on the default device: where its time goes.

    python bench/optim_step.py [--config toy]

On the config's fp32 master parameters with random fp32 gradients (compiled, median ms):
  * global norm of the gradients (one reduction per leaf),
  * global-norm clipping + AdamW update over the tree (what `alloy.train.make_step` runs after
    value_and_grad),
  * the same AdamW update over one flat leaf holding every parameter (what a fused, single-buffer
    optimizer could reach: the bytes without the per-leaf launches).
"""
from __future__ import annotations

import argparse

import alloy  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

from alloy.model import build
from alloy.params import cast
from alloy.params.tree import leaves, tree_map
from alloy.train import adamw
from alloy.train.loop import load_train_config
from alloy.train.optim import clip_by_global_norm, global_norm
from bench_timing import timeit_ms


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="toy")
    a = ap.parse_args(argv)
    cfg, _ = load_train_config(a.config)
    params = cast(build(cfg).init(mx.random.key(0)), mx.float32, keep=None)
    grads = tree_map(lambda p: mx.random.normal(p.shape) * 1e-3, params)
    opt = adamw(weight_decay=0.1)
    state = opt.init(params)
    mx.eval(params, grads, state)
    n = sum(v.size for v in leaves(params))
    lr = mx.array(1e-3)

    def step(p, g, s):
        g, norm = clip_by_global_norm(g, 1.0)
        p, s = opt.update(g, s, p, lr)
        return p, s, norm

    flat_p = mx.concatenate([v.reshape(-1) for v in leaves(params)])
    flat_g = mx.concatenate([v.reshape(-1) for v in leaves(grads)])
    flat_s = opt.init({"w": flat_p})
    mx.eval(flat_p, flat_g, flat_s)
    gn = mx.compile(global_norm)
    st = mx.compile(step)
    rows = [(f"global norm ({len(leaves(params))} leaves, {n / 1e6:.1f}M values)", lambda: gn(grads)),
            ("clip + AdamW over the tree", lambda: st(params, grads, state)),
            ("clip + AdamW over one flat leaf", lambda: st({"w": flat_p}, {"w": flat_g}, flat_s))]
    print("| optimizer part | ms |\n|---|---|", flush=True)
    for name, fn in rows:
        print(f"| {name} | {timeit_ms(fn, reps=10, warm=3):.2f} |", flush=True)


if __name__ == "__main__":
    main()

"""Why a Mamba-2 layer costs more inside the model than its mixer alone: the one-layer toy model
(embedding, RMSNorm, Mamba-2 mixer, MLP, head, loss) differentiated with respect to different
parts of its parameter tree, on the default device.

    python bench/layer_ablation.py [--batch 16] [--T 2048] [--quick]

Rows (median ms of the compiled value_and_grad of the loss, bf16 compute): every parameter (as a
train step does, fp32 masters cast inside); the same with bf16 parameters (no cast); only the
parameters outside the mixer (the mixer's gradients are not asked for, but the backward still runs
through it for the embedding's); those plus the mixer's two projections; those plus each one of
the mixer's small parameters (conv weight / bias, dt_bias, A_log, D, norm weight) alone; and the
forward alone. The difference between rows is what one gradient costs. --quick: the forward, every
parameter, and the rows with the projections and with D.
"""
from __future__ import annotations

import argparse

import alloy  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

from alloy.config import ModelConfig
from alloy.model import build
from alloy.params import cast
from alloy.params.tree import partition
from alloy.train.loop import load_train_config
from alloy.train.step import make_lm_loss
from bench_timing import timeit_ms

SMALL = ("conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "mixer.norm.weight")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--config", default="toy")
    ap.add_argument("--quick", action="store_true", help="four rows only (see the docstring)")
    a = ap.parse_args(argv)
    base = load_train_config(a.config)[0].to_dict()
    cfg = ModelConfig.from_dict(dict(base, name="one-mamba2", layer_types=["mamba2"], ffn_types=[base["ffn_types"][0]],
                                     mixers={"mamba2": base["mixers"]["mamba2"]}))
    model = build(cfg)
    p32 = cast(model.init(mx.random.key(0)), mx.float32, keep=None)
    mx.eval(p32)
    B, T = a.batch, a.T
    batch = {"tokens": mx.random.randint(0, cfg.vocab_size, (B, T + 1), key=mx.random.key(1)).astype(mx.int32)}
    key = mx.random.key(2)
    loss_fn = make_lm_loss(model, compute_dtype=mx.bfloat16)

    def vg_time(params, pred):
        train, frozen = partition(pred, params)
        vg = mx.compile(mx.value_and_grad(lambda t, f: loss_fn(t, f, batch, key)[0]))
        return timeit_ms(lambda: vg(train, frozen), reps=5, warm=2)

    def in_mixer(path):
        return ".mixer." in path

    fwd = mx.compile(lambda p: loss_fn(p, {}, batch, key)[0])
    proj = lambda path: in_mixer(path) and ("in_proj" in path or "out_proj" in path)  # noqa: E731
    rows = [
        ("forward only (loss)", lambda: timeit_ms(lambda: fwd(p32), reps=5, warm=2)),
        ("every parameter (fp32 masters, as a train step)", lambda: vg_time(p32, lambda path, v: True)),
    ]
    rows += [] if a.quick else [
        ("every parameter, bf16 parameters (no cast)", lambda: vg_time(cast(p32, mx.bfloat16), lambda path, v: True)),
        ("outside the mixer only", lambda: vg_time(p32, lambda path, v: not in_mixer(path))),
    ]
    def outside(also=lambda path: False):
        return lambda path, v: not in_mixer(path) or proj(path) or also(path)

    rows.append(("outside the mixer + in_proj / out_proj", lambda: vg_time(p32, outside())))
    for name in (("D",) if a.quick else SMALL):
        rows.append((f"outside + projections + {name}",
                     lambda name=name: vg_time(p32, outside(lambda path: path.endswith(name)))))
    print(f"| gradients asked for (one Mamba-2 layer + MLP, B={B}, T={T}) | ms |\n|---|---|", flush=True)
    for name, run in rows:
        print(f"| {name} | {run():.2f} |", flush=True)


if __name__ == "__main__":
    main()

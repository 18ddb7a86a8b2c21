"""Where a train step of the toy config goes, on the default device (a breakdown for the MFU target).

    python bench/train_profile.py [--batch-size 16] [--seq-len 2048] [--out DIR]

Times (median ms, compiled, bf16 compute, fp32 master weights), at one batch shape:
  * the whole train step (value_and_grad + clipping + AdamW), the loss forward alone and
    value_and_grad alone (the update is the difference),
  * one-layer models of each kind in the config (mixer + its MLP, with embedding and head), forward
    and forward + backward, and the same with the SSD / scan kernels switched off
    (ALLOY_NO_KERNELS-style: `alloy.metal.backend` forced to None) to see what the kernel paths buy
  (every one-layer row includes the embedding, final norm, head and loss).
Prints JSON lines and a table last; writes train_profile.json to --out.
"""
from __future__ import annotations

import argparse
import json
import os

import alloy  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

from alloy import metal
from alloy.config import ModelConfig
from alloy.model import build
from alloy.params import cast
from alloy.train import adamw, make_train_step, warmup_cosine
from alloy.train.loop import load_train_config
from alloy.train.step import make_lm_loss
from bench_timing import timeit_ms


def timeit(fn):
    return timeit_ms(fn, reps=5, warm=2)



def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="toy")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--no-layers", action="store_true", help="only the whole-model rows")
    a = ap.parse_args(argv)
    cfg, _ = load_train_config(a.config)
    B, T = a.batch_size, a.seq_len
    batch = {"tokens": mx.random.randint(0, cfg.vocab_size, (B, T + 1), key=mx.random.key(1)).astype(mx.int32)}
    key = mx.random.key(2)
    rows = []

    def rec(name, ms):
        rows.append((name, ms))
        print(json.dumps({"row": name, "ms": ms, "B": B, "T": T}), flush=True)

    def model_rows(c, tag, step_too=False):
        model = build(c)
        params = cast(model.init(mx.random.key(0)), mx.float32, keep=None)
        mx.eval(params)
        loss_fn = make_lm_loss(model, compute_dtype=mx.bfloat16)
        fwd = mx.compile(lambda p: loss_fn(p, {}, batch, key)[0])
        vg = mx.compile(mx.value_and_grad(lambda p: loss_fn(p, {}, batch, key)[0]))
        rec(f"{tag}: forward", timeit(lambda: fwd(params)))
        rec(f"{tag}: forward + backward", timeit(lambda: vg(params)))
        if step_too:
            opt = adamw(weight_decay=0.1)
            st = opt.init(params)
            step = make_train_step(model, opt, warmup_cosine(1e-3, 1000, 10), compute_dtype=mx.bfloat16)
            state = {"p": params, "o": st}

            def one():
                p, o, m = step(state["p"], state["o"], batch, key)
                state["p"], state["o"] = p, o
                return p, o, m
            rec(f"{tag}: whole train step", timeit(one))

    model_rows(cfg, f"{cfg.name} ({cfg.n_layers} layers)", step_too=True)
    if not a.no_layers:
        base = cfg.to_dict()
        kinds = sorted(set(base["layer_types"]))
        for kind in kinds:
            d = dict(base, name=f"one-{kind}", layer_types=[kind], ffn_types=[base["ffn_types"][0]],
                     mixers={kind: base["mixers"][kind]})
            one = ModelConfig.from_dict(d)
            model_rows(one, f"one {kind} layer + mlp")
            real = metal.backend
            metal.backend = lambda: None
            try:
                model_rows(one, f"one {kind} layer + mlp, no kernels")
            finally:
                metal.backend = real
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "train_profile.json"), "w") as f:
        json.dump([{"row": r, "ms": m, "B": B, "T": T} for r, m in rows], f, indent=1)
    print(f"\n| row (B={B}, T={T}) | ms |\n|---|---|")
    for r, m in rows:
        print(f"| {r} | {m:.2f} |")


if __name__ == "__main__":
    main()

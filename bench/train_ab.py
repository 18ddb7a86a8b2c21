"""A/B of module switches on the train step inside one process: two compiled steps, timed in
alternating pipelined blocks.

    python train_ab.py --config toy --batch-size 16 --seq-len 2048 --b-set alloy.layers.mamba2.DT_IN_CONV=False

Step A is built and traced under the switches of ``--set`` (default: the library's), step B under
those plus ``--b-set`` (each switch is read while a step is traced: MLX compiles each step once, so
setting B's switches around B's warm-up and restoring them before A's keeps both graphs as built).
Then ``--rounds`` times: ``--steps`` pipelined steps of A, the same of B (the order alternating from
round to round), both on the same parameters, batch and process. Separate processes (train_step.py
runs) differ by ~0.5-1 ms per toy step on an H100 from run to run; the same-process pairs are what
this compares. Prints each round's ms per step, the medians and B - A per round.
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402

import alloy  # noqa: E402
from alloy import build  # noqa: E402
from alloy.train import adamw, init_opt_state, make_train_step, warmup_cosine  # noqa: E402
from alloy.train.loop import load_train_config  # noqa: E402
from train_step import SMALL, pipelined, set_switch  # noqa: E402


def current(key: str):
    mod, _, name = key.rpartition(".")
    return getattr(importlib.import_module(mod), name)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="toy")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20, help="pipelined steps per block")
    p.add_argument("--rounds", type=int, default=4, help="A and B blocks each")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=VALUE", help="both steps")
    p.add_argument("--b-set", action="append", default=[], metavar="MODULE.NAME=VALUE", required=True,
                   help="step B only (repeatable)")
    p.add_argument("--small", action="store_true", help="tiny model, B 4 x T 64: a CPU smoke run")
    a = p.parse_args(argv)
    for item in a.set:
        set_switch(item)
    if a.small:
        cfg = alloy.ModelConfig.from_dict(SMALL)
        a.batch_size, a.seq_len = 4, 64
    else:
        cfg, _ = load_train_config(a.config)
    model = build(cfg)
    params = alloy.params.cast(model.init(mx.random.key(0)), mx.float32, keep=None)
    opt = adamw(weight_decay=0.1)
    opt_state = init_opt_state(opt, params, compute_dtype=mx.bfloat16)
    tokens = mx.random.randint(0, cfg.vocab_size, (a.batch_size, a.seq_len + 1), key=mx.random.key(1))
    batch, key = {"tokens": tokens.astype(mx.int32)}, mx.random.key(2)
    mx.eval(params, opt_state, batch)

    def make():
        return make_train_step(model, opt, warmup_cosine(1e-3, 1000, 10), compute_dtype=mx.bfloat16)

    keys = [item.partition("=")[0] for item in a.b_set]
    saved = {k: current(k) for k in keys}
    b_values = dict(set_switch(item) for item in a.b_set)
    state = [params, opt_state]
    del params, opt_state  # `state` holds the only references (see train_step.pipelined)
    steps, losses = {}, {}
    for name in ("B", "A"):  # B traced under its switches, then A's restored before A is traced
        step = make()
        t0 = time.perf_counter()
        for _ in range(a.warmup):
            state[0], state[1], m = step(*state, batch, key)
            mx.eval(state, m)
        steps[name], losses[name] = step, float(m["loss"])
        print(f"step {name} warm-up {time.perf_counter() - t0:.1f} s, loss {losses[name]:.4f}", flush=True)
        if name == "B":
            for k, v in saved.items():
                mod, _, attr = k.rpartition(".")
                setattr(importlib.import_module(mod), attr, v)
    print("B: " + ", ".join(f"{k} = {v!r}" for k, v in b_values.items()))
    ms = {"A": [], "B": []}
    for r in range(a.rounds):
        for name in (("A", "B") if r % 2 == 0 else ("B", "A")):
            _, t = pipelined(steps[name], state, batch, key, a.steps)
            ms[name].append(t * 1e3)
        print(f"round {r}: A {ms['A'][-1]:.2f}  B {ms['B'][-1]:.2f}  B - A {ms['B'][-1] - ms['A'][-1]:+.2f} ms",
              flush=True)
    d = [b - x for b, x in zip(ms["B"], ms["A"])]
    print(f"median ms per step: A {statistics.median(ms['A']):.2f}  B {statistics.median(ms['B']):.2f}  "
          f"B - A {statistics.median(d):+.2f} (per round {min(d):+.2f} .. {max(d):+.2f}); "
          f"peak memory {mx.get_peak_memory() / 1e9:.2f} GB (both steps' buffers)")
    return ms


if __name__ == "__main__":
    main()

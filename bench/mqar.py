"""MQAR: a hybrid (Mamba-2 + attention) vs a pure Mamba-2 stack at equal width and budget (any device).

    python bench/mqar.py --kv 8 --models hybrid --steps 4000 --batch-size 128 --seq-len 127 --vocab 64 \
        --lr 3e-3 --warmup 100          # one cell of the table in docs/training.md (H100: ~4 min)
    python bench/mqar.py --kv 4 16 --steps 300  # a quicker look (too short for recall to emerge)

For each number of key-value pairs, both models -- same d_model, same depth (2 layers, no FFN),
same optimizer, schedule, batches and number of steps -- train on fresh MQAR batches
(``alloy.train.tasks``) and are scored on held-out batches: answer accuracy (argmax at the value
positions after each query key) and loss on the answers. Everything is the library's own
compiled train step (``alloy.train.make_train_step``); only the model's layer_types differ.
"""
from __future__ import annotations

import argparse
import json
import time

import alloy  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

from alloy.model import build
from alloy.params import count_params
from alloy.train import adamw, make_eval_fn, make_train_step, warmup_cosine
from alloy.train.tasks import TaskData

MODELS = {
    "hybrid (mamba2 + attention)": ["mamba2", "attention"],
    "pure mamba2 (mamba2 x 2)": ["mamba2", "mamba2"],
}
SHORT = {"hybrid": "hybrid (mamba2 + attention)", "mamba2": "pure mamba2 (mamba2 x 2)"}


def model_config(layer_types, d_model, vocab, d_state, heads):
    mixers = {"mamba2": {"d_state": d_state, "head_dim": 16, "chunk_size": 32}}
    if "attention" in layer_types:
        mixers["attention"] = {"n_heads": heads}
    return {"name": "mqar-" + "-".join(layer_types), "vocab_size": vocab, "d_model": d_model,
            "layer_types": layer_types, "ffn_types": ["none"] * len(layer_types), "mixers": mixers,
            "tie_embeddings": False}


def run_one(layer_types, kv, a, log):
    model = build(model_config(layer_types, a.d_model, a.vocab, a.d_state, a.heads))
    params = model.init(mx.random.key(a.seed))
    opt = adamw(weight_decay=0.1)
    opt_state = opt.init(params)
    step = make_train_step(model, opt, warmup_cosine(a.lr, a.steps, a.warmup, a.lr * 0.1))
    eval_fn = make_eval_fn(model)
    data = TaskData("mqar", a.batch_size, a.seq_len, kv, a.vocab, seed=a.seed)
    val = [{k: mx.array(v) for k, v in b.items()} for b in data.val_batches(a.eval_batches)]
    pos, key = data.init_position(), mx.random.key(a.seed + 1)
    t0 = time.perf_counter()
    for i in range(a.steps):
        b, pos = data.next_batch(pos)
        key, sub = mx.random.split(key)
        params, opt_state, m = step(params, opt_state, {k: mx.array(v) for k, v in b.items()}, sub)
        mx.eval(params, opt_state, m)
        if (i + 1) % max(a.steps // 4, 1) == 0:
            log(f"    step {i + 1}: loss {float(m['loss']):.3f}, batch accuracy {float(m['accuracy']):.3f}")
    secs = time.perf_counter() - t0
    ls = n = c = 0.0
    for b in val:
        l_, n_, c_ = eval_fn(params, b)
        ls, n, c = ls + float(l_), n + float(n_), c + float(c_)
    return {"accuracy": c / n, "loss": ls / n, "seconds": secs, "params": count_params(params)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kv", type=int, nargs="+", default=[4, 16], help="key-value pairs per sequence")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=63, help="T (rows hold T + 1 tokens)")
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", nargs="+", choices=list(SHORT), default=list(SHORT),
                   help="which stacks to train (run them in separate processes to use more cores)")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    print(f"device {mx.default_device()}; d_model {a.d_model}, 2 layers, no FFN, vocab {a.vocab}, "
          f"T+1 = {a.seq_len + 1}, batch {a.batch_size}, {a.steps} steps, lr {a.lr:g} (AdamW, cosine)")
    results = []
    t_all = time.perf_counter()
    names = [SHORT[m] for m in a.models]
    for kv in a.kv:
        for name in names:
            lt = MODELS[name]
            print(f"  kv {kv}, {name}:", flush=True)
            r = run_one(lt, kv, a, lambda s: print(s, flush=True))
            r.update({"kv": kv, "model": name})
            results.append(r)
            print(f"    -> answer accuracy {r['accuracy']:.4f}, loss {r['loss']:.3f}, {r['seconds']:.0f} s", flush=True)
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s\n")
    print("| kv pairs | " + " | ".join(f"{n} accuracy" for n in names) + " |")
    print("|---:|" + "---:|" * len(names))
    for kv in a.kv:
        row = [next(r for r in results if r["kv"] == kv and r["model"] == n) for n in names]
        print(f"| {kv} | " + " | ".join(f"{100 * r['accuracy']:.1f}%" for r in row) + " |")
    print("params: " + ", ".join(f"{n}: {next(r['params'] for r in results if r['model'] == n):,}" for n in names))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()

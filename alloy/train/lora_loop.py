"""LoRA fine-tuning: ``alloy train --lora BASE`` trains low-rank adapters on a frozen base model.

    base (an Alloy / HF checkpoint or an ``alloy train`` run directory) -> params, frozen
    adapters = init_lora(key, params, lora_cfg)                       B = 0: starts equal to the base
    step(adapters, opt_state, batch, key, frozen=params)             make_step over the adapters only,
                                                                      loss on apply_lora(params, adapters)
    out/adapters/  (adapters.safetensors + adapter_config.json, atomic), metrics.jsonl

Validation loss / bits per byte before and after are measured on the merged model. Resuming a LoRA
run is not supported yet (train again from the base).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import mlx.core as mx

from alloy.params.lora import LoraConfig, init_lora, lora_param_count, merge_lora, apply_lora, save_adapters
from alloy.params.tree import cast, count_params
from alloy.train.loop import COMPUTE_DTYPES, TrainConfig, _evaluate, make_data, optimizer_and_schedule
from alloy.train.step import make_eval_fn, make_lm_loss, make_step


def load_base(path):
    """(model, params) of a base checkpoint or of an ``alloy train`` run directory's latest."""
    from alloy.checkpoint import load
    p = Path(path)
    if p.is_dir() and not (p / "config.json").is_file():
        from alloy.train.checkpoint import resolve_checkpoint
        p = resolve_checkpoint(p)
    return load(p)


def finetune_lora(base, lora_cfg: LoraConfig, tcfg: TrainConfig, out_dir, *, log: Callable = print) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, params = load_base(base)
    params = cast(params, mx.float32, keep=None)
    mx.eval(params)
    k_init, key = mx.random.split(mx.random.key(tcfg.seed))
    adapters = init_lora(k_init, params, lora_cfg)
    data = make_data(tcfg, model.config.vocab_size)
    pos = data.loader.init_position()
    opt, sched = optimizer_and_schedule(tcfg)
    opt_state = opt.init(adapters)
    compute = COMPUTE_DTYPES[tcfg.dtype]
    loss_fn = make_lm_loss(model, compute_dtype=compute,
                           combine_fn=lambda a, frozen, k: apply_lora(frozen, a, lora_cfg, k))
    step_fn = make_step(loss_fn, opt, sched, clip_norm=tcfg.clip or None, accum_steps=tcfg.accum_steps)
    eval_fn = make_eval_fn(model, compute_dtype=compute)
    log(f"LoRA on {base}: {model.config.name}, {count_params(params):,} frozen parameters, "
        f"{lora_param_count(params, lora_cfg):,} trainable (rank {lora_cfg.rank}, alpha {lora_cfg.alpha:g})")
    log(f"data: {data.describe}")
    before = _evaluate(eval_fn, params, data.val)
    metrics_path = out_dir / "metrics.jsonl"
    t0 = time.perf_counter()
    with open(metrics_path, "w") as mf:
        if before:
            mf.write(json.dumps({"step": 0, **before}) + "\n")
        for step in range(1, tcfg.steps + 1):
            batch_np, pos = data.loader.next_batch(pos)
            key, sub = mx.random.split(key)
            adapters, opt_state, metrics = step_fn(adapters, opt_state, {k: mx.array(v) for k, v in batch_np.items()},
                                                   sub, params)
            mx.eval(adapters, opt_state, metrics)
            if step % tcfg.log_every == 0 or step == tcfg.steps:
                mf.write(json.dumps({"step": step, **{k: round(float(v.item()), 6) for k, v in metrics.items()}}) + "\n")
    train_s = time.perf_counter() - t0
    after = _evaluate(eval_fn, merge_lora(params, adapters, lora_cfg), data.val)
    save_adapters(out_dir / "adapters", adapters, lora_cfg)
    log(f"adapters: {out_dir / 'adapters'} ({tcfg.steps} steps, {train_s:.1f} s)")
    summary = {"steps": tcfg.steps, "train_s": round(train_s, 2), "adapters": str(out_dir / "adapters")}
    if before and after:
        key_ = "val_bpb" if data.text else "val_loss"
        log(f"validation {key_.replace('val_', '')}: {before[key_]:.4f} (base) -> {after[key_]:.4f} (base + LoRA)")
        summary.update({"before": before, "after": after})
    return summary

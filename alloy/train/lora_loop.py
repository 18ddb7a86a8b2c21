"""LoRA fine-tuning: ``alloy train --lora BASE`` trains low-rank adapters on a frozen base model.

    base (an Alloy / HF checkpoint or an ``alloy train`` run directory) -> params, frozen
    adapters = init_lora(key, params, lora_cfg)                       B = 0: starts equal to the base
    step(adapters, opt_state, batch, key, frozen=params)             make_step over the adapters only,
                                                                      loss on apply_lora(params, adapters)
    out/adapters/  (adapters.safetensors + adapter_config.json, atomic), metrics.jsonl
    out/ckpt-<step>/  adapters/ + optimizer + trainer (step, key, data position, base path), every
                      ``save_every`` steps and at the end; ``alloy train --resume out`` continues

Validation loss / bits per byte before and after are measured on the merged model. A resumed run
continues exactly: N steps straight == N/2, stop, resume, N/2 (same adapters).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import mlx.core as mx

from alloy.params.lora import (LoraConfig, apply_lora, init_lora, load_adapters, lora_param_count, merge_lora,
                               save_adapters)
from alloy.params.tree import cast, count_params
from alloy.train.loop import COMPUTE_DTYPES, TrainConfig, _evaluate, make_data, optimizer_and_schedule, queue_step
from alloy.train.checkpoint import load_trainer_state, save_run_checkpoint
from alloy.train.step import make_eval_fn, make_lm_loss, make_step


def load_base(path):
    """(model, params) of a base checkpoint or of an ``alloy train`` run directory's latest."""
    from alloy.checkpoint import load
    p = Path(path)
    if p.is_dir() and not (p / "config.json").is_file():
        from alloy.train.checkpoint import resolve_checkpoint
        p = resolve_checkpoint(p)
    return load(p)


def finetune_lora(base, lora_cfg: LoraConfig | None, tcfg: TrainConfig, out_dir, *, resume=None,
                  stop_after: int | None = None, log: Callable = print) -> dict:
    """Train LoRA adapters on a frozen base. ``resume``: a LoRA run directory or one of its
    checkpoints — the base, LoRA config, adapters, optimizer state, RNG key and data position come
    from it (``base`` / ``lora_cfg`` may then be None; given ones must match the stored).
    ``stop_after``: stop (and checkpoint) after this many total steps, the schedule unchanged."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ck = None
    if resume is not None:
        ck = load_trainer_state(resume)
        meta = ck.get("lora")
        if not meta:
            raise ValueError(f"resume: {ck['path']} is not a LoRA run checkpoint (no 'lora' entry in its trainer file)")
        if base is not None and Path(base).resolve() != Path(meta["base"]).resolve():
            raise ValueError(f"resume: base {base} differs from the run's base {meta['base']}")
        base = meta["base"]
        adapters, stored_cfg = load_adapters(ck["path"] / "adapters")
        if lora_cfg is not None and lora_cfg != stored_cfg:
            raise ValueError(f"resume: LoRA config {lora_cfg.to_dict()} differs from the run's {stored_cfg.to_dict()}")
        lora_cfg = stored_cfg
    model, params = load_base(base)
    params = cast(params, mx.float32, keep=None)
    mx.eval(params)
    k_init, key = mx.random.split(mx.random.key(tcfg.seed))
    data = make_data(tcfg, model.config.vocab_size)
    opt, sched = optimizer_and_schedule(tcfg)
    if ck is None:
        adapters = init_lora(k_init, params, lora_cfg)
        opt_state = opt.init(adapters)
        pos, start = data.loader.init_position(), 0
    else:
        opt_state, key, pos, start = ck["opt_state"], ck["key"], ck["data_position"], ck["step"]
        log(f"resumed LoRA run from {ck['path']} at step {start}")
    compute = COMPUTE_DTYPES[tcfg.dtype]
    loss_fn = make_lm_loss(model, compute_dtype=compute,
                           combine_fn=lambda a, frozen, k: apply_lora(frozen, a, lora_cfg, k))
    step_fn = make_step(loss_fn, opt, sched, clip_norm=tcfg.clip or None, accum_steps=tcfg.accum_steps)
    eval_fn = make_eval_fn(model, compute_dtype=compute)
    log(f"LoRA on {base}: {model.config.name}, {count_params(params):,} frozen parameters, "
        f"{lora_param_count(params, lora_cfg):,} trainable (rank {lora_cfg.rank}, alpha {lora_cfg.alpha:g})")
    log(f"data: {data.describe}")
    before = _evaluate(eval_fn, params, data.val)

    def save(step):
        save_run_checkpoint(out_dir, keep=tcfg.keep_checkpoints, opt_state=opt_state, step=step, key=key,
                            data_position=pos, train_config=tcfg.to_dict(),
                            write_params=lambda d: save_adapters(d / "adapters", adapters, lora_cfg),
                            extra={"lora": {"base": str(base)}})

    metrics_path = out_dir / "metrics.jsonl"
    t0 = time.perf_counter()
    with open(metrics_path, "a" if ck is not None else "w") as mf:
        if before and ck is None:
            mf.write(json.dumps({"step": 0, **before}) + "\n")
        end = tcfg.steps if stop_after is None else min(stop_after, tcfg.steps)
        in_flight = None
        for step in range(start + 1, end + 1):
            batch_np, pos = data.loader.next_batch(pos)
            key, sub = mx.random.split(key)
            adapters, opt_state, metrics = step_fn(adapters, opt_state, {k: mx.array(v) for k, v in batch_np.items()},
                                                   sub, params)
            in_flight = queue_step((adapters, opt_state, metrics), metrics["loss"], in_flight)
            if step % tcfg.log_every == 0 or step == tcfg.steps:
                mf.write(json.dumps({"step": step, **{k: round(float(v.item()), 6) for k, v in metrics.items()}}) + "\n")
            if tcfg.save_every and step % tcfg.save_every == 0 and step != end:
                save(step)
    mx.eval(adapters, opt_state)  # the last queued step
    train_s = time.perf_counter() - t0
    save(max(end, start))
    after = _evaluate(eval_fn, merge_lora(params, adapters, lora_cfg), data.val)
    save_adapters(out_dir / "adapters", adapters, lora_cfg)
    log(f"adapters: {out_dir / 'adapters'} ({max(end - start, 0)} steps, {train_s:.1f} s)")
    summary = {"steps": end, "start_step": start, "train_s": round(train_s, 2), "adapters": str(out_dir / "adapters")}
    if before and after:
        key_ = "val_bpb" if data.text else "val_loss"
        log(f"validation {key_.replace('val_', '')}: {before[key_]:.4f} (base) -> {after[key_]:.4f} (base + LoRA)")
        summary.update({"before": before, "after": after})
    return summary

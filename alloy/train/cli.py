"""``alloy train``: train a model from a training config (YAML/JSON or a bundled name).

    alloy train                                   # bundled tiny config on the stdlib corpus
    alloy train --config toy --data data.jsonl --max-steps 2000 --dtype bfloat16
    alloy train --resume runs/tiny                # continue a run from its latest checkpoint
    alloy train --lora runs/tiny --data chat.jsonl --lora-rank 8   # LoRA adapters on a frozen base
    alloy train --resume runs/tiny-lora --max-steps 400           # continue a LoRA run
"""
from __future__ import annotations

import dataclasses

__all__ = ["register", "run"]


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model (default: the tiny hybrid on the stdlib corpus)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny",
                   help="training config: a YAML/JSON file or a bundled name (tiny, toy, small, medium, mqar)")
    p.add_argument("--data", help="stdlib | mqar | copy | PATH.jsonl (or a directory of .jsonl files)")
    p.add_argument("--max-steps", type=int, help="total optimizer steps (train.steps)")
    p.add_argument("--resume", metavar="DIR", help="checkpoint or run directory to continue from")
    p.add_argument("--out", metavar="DIR", help="run directory (default: runs/<config name>)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="compute dtype")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--lora", metavar="BASE", help="train LoRA adapters on this frozen base checkpoint / run dir")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.set_defaults(fn=run)


_OVERRIDES = {"data": "data", "max_steps": "steps", "batch_size": "batch_size", "seq_len": "seq_len",
              "lr": "lr", "seed": "seed", "eval_every": "eval_every", "dtype": "dtype"}


def run(args) -> dict:
    from pathlib import Path

    from alloy.params.io import load_tree_msgpack
    from alloy.train.checkpoint import TRAINER_FILE, resolve_checkpoint
    from alloy.train.loop import TrainConfig, load_train_config, train

    model_cfg, tcfg = load_train_config(args.config)
    lora_resume = False
    if args.resume:
        # the stored run's train config is the base; flags given now still override it
        trainer = load_tree_msgpack(resolve_checkpoint(args.resume) / TRAINER_FILE)
        stored = trainer.get("train_config")
        if stored:
            tcfg = TrainConfig.from_dict(stored)
        lora_resume = bool(trainer.get("lora"))
        if args.lora and not lora_resume:
            raise ValueError(f"train: --lora with --resume needs a LoRA run to resume; {args.resume} is a full training run")
    changes = {field: getattr(args, a) for a, field in _OVERRIDES.items() if getattr(args, a, None) is not None}
    if changes:
        tcfg = dataclasses.replace(tcfg, **changes)
    name = Path(args.config).stem if Path(args.config).suffix else args.config
    if args.lora or lora_resume:
        from alloy.params.lora import LoraConfig
        from alloy.train.lora_loop import finetune_lora
        if lora_resume:  # base and LoRA config come from the run
            out = args.out or str(resolve_checkpoint(args.resume).parent)
            return finetune_lora(args.lora, None, tcfg, out, resume=args.resume)
        lcfg = LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout)
        return finetune_lora(args.lora, lcfg, tcfg, args.out or f"runs/{name}-lora")
    out = args.out or (str(resolve_checkpoint(args.resume).parent) if args.resume else f"runs/{name}")
    return train(model_cfg, tcfg, out, resume=args.resume, progress=not args.no_progress)

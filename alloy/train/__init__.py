"""Training as composed pure functions: optimizers, schedules, the compiled step, data, checkpoints.

    from alloy.train import adamw, warmup_cosine, make_train_step
    opt = adamw(weight_decay=0.1)
    step = make_train_step(model, opt, warmup_cosine(3e-3, total=1000, warmup=50))
    params, opt_state, metrics = step(params, opt.init(params), {"tokens": tokens}, key)

See ``alloy.train.step`` for the step's contract (subset training, LoRA, ``grad_reduce``) and
docs/training.md for the CLI and configs.
"""
from alloy.train.optim import (Optimizer, accumulate, adamw, clip_by_global_norm, decay_rule,
                               global_norm, sgd)
from alloy.train.schedule import constant, linear, make_schedule, warmup_cosine
from alloy.train.step import (bits_per_token, init_opt_state, make_eval_fn, make_lm_loss, make_step,
                              make_train_step)

__all__ = ["Optimizer", "accumulate", "adamw", "bits_per_token", "clip_by_global_norm", "constant",
           "decay_rule", "global_norm", "init_opt_state", "linear", "make_eval_fn", "make_lm_loss",
           "make_schedule", "make_step", "make_train_step", "sgd", "warmup_cosine"]

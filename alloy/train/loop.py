"""The training loop behind ``alloy train``: config, data, compiled step, eval, checkpoints, plot.

Training YAML (or JSON) -- exactly two top-level sections, unknown keys are errors::

    model:            # an alloy ModelConfig (same schema as the JSON configs)
      vocab_size: 256
      d_model: 128
      layer_types: [mamba2, attention, mamba2, attention]
      ...
    train:            # TrainConfig: every key optional, defaults below
      batch_size: 16
      seq_len: 128
      ...

``TrainConfig`` documents each field. The loop keeps float32 master weights whatever
``model.dtype`` says; ``train.dtype`` is the compute dtype inside the loss.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Mapping

import mlx.core as mx

from alloy.config import ModelConfig
from alloy.model import build
from alloy.params.tree import cast, count_params
from alloy.train.checkpoint import load_checkpoint, save_run_checkpoint
from alloy.train.data import ByteTokenizer, TextCorpus, jsonl_corpus
from alloy.train.optim import adamw, decay_rule
from alloy.train.schedule import SCHEDULES, make_schedule
from alloy.train.step import bits_per_token, make_eval_fn, make_train_step
from alloy.train.tasks import TASKS, TaskData

__all__ = ["TrainConfig", "load_train_config", "bundled_config", "make_data", "train", "greedy_sample"]

COMPUTE_DTYPES = {"float32": None, "bfloat16": mx.bfloat16, "float16": mx.float16}


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 16            # sequences per optimizer step (all micro-batches together)
    seq_len: int = 128              # T: tokens read per sequence (windows hold T + 1)
    steps: int = 300                # total optimizer steps; the schedule is laid out over these
    lr: float = 3e-3                # peak learning rate
    end_lr_frac: float = 0.1        # final lr = end_lr_frac * lr (cosine / linear)
    warmup: int = 20                # linear warmup steps
    schedule: str = "cosine"        # cosine | linear | constant
    weight_decay: float = 0.1       # AdamW decoupled decay, matrices only (optim.decay_rule)
    decay_embeddings: bool = False  # also decay embed_tokens
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip: float = 1.0               # global gradient-norm clip; 0 turns it off
    accum_steps: int = 1            # micro-batches per step (batch_size must divide by it)
    dtype: str = "float32"          # compute dtype: float32 | bfloat16 | float16 (masters stay fp32)
    remat: bool = False             # per-block gradient checkpointing
    data: str = "stdlib"            # stdlib | mqar | copy | path to .jsonl (or a dir of them)
    val_fraction: float = 0.01      # documents held out for validation (text data)
    task_size: int = 8              # mqar: key-value pairs; copy: tokens to copy
    eval_every: int = 50            # steps between validations (0: only at the start and end)
    eval_batches: int = 8           # validation batches per evaluation
    log_every: int = 10             # steps between metrics lines
    save_every: int = 0             # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2       # checkpoints kept in the run directory
    seed: int = 0                   # init, data order and step keys
    sample_tokens: int = 200        # greedy sample length printed at the end (0: none)
    sample_prompt: str = "def "     # prompt of that sample (text data)

    def __post_init__(self):
        pos_int = ("batch_size", "seq_len", "steps", "accum_steps", "eval_batches", "log_every", "task_size")
        nonneg_int = ("warmup", "eval_every", "save_every", "keep_checkpoints", "sample_tokens", "seed")
        for k in pos_int + nonneg_int:
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < (1 if k in pos_int else 0):
                raise ValueError(f"train.{k} must be a {'positive' if k in pos_int else 'non-negative'} int, got {v!r}")
        for k in ("lr", "weight_decay", "clip", "eps", "end_lr_frac"):
            v = getattr(self, k)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise ValueError(f"train.{k} must be a non-negative number, got {v!r}")
        for k in ("b1", "b2", "val_fraction"):
            v = getattr(self, k)
            if not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise ValueError(f"train.{k} must be in [0, 1), got {v!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.schedule != "constant" and self.steps <= self.warmup:
            raise ValueError(f"train.steps ({self.steps}) must exceed train.warmup ({self.warmup})")
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"train.dtype must be one of {list(COMPUTE_DTYPES)}, got {self.dtype!r}")
        if self.batch_size % self.accum_steps:
            raise ValueError(f"train.batch_size ({self.batch_size}) must be divisible by "
                             f"train.accum_steps ({self.accum_steps})")
        for k in ("remat", "decay_embeddings"):
            if not isinstance(getattr(self, k), bool):
                raise ValueError(f"train.{k} must be true or false, got {getattr(self, k)!r}")
        if not isinstance(self.data, str) or not self.data:
            raise ValueError(f"train.data must be 'stdlib', 'mqar', 'copy' or a path, got {self.data!r}")

    @classmethod
    def from_dict(cls, d: Mapping | None) -> "TrainConfig":
        d = dict(d or {})
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"train: unknown key(s) {unknown}; allowed: {allowed}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def bundled_config(name: str) -> Path:
    """``alloy/configs/<name>.yaml`` (or .json)."""
    base = resources.files("alloy") / "configs"
    for ext in (".yaml", ".yml", ".json"):
        p = base / f"{name}{ext}"
        if p.is_file():
            return Path(str(p))
    have = sorted(p.name.rsplit(".", 1)[0] for p in base.iterdir() if p.name.endswith((".yaml", ".yml")))
    raise FileNotFoundError(f"no bundled training config {name!r}; bundled: {have}")


def load_train_config(source) -> tuple[ModelConfig, TrainConfig]:
    """``(ModelConfig, TrainConfig)`` from a YAML/JSON path, a bundled name, or a dict."""
    if isinstance(source, Mapping):
        d, where = dict(source), "config"
    else:
        p = Path(source)
        if not p.exists() and not p.suffix and os.sep not in str(source):
            p = bundled_config(str(source))
        if not p.is_file():
            raise FileNotFoundError(f"training config not found: {source}")
        text = p.read_text()
        where = str(p)
        if p.suffix == ".json":
            d = json.loads(text)
        else:
            import yaml
            try:
                d = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ValueError(f"{p}: invalid YAML ({e})") from None
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: expected a mapping with 'model' and 'train' sections")
    unknown = sorted(set(d) - {"model", "train"})
    if unknown:
        raise ValueError(f"{where}: unknown top-level key(s) {unknown}; allowed: ['model', 'train']")
    if "model" not in d:
        raise ValueError(f"{where}: missing the 'model' section")
    try:
        mcfg = ModelConfig.from_dict(d["model"])
        tcfg = TrainConfig.from_dict(d.get("train"))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None
    return mcfg, tcfg


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------


class _Source:
    """What the loop needs from data: a loader (``next_batch(pos)``, ``init_position()``) and a
    fixed validation set; ``text`` tells whether bits per byte make sense."""

    def __init__(self, name, loader, val, text, describe):
        self.name, self.loader, self.val, self.text, self.describe = name, loader, val, text, describe


def make_data(tcfg: TrainConfig, vocab_size: int) -> _Source:
    tok = ByteTokenizer()
    if tcfg.data in TASKS:
        td = TaskData(tcfg.data, tcfg.batch_size, tcfg.seq_len, tcfg.task_size, vocab_size, tcfg.seed)
        return _Source(tcfg.data, td, td.val_batches(tcfg.eval_batches), False,
                       f"{tcfg.data} (size {tcfg.task_size}, vocab {vocab_size}), synthetic")
    if tcfg.data == "stdlib":
        from alloy.train.corpus import stdlib_corpus
        if vocab_size < 256:
            raise ValueError(f"data stdlib is byte-level: model.vocab_size must be >= 256, got {vocab_size}")
        corpus: TextCorpus = stdlib_corpus(tcfg.val_fraction)
    else:
        corpus = jsonl_corpus(tcfg.data, tok, vocab_size, tcfg.val_fraction)
    loader = corpus.loader(tcfg.batch_size, tcfg.seq_len, tcfg.seed)
    val = corpus.val_batches(tcfg.batch_size, tcfg.seq_len, tcfg.eval_batches)
    desc = (f"{corpus.name}: {corpus.n_train_docs} train docs / {len(corpus.train):,} tokens, "
            f"{corpus.n_val_docs} val docs / {len(corpus.val):,} tokens")
    return _Source(corpus.name, loader, val, True, desc)


# ----------------------------------------------------------------------------------------------
# sampling, eval, plot
# ----------------------------------------------------------------------------------------------


def greedy_sample(model, params, prompt_ids, n_tokens: int) -> list[int]:
    """Greedy continuation of ``prompt_ids`` with the model's cached decode path."""
    if n_tokens <= 0:
        return []
    prompt = mx.array([list(prompt_ids)], dtype=mx.int32)
    state = model.init_state(1, prompt.shape[1] + n_tokens)
    step = mx.compile(model.apply)
    logits, state = model.apply(params, prompt, state)
    nxt = mx.argmax(logits[:, -1:], axis=-1).astype(mx.int32)
    out = []
    for _ in range(n_tokens):
        mx.eval(nxt, state)
        out.append(int(nxt.item()))
        logits, state = step(params, nxt, state)
        nxt = mx.argmax(logits[:, -1:], axis=-1).astype(mx.int32)
    return out


def optimizer_and_schedule(tcfg: TrainConfig):
    """The AdamW optimizer and LR schedule a TrainConfig describes (full training and LoRA runs)."""
    opt = adamw(tcfg.b1, tcfg.b2, tcfg.eps, tcfg.weight_decay, decay_rule(tcfg.decay_embeddings))
    return opt, make_schedule(tcfg.schedule, tcfg.lr, tcfg.steps, tcfg.warmup, tcfg.lr * tcfg.end_lr_frac)


def queue_step(outputs, marker, in_flight):
    """Queue a train step's outputs (`mx.async_eval`: the next batch and graph are built while it
    runs) and wait for the previous step (`in_flight`, the marker this returned for it), so that at
    most one step waits behind the running one. Returns the marker to pass next time."""
    mx.async_eval(*outputs)
    if in_flight is not None:
        mx.eval(in_flight)
    return marker


def _evaluate(eval_fn, params, batches) -> dict:
    if not batches:
        return {}
    ls = n = c = 0.0
    for b in batches:
        l_, n_, c_ = eval_fn(params, {k: mx.array(v) for k, v in b.items()})
        mx.eval(l_, n_, c_)
        ls, n, c = ls + l_.item(), n + n_.item(), c + c_.item()
    loss = ls / max(n, 1.0)
    return {"val_loss": loss, "val_bpb": bits_per_token(loss), "val_accuracy": c / max(n, 1.0)}


def plot_curves(records: list[dict], path: Path, title: str, log=print) -> Path | None:
    """Train loss and validation loss against step, as a PNG (matplotlib Agg)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: skipping the loss-curve plot (pip install 'alloy[plot]')")
        return None
    tr = [(r["step"], r["loss"]) for r in records if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if tr:
        ax.plot(*zip(*tr), label="train loss", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="val loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    from alloy.params.io import atomic_path
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------


def train(model_cfg: ModelConfig, tcfg: TrainConfig, out_dir, *, resume=None,
          stop_after: int | None = None, progress: bool = True, log: Callable = print,
          plot: bool = True) -> dict:
    """Train, evaluate, checkpoint; returns a summary dict.

    ``resume``: a checkpoint or run directory; training continues from its step with its params,
    optimizer state, RNG key and data position (the run's model config comes from the
    checkpoint). ``stop_after``: stop (and checkpoint) after this many total steps without
    changing the schedule (which spans ``tcfg.steps``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if resume is not None:
        ck = load_checkpoint(resume)
        model, params = ck["model"], ck["params"]
        opt_state, start, key, pos = ck["opt_state"], ck["step"], ck["key"], ck["data_position"]
        if model.config.to_dict() != model_cfg.to_dict():
            log(f"note: resuming with the model config stored in {ck['path']}")
        log(f"resumed from {ck['path']} at step {start}")
    else:
        model = build(model_cfg)
        k_init, key = mx.random.split(mx.random.key(tcfg.seed))
        params = model.init(k_init)
        opt_state = pos = None
        start = 0
    params = cast(params, mx.float32, keep=None)  # float32 master weights
    cfg = model.config
    data = make_data(tcfg, cfg.vocab_size)
    pos = data.loader.init_position() if pos is None else pos
    opt, sched = optimizer_and_schedule(tcfg)
    if opt_state is None:
        opt_state = opt.init(params)
    compute = COMPUTE_DTYPES[tcfg.dtype]
    step_fn = make_train_step(model, opt, sched, compute_dtype=compute, remat=tcfg.remat,
                              clip_norm=tcfg.clip or None, accum_steps=tcfg.accum_steps)
    eval_fn = make_eval_fn(model, compute_dtype=compute)
    mx.eval(params, opt_state)

    n_params = count_params(params)
    log(f"model {cfg.name}: {cfg.n_layers} layers [{', '.join(cfg.layer_types)}], d_model {cfg.d_model}, "
        f"{n_params:,} parameters; compute {tcfg.dtype}, device {mx.default_device()}")
    log(f"data: {data.describe}")
    tokens_per_step = tcfg.batch_size * tcfg.seq_len
    end = tcfg.steps if stop_after is None else min(stop_after, tcfg.steps)
    log(f"steps {start} -> {end} of {tcfg.steps}, batch {tcfg.batch_size} x {tcfg.seq_len} tokens, "
        f"lr {tcfg.lr:g} ({tcfg.schedule}, warmup {tcfg.warmup}); run dir {out_dir}")

    metrics_path = out_dir / "metrics.jsonl"
    records: list[dict] = []
    if resume is not None and metrics_path.is_file():
        records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        records = [r for r in records if r.get("step", 0) <= start]
    mfile = open(metrics_path, "w")
    for r in records:
        mfile.write(json.dumps(r) + "\n")

    def record(r):
        records.append(r)
        mfile.write(json.dumps(r) + "\n")
        mfile.flush()

    def validate(step):
        t0 = time.perf_counter()
        ev = _evaluate(eval_fn, params, data.val)
        if ev:
            r = {"step": step, **{k: round(v, 6) for k, v in ev.items()}, "eval_s": round(time.perf_counter() - t0, 3)}
            record(r)
            msg = (f"val loss {ev['val_loss']:.4f}, bpb {ev['val_bpb']:.4f}" if data.text
                   else f"val loss {ev['val_loss']:.4f}, answer accuracy {ev['val_accuracy']:.4f}")
            _write(f"step {step}: {msg}", progress, log)
        return ev

    first_eval = validate(start) if start == 0 or not any("val_loss" in r for r in records) else {}
    last_eval = first_eval
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=end, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
    t_train = time.perf_counter()
    t_win, n_win = time.perf_counter(), 0
    tok_s = 0.0
    step = start
    in_flight = None
    try:
        while step < end:
            batch_np, pos = data.loader.next_batch(pos)
            key, sub = mx.random.split(key)
            batch = {k: mx.array(v) for k, v in batch_np.items()}
            params, opt_state, metrics = step_fn(params, opt_state, batch, sub)
            in_flight = queue_step((params, opt_state, metrics), metrics["loss"], in_flight)
            step += 1
            n_win += 1
            if step % tcfg.log_every == 0 or step == end:
                now = time.perf_counter()
                tok_s = n_win * tokens_per_step / max(now - t_win, 1e-9)
                t_win, n_win = now, 0
                r = {"step": step, **{k: round(float(v.item()), 6) for k, v in metrics.items()},
                     "tokens_per_s": round(tok_s, 1), "elapsed_s": round(now - t_start, 2)}
                record(r)
                if bar is not None:
                    bar.set_postfix(loss=f"{r['loss']:.3f}", lr=f"{r['lr']:.2e}", tok_s=f"{tok_s:,.0f}")
            if bar is not None:
                bar.update(1)
            if tcfg.eval_every and step % tcfg.eval_every == 0 and step != end:
                last_eval = validate(step)
            if tcfg.save_every and step % tcfg.save_every == 0 and step != end:
                _save(out_dir, model, params, opt_state, step, key, pos, tcfg)
    finally:
        if bar is not None:
            bar.close()
    mx.eval(params, opt_state)  # the last queued step
    train_s = time.perf_counter() - t_train
    if step > start or not last_eval:
        last_eval = validate(step)
    ckpt = _save(out_dir, model, params, opt_state, step, key, pos, tcfg)
    mfile.close()
    log(f"checkpoint: {ckpt}")
    png = plot_curves(records, out_dir / "loss.png", f"{cfg.name} on {data.name}", log) if plot else None
    if png:
        log(f"loss curve: {png}")
    summary = {"steps": step, "start_step": start, "train_s": round(train_s, 2),
               "wall_s": round(time.perf_counter() - t_start, 2), "params": n_params,
               "tokens_per_s": round(tokens_per_step * (step - start) / max(train_s, 1e-9), 1),
               "checkpoint": str(ckpt), "params_tree": params}
    if first_eval:
        summary["val_loss_start"] = first_eval["val_loss"]
        summary["val_bpb_start"] = first_eval["val_bpb"]
    if last_eval:
        summary.update({"val_loss": last_eval["val_loss"], "val_bpb": last_eval["val_bpb"],
                        "val_accuracy": last_eval["val_accuracy"]})
    if data.text and first_eval and last_eval:
        log(f"validation bits per byte: {first_eval['val_bpb']:.3f} -> {last_eval['val_bpb']:.3f} "
            f"in {step - start} steps, {train_s:.0f} s training ({summary['tokens_per_s']:,.0f} tok/s)")
    elif last_eval:
        log(f"validation answer accuracy: {last_eval['val_accuracy']:.4f}")
    if tcfg.sample_tokens and data.text:
        tok = ByteTokenizer()
        prompt = tok.encode(tcfg.sample_prompt).tolist() or [tok.eos_id]
        ids = greedy_sample(model, params, prompt, tcfg.sample_tokens)
        summary["sample"] = tok.decode(prompt + ids)
        log(f"sample (greedy, {tcfg.sample_tokens} bytes):\n{summary['sample']}")
    return summary


def _write(msg, progress, log):
    if progress:
        from tqdm import tqdm
        tqdm.write(msg, file=sys.stderr)
    else:
        log(msg)


def _save(out_dir, model, params, opt_state, step, key, pos, tcfg):
    return save_run_checkpoint(out_dir, keep=tcfg.keep_checkpoints, model=model, params=params,
                               opt_state=opt_state, step=step, key=key, data_position=pos,
                               train_config=tcfg.to_dict())

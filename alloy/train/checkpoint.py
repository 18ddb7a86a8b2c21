"""Training checkpoints: everything needed to continue a run exactly.

A checkpoint is a directory::

    config.json, model.safetensors   the model (``alloy.save`` format: loadable by ``alloy.load``)
    optimizer.msgpack                the optimizer state tree (moments, step counter), bit-exact
    trainer.msgpack                  {"step": int, "key": uint32 (2,) RNG key,
                                      "data_position": dict, "train_config": dict | None}

Atomicity: the directory is written in full under a temporary name beside its destination and
then renamed into place, so a reader sees a whole checkpoint or none. A run directory holds
``ckpt-<step:08d>`` checkpoints and a ``latest`` file naming the newest (written atomically after
the checkpoint itself); older checkpoints beyond ``keep`` are removed.

Resuming: params (float32 master weights), optimizer state, RNG key and data position are
restored bit for bit, so N steps straight equal N/2 steps, a restart, then N/2 more.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import mlx.core as mx

from alloy.checkpoint import load as load_model
from alloy.checkpoint import save as save_model
from alloy.params.io import atomic_write, load_tree_msgpack, save_tree_msgpack

__all__ = ["save_checkpoint", "load_checkpoint", "resolve_checkpoint", "save_run_checkpoint",
           "OPTIMIZER_FILE", "TRAINER_FILE", "LATEST_FILE", "load_trainer_state"]

OPTIMIZER_FILE = "optimizer.msgpack"
TRAINER_FILE = "trainer.msgpack"
LATEST_FILE = "latest"


def save_checkpoint(path, *, model=None, params=None, opt_state, step: int, key: mx.array,
                    data_position: dict, train_config: dict | None = None, write_params=None,
                    extra: dict | None = None) -> Path:
    """Write a checkpoint directory at ``path`` atomically (temp dir, then rename).

    The trained tree is a model checkpoint (``model``, ``params``) or whatever ``write_params(dir)``
    writes into the directory (LoRA runs: the adapters); ``extra`` adds entries to the trainer file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        if write_params is not None:
            tmp.mkdir(parents=True)
            write_params(tmp)
        else:
            save_model(tmp, model, params)
        save_tree_msgpack(tmp / OPTIMIZER_FILE, opt_state)
        save_tree_msgpack(tmp / TRAINER_FILE, {"step": int(step), "key": key,
                                               "data_position": dict(data_position),
                                               "train_config": train_config, **(extra or {})})
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def resolve_checkpoint(path) -> Path:
    """A checkpoint directory from itself or from a run directory (its ``latest``, else the
    highest ``ckpt-*``). Raises ``FileNotFoundError`` saying what was looked for."""
    path = Path(path)
    if (path / TRAINER_FILE).is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"resume: {path} does not exist")
    latest = path / LATEST_FILE
    if latest.is_file():
        cand = path / latest.read_text().strip()
        if (cand / TRAINER_FILE).is_file():
            return cand
    found = sorted(p for p in path.glob("ckpt-*") if (p / TRAINER_FILE).is_file())
    if not found:
        raise FileNotFoundError(f"resume: {path} is neither a training checkpoint (no {TRAINER_FILE}) "
                                f"nor a run directory with ckpt-* checkpoints")
    return found[-1]


def load_trainer_state(path) -> dict:
    """The optimizer and trainer files of a checkpoint (or a run directory's latest):
    ``{"opt_state", "step", "key", "data_position", "train_config", "path", ...extra entries}``."""
    path = resolve_checkpoint(path)
    opt_state = load_tree_msgpack(path / OPTIMIZER_FILE)
    trainer = load_tree_msgpack(path / TRAINER_FILE)
    missing = [k for k in ("step", "key", "data_position") if k not in trainer]
    if missing:
        raise ValueError(f"{path / TRAINER_FILE}: missing {missing}")
    return {**trainer, "opt_state": opt_state, "step": int(trainer["step"]),
            "train_config": trainer.get("train_config"), "path": path}


def load_checkpoint(path) -> dict:
    """``{"model", "params", "opt_state", "step", "key", "data_position", "train_config", "path"}``."""
    st = load_trainer_state(path)
    model, params = load_model(st["path"])
    return {"model": model, "params": params, **{k: st[k] for k in
            ("opt_state", "step", "key", "data_position", "train_config", "path")}}


def save_run_checkpoint(run_dir, keep: int = 2, **state) -> Path:
    """``save_checkpoint(run_dir / f"ckpt-{step:08d}", ...)``, update ``latest``, prune to ``keep``."""
    run_dir = Path(run_dir)
    name = f"ckpt-{int(state['step']):08d}"
    out = save_checkpoint(run_dir / name, **state)
    atomic_write(run_dir / LATEST_FILE, name + "\n")
    if keep and keep > 0:
        ckpts = sorted(p for p in run_dir.glob("ckpt-*") if p.is_dir())
        for old in ckpts[:-keep]:
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    return out

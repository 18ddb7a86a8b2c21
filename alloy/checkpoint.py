"""Alloy checkpoints: a directory with ``config.json`` and ``model.safetensors``.

``config.json`` is ``{"alloy_format": 1, "model": ModelConfig.to_dict()}``, plus an optional
``"quantization": {"modules": {path: [bits, group_size]}}`` when params are quantized
(``alloy.params.quantize``); tensors are stored under their dotted tree keys
(``layers.3.mixer.in_proj.weight``, ``....scales``, ``....biases``) in the params' own dtypes.
Loading is strict: every missing, unexpected or mis-shaped tensor is reported in one error, and the
tree is rebuilt in the config's canonical key order. Every file is written atomically.
"""
from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from alloy.model import Model, build
from alloy.params.io import load_into, load_json, load_safetensors, save_json, save_safetensors
from alloy.params.quantize import apply_spec, quantization_spec
from alloy.params.tree import flatten

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save(path, model: Model, params, format: str = "alloy") -> Path:
    """Write ``model`` and ``params`` to directory ``path`` (created if needed).

    format "alloy": this module's layout; "hf": the Hugging Face layout of the model's family.
    """
    if format == "hf":
        from alloy.convert.hf import save_hf
        return save_hf(path, model, params)
    if format != "alloy":
        raise ValueError(f"save: format must be 'alloy' or 'hf', got {format!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flat = flatten(params)
    save_safetensors(path / WEIGHTS_FILE, flat, metadata={"format": "mlx", "alloy_format": str(FORMAT_VERSION)})
    meta = {"alloy_format": FORMAT_VERSION, "model": model.config.to_dict()}
    spec = quantization_spec(model, params)
    if spec is not None:
        meta["quantization"] = spec
    save_json(path / CONFIG_FILE, meta)
    return path


def is_alloy_checkpoint(path) -> bool:
    cfg = Path(path) / CONFIG_FILE
    if not cfg.is_file():
        return False
    try:
        return "alloy_format" in json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def load(path, strict: bool = True):
    """Load ``(model, params)`` from an Alloy checkpoint directory, a Hugging Face checkpoint
    directory, or a Hub id (downloaded when ``huggingface_hub`` is installed and online)."""
    if not Path(path).exists() and not is_alloy_checkpoint(path):
        if isinstance(path, str) and "/" in path and not path.startswith((".", "/")):
            from alloy.convert.hf import load_hf
            return load_hf(path, strict=strict)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"load: {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"load: expected a checkpoint directory, got file {path}")
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"load: {path} has no {CONFIG_FILE}")
    meta = load_json(cfg_path)
    if "alloy_format" not in meta:
        if "model_type" in meta:
            from alloy.convert.hf import load_hf
            return load_hf(path, strict=strict)
        raise ValueError(f"load: {cfg_path} is neither an Alloy config (no 'alloy_format') "
                         "nor a Hugging Face one (no 'model_type')")
    if meta["alloy_format"] != FORMAT_VERSION:
        raise ValueError(f"load: {cfg_path} has alloy_format {meta['alloy_format']!r}; this Alloy reads {FORMAT_VERSION}")
    model = build(meta["model"])
    template = model.init(mx.random.key(0))  # lazy: only shapes are read, nothing is computed
    if meta.get("quantization") is not None:
        template = apply_spec(template, meta["quantization"])
    flat = load_safetensors(path / WEIGHTS_FILE)
    params = load_into(template, flat, strict=strict)
    return model, params

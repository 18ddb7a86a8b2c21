"""Load a Hugging Face checkpoint directory (or Hub id) as an Alloy model; export back.

    model, params = load_hf("path/to/dir")        # config.json + model.safetensors (or sharded index)
    save_hf("out", model, params)                 # config.json + model.safetensors, HF names

Unknown config fields, missing / unexpected / mis-shaped tensors are reported together; nothing is
silently ignored.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import mlx.core as mx

from alloy.convert.registry import COMMON_FIELDS, converters, get_converter, rename_key
from alloy.model import Model, build
from alloy.params.io import CheckpointError, load_into, load_safetensors, save_json, save_safetensors
from alloy.params.tree import flatten


def resolve_path(path_or_id: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a Hub id downloaded with ``huggingface_hub``."""
    p = Path(path_or_id)
    if p.exists():
        return p
    s = str(path_or_id)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", s):
        raise FileNotFoundError(f"load: {s} is neither a local path nor a Hugging Face Hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"load: {s} is not a local path; to download it from the Hub install "
                                "huggingface_hub (pip install 'alloy[hf]')") from None
    try:
        return Path(snapshot_download(s, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as e:  # offline, unknown repo, auth: say which, plainly
        raise FileNotFoundError(f"load: could not download {s} from the Hugging Face Hub "
                                f"(offline or not found?): {type(e).__name__}: {e}") from None


def read_hf_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"load: {path} has no config.json")
    try:
        hf = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"load: {cfg_path} is not valid JSON: {e}") from None
    if "model_type" not in hf:
        raise ValueError(f"load: {cfg_path} has no model_type (not a Hugging Face config)")
    return hf


def hf_to_alloy_config(hf: dict):
    conv = get_converter(hf["model_type"])
    unknown = sorted(set(hf) - COMMON_FIELDS - conv.known)
    if unknown:
        raise ValueError(f"{hf['model_type']}: config field(s) {unknown} are not understood by the converter; "
                         "refusing to guess their meaning")
    try:
        return conv, conv.config(hf)
    except KeyError as e:
        raise ValueError(f"{hf['model_type']}: config.json is missing the required field {e.args[0]!r}") from None


def load_hf(path_or_id, strict: bool = True):
    path = resolve_path(path_or_id)
    hf = read_hf_config(path)
    conv, cfg = hf_to_alloy_config(hf)
    model = build(cfg)
    template = model.init(mx.random.key(0))  # lazy: shapes only
    flat_hf = load_safetensors(path)
    if conv.load_hook is not None:
        flat_hf = conv.load_hook(flat_hf, hf)
    flat, unmapped = {}, []
    for k, v in flat_hf.items():
        if any(re.search(d, k) for d in conv.drop):
            continue
        if model.config.tie_embeddings and k == "lm_head.weight":
            continue  # tied head stored anyway by some exporters
        ak = rename_key(k, conv.rename, kind_of=lambda i: _kind(model.config, i))
        if ak is None:
            unmapped.append(k)
        else:
            flat[ak] = v
    if unmapped:
        raise CheckpointError(unexpected=unmapped, source=f"{path} (tensor names with no {hf['model_type']} mapping)")
    params = load_into(template, flat, strict=strict)
    dtype = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}[model.config.dtype]
    params = _cast_like_template(params, template, dtype)
    return model, params


def _kind(cfg, i: int) -> str | None:
    """Mixer kind at depth i ("none" for FFN-only layers; None past the last layer)."""
    return cfg.mixer_kind(i) if i < cfg.n_layers else None


def _cast_like_template(params, template, dtype):
    """Checkpoint dtypes follow the model's dtype rule (A_log / D / dt_bias stay fp32)."""
    from alloy.params.tree import tree_map
    return tree_map(lambda p, t: p.astype(t.dtype) if p.dtype != t.dtype else p, params, template)


def save_hf(path, model: Model, params) -> Path:
    """Write the Hugging Face layout for a model of a supported family."""
    cfg = model.config
    # the family the model was loaded from (its config name) first, then any that fits
    for conv in sorted(converters(), key=lambda c: cfg.name not in c.model_types):
        if conv.to_hf is None:
            continue
        hf = conv.to_hf(cfg)
        if hf is not None:
            break
    else:
        raise ValueError("save(format='hf'): this model's layer mix has no Hugging Face family; "
                         f"exportable families: {sorted({c.model_types[0] for c in converters() if c.to_hf})}")
    hf = {"architectures": [conv.architecture], **hf, "torch_dtype": cfg.dtype}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flat = {}
    for k, v in flatten(params).items():
        hk = rename_key(k, conv.rename, reverse=True, kind_of=lambda i: _kind(cfg, i))
        if hk is None:
            raise ValueError(f"save(format='hf'): no Hugging Face name for tensor {k}")
        flat[hk] = v
    if conv.save_hook is not None:
        flat = conv.save_hook(flat, cfg)
    save_safetensors(path / "model.safetensors", flat, metadata={"format": "pt"})
    save_json(path / "config.json", _json_safe(hf))
    return path


def _json_safe(obj):
    """inf / nan as transformers writes them ({"__float__": "Infinity"})."""
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return {"__float__": "NaN" if obj != obj else ("Infinity" if obj > 0 else "-Infinity")}
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj

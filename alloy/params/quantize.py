"""Affine group quantization of a parameter tree (4 / 8 bit) for ``mx.quantized_matmul``.

For a linear ``{"weight": W (out, in), "bias"?}`` and group size g, every run of g input weights
of a row shares a scale s and offset b (``mx.quantize``, mode "affine"):

    W[o, j] ~= s[o, j // g] * q[o, j] + b[o, j // g],     q in [0, 2^bits - 1]

The quantized linear is ``{"weight": uint32 (out, in * bits / 32), "scales", "biases": (out, in / g),
"bias"?}``; ``alloy.layers.common.dense`` dispatches on the presence of ``scales`` and reads bits
and group size off the shapes. Sensitive leaves stay in full precision (``keep_full_precision``):
``A_log``, ``D``, ``dt_bias``, norms, conv1d, routers, and — unless ``embeddings=True`` — the token
embedding and LM head. A weight whose input width is not a multiple of g stays full precision too.

``quantization_spec(model, params)`` describes a quantized tree ({"modules": {path: [bits, g]}}); it is
what ``alloy.save`` writes to ``config.json`` and ``apply_spec`` rebuilds the tree layout on load.
"""
from __future__ import annotations

from typing import Callable

import mlx.core as mx

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
# SSM dynamics, convs, routers and gates: small tensors whose errors move decays or routing
SENSITIVE = ("A_log", "D", "dt_bias", "conv1d", "conv", "conv_1d", "router", "shared_gate", "shared_expert_gate",
             "in_proj_a", "in_proj_b", "dt_proj", "forget_gate", "b_proj",
             # DeepSeek-V4: the grouped output projection is read as (groups, rank, in) blocks; the
             # compressor's gates pool windows and its indexer selects entries
             "o_a_proj", "compressor")


def keep_full_precision(path: str, embeddings: bool = False) -> bool:
    """True for modules that must stay in full precision (``path``: dotted module path such as
    ``layers.3.mixer.in_proj``): SSM dynamics, norms, conv, routers, embeddings/head unless asked."""
    parts = path.split(".")
    if any(p in SENSITIVE or "norm" in p for p in parts):
        return True
    if not embeddings and parts[0] in ("embed_tokens", "lm_head"):
        return True
    return False


def _linears(tree, prefix=""):
    """Yield (path, dict) for every dict holding a 2-D ``weight`` (a linear or an embedding)."""
    if isinstance(tree, dict):
        w = tree.get("weight")
        if isinstance(w, mx.array) and w.ndim == 2:
            yield prefix, tree
        for k, v in tree.items():
            if isinstance(v, (dict, list)):
                yield from _linears(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _linears(v, f"{prefix}.{i}" if prefix else str(i))


def _rebuild(tree, fn, prefix=""):
    """Copy of ``tree`` (same key order) with every module dict passed through fn(path, dict)."""
    if isinstance(tree, dict):
        out = {k: (_rebuild(v, fn, f"{prefix}.{k}" if prefix else str(k)) if isinstance(v, (dict, list)) else v)
               for k, v in tree.items()}
        return fn(prefix, out)
    if isinstance(tree, list):
        return [_rebuild(v, fn, f"{prefix}.{i}" if prefix else str(i)) for i, v in enumerate(tree)]
    return tree


def _quantize_linear(p: dict, bits: int, group_size: int) -> dict:
    wq, scales, biases = mx.quantize(p["weight"], group_size=group_size, bits=bits)
    out = {"weight": wq, "scales": scales, "biases": biases}
    out.update((k, v) for k, v in p.items() if k != "weight")  # bias, unmerged lora_A / lora_B, ...
    return out


def _check(bits, group_size):
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"quantize: bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if group_size not in (32, 64, 128):
        raise ValueError(f"quantize: group_size must be 32, 64 or 128, got {group_size!r}")


def quantize(params, bits: int = 4, group_size: int = 64, *, embeddings: bool = False,
             predicate: Callable[[str, dict], bool] | None = None):
    """A new tree with eligible linears affine-quantized (see module docstring).

    ``predicate(path, module) -> bool`` chooses which 2-D-weight modules to quantize (default:
    ``not keep_full_precision(path, embeddings)``); modules whose input width is not a multiple of
    ``group_size`` are always kept. Key order is preserved (it is part of ``mx.compile``'s cache key).
    """
    _check(bits, group_size)
    pred = predicate or (lambda path, mod: not keep_full_precision(path, embeddings))

    def fn(path, mod):
        w = mod.get("weight")
        if (isinstance(w, mx.array) and w.ndim == 2 and "scales" not in mod and path
                and w.shape[-1] % group_size == 0 and pred(path, mod)):
            return _quantize_linear(mod, bits, group_size)
        return mod

    return _rebuild(params, fn)


def dequantize(model, params):
    """Inverse layout: every quantized module of ``params`` back to a float32 ``weight``."""
    spec = quantization_spec(model, params) or {"modules": {}}
    mods = spec["modules"]

    def fn(path, mod):
        if path not in mods:
            return mod
        bits, gs = mods[path]
        out = {"weight": mx.dequantize(mod["weight"], mod["scales"], mod["biases"], group_size=gs, bits=bits)}
        out.update((k, v) for k, v in mod.items() if k not in ("weight", "scales", "biases"))
        return out

    return _rebuild(params, fn)


def quantization_spec(model, params) -> dict | None:
    """{"modules": {path: [bits, group_size]}} for the quantized modules of ``params`` (input widths
    read from ``model.init``'s lazy template), or None when nothing is quantized."""
    template = dict(_linears(model.init(mx.random.key(0))))
    modules = {}
    for path, mod in _linears(params):
        if "scales" not in mod:
            continue
        if path not in template:
            raise ValueError(f"quantization_spec: {path} is not a linear of this model")
        d_in = template[path]["weight"].shape[-1]
        packed, groups = mod["weight"].shape[-1], mod["scales"].shape[-1]
        modules[path] = [packed * 32 // d_in, d_in // groups]
    return {"modules": modules} if modules else None


def apply_spec(params, spec: dict):
    """Quantize exactly the modules named in ``spec`` (from ``quantization_spec``) — used on a
    (lazy) template so a quantized checkpoint loads into the right layout."""
    if not isinstance(spec, dict) or not isinstance(spec.get("modules"), dict):
        raise ValueError(f"quantization spec must be {{'modules': {{path: [bits, group_size]}}}}, got {spec!r}")
    mods = spec["modules"]
    present = {p for p, _ in _linears(params)}
    unknown = sorted(set(mods) - present)
    if unknown:
        raise ValueError(f"quantization spec names modules this model lacks: {unknown[:5]}")
    for path, bg in mods.items():
        if not (isinstance(bg, (list, tuple)) and len(bg) == 2):
            raise ValueError(f"quantization spec: {path} must map to [bits, group_size], got {bg!r}")
        _check(*bg)

    def fn(path, mod):
        if path in mods:
            bits, gs = mods[path]
            return _quantize_linear(mod, bits, gs)
        return mod

    return _rebuild(params, fn)

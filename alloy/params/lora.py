"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") as a tree delta.

A LoRA adapter is not a layer: it is a small parameter tree beside the base tree, and
``apply_lora`` is a pure function that returns the base tree with every targeted matrix replaced
by its adapted value. Every layer -- every registered mixer, FFN, or one added later -- therefore
runs unchanged on adapted params; nothing in ``alloy.layers`` knows about LoRA.

For a targeted leaf ``W`` of shape ``(d_out, d_in)`` (the HF ``Linear`` layout: ``y = x W^T``) the
adapter holds ``A (r, d_in)`` and ``B (d_out, r)`` and::

    W' = W + s * B @ A,            s = alpha / r                                   (1)
    x W'^T = x W^T + s * (x A^T) B^T                                               (2)

(2) is the usual "unmerged" LoRA forward; (1) computes the same thing as a weight delta, which is
also exactly the merged form. A stacked weight ``(*S, d_out, d_in)`` (MoE experts ``(E, F, D)``) is
a stack of matrices: it gets stacked adapters ``A (*S, r, d_in)``, ``B (*S, d_out, r)`` -- one
independent LoRA per matrix -- and (1) is a batched matmul.

``init_lora`` draws ``A ~ U(-1/sqrt(d_in), 1/sqrt(d_in))`` and sets ``B = 0``, so the adapted
model starts equal to the base and ``dL/dA = s * B^T dL/dW' = 0`` at step 0 while
``dL/dB = s * dL/dW' A^T`` is not.

Dropout in the weight-delta form. Classic LoRA drops elements of ``x`` (per token) on the LoRA
branch of (2). Here, when ``apply_lora`` gets a ``key`` and ``dropout > 0``, each call draws one
keep-mask ``m in {0, 1}^{d_in}`` per target matrix (keep probability ``1 - p``) and uses
``A * m / (1 - p)`` in (1): whole input features are dropped for every token of that call. It
keeps the delta a weight (so adapted params stay a plain tree that every layer accepts, and one
matmul serves both paths); it is coarser than per-token dropout (one mask per step, not per
token). Without a key, or with ``dropout == 0``, there is no dropout (evaluation).

Adapter tree layout. ``init_lora`` mirrors the base tree at the targeted leaves: the leaf at path
``P`` (e.g. ``layers.3.mixer.in_proj.weight``) becomes ``{"lora_A": A, "lora_B": B}``, so
``flatten(adapters)`` has keys ``P.lora_A`` / ``P.lora_B``. Untargeted list items are ``{}``
holes (as ``alloy.params.filter_tree`` makes them): ``adapters["layers"][3]`` is layer 3's adapter.
Key order follows the base tree.

Which leaves are targets. A leaf is adapted when it is an array with ``ndim >= 2`` and its dotted
path matches one of ``LoraConfig.targets`` (``alloy.params.path_matches`` syntax: globs over whole
trailing components, or ``"re:<regex>"`` over the whole path). ``DEFAULT_TARGETS`` names every
linear projection of the built-in layers; embeddings, the LM head, norms, convolutions, the MoE
router, ``A_log``, ``D``, ``dt_bias`` and biases are never matched by it. Whatever the patterns,
the SSM dynamics (``A_log``, ``D``, ``dt_bias``: ``alloy.params.KEEP_FP32``; Mamba-1's ``A_log`` is
2-D but not a linear map), convolution kernels (a ``conv1d`` / ``conv`` path component), the csa
lightning indexer (an ``indexer`` component: it only selects, so the LM loss gives it no gradient)
and integer tables are never adapted, nor are leaves with fewer than 2 dimensions.

Files. ``save_adapters(dir, adapters, cfg)`` writes ``adapters.safetensors`` (the flat ``P.lora_A``
/ ``P.lora_B`` tensors) and ``adapter_config.json`` (the config and the tree skeleton, which keeps
key order and list holes), each atomically; ``load_adapters(dir)`` is strict and bit-exact.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import mlx.core as mx

from alloy.params.io import CheckpointError, atomic_write, load_json, load_safetensors, save_safetensors
from alloy.params.tree import (
    KEEP_FP32,
    filter_tree,
    flatten,
    is_container,
    path_matches,
    tree_map_with_path,
)

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "DEFAULT_TARGETS",
    "NEVER_LEAVES",
    "NEVER_MODULES",
    "LoraConfig",
    "apply_lora",
    "init_lora",
    "load_adapters",
    "lora_param_count",
    "lora_targets",
    "merge_lora",
    "save_adapters",
    "unmerge_lora",
]

# Every linear projection of the built-in layers (weights in the HF (d_out, d_in) layout):
# Mamba-1/2 and short-conv in/out projections, Gated DeltaNet's in_proj_{qkv,z,b,a}, Mamba-1's
# x_proj and dt_proj, attention q/k/v/o, MLP and MoE-expert (stacked) gate/up/down.
DEFAULT_TARGETS: tuple[str, ...] = tuple(
    f"{name}.weight"
    for name in ("in_proj", "in_proj_*", "out_proj", "x_proj", "dt_proj", "q_proj", "k_proj", "v_proj",
                 "o_proj", "gate_proj", "up_proj", "down_proj")
)
# Never adapted, whatever the patterns: leaf names (SSM dynamics) and module names (conv kernels).
NEVER_LEAVES = KEEP_FP32
# The lightning indexer (csa) only selects entries (a top-k): no gradient reaches it from the LM loss.
NEVER_MODULES = ("conv1d", "conv", "indexer")

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_FORMAT = "alloy.lora"
_VERSION = 1
_TARGET_MARK = "lora"  # the skeleton's leaf at each targeted path
_CONFIG_FIELDS = ("rank", "alpha", "dropout", "targets")


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters (frozen, hashable, JSON round-trippable).

    rank:    r, the inner dimension of ``B @ A`` (positive int). 8 adds r (d_in + d_out)
             parameters per target: ~3% of a 512 x 512 projection.
    alpha:   scale numerator; the delta is ``(alpha / rank) * B @ A`` (positive, finite). Keeping
             alpha fixed while changing r avoids re-tuning the learning rate (Hu et al., sec. 4.1);
             16 (= 2r at the default rank) is a common choice.
    dropout: p in [0, 1), the weight-delta LoRA dropout (module docstring); 0 disables it.
    targets: path patterns (``alloy.params.path_matches``) selecting the leaves to adapt.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = field(default=DEFAULT_TARGETS)

    def __post_init__(self):
        r = self.rank
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoraConfig.rank must be a positive int, got {r!r}")
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a <= 0:
            raise ValueError(f"LoraConfig.alpha must be a positive finite number, got {a!r}")
        object.__setattr__(self, "alpha", float(a))
        p = self.dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"LoraConfig.dropout must be a number in [0, 1), got {p!r}")
        object.__setattr__(self, "dropout", float(p))
        t = self.targets
        if isinstance(t, str):
            t = (t,)
        if not isinstance(t, (tuple, list)) or len(t) == 0:
            raise ValueError(f"LoraConfig.targets must be a non-empty sequence of path patterns, got {t!r}")
        for i, pat in enumerate(t):
            if not isinstance(pat, str) or not pat:
                raise ValueError(f"LoraConfig.targets[{i}] must be a non-empty string, got {pat!r}")
            try:
                path_matches("", pat)  # compiles (and caches) the pattern
            except (ValueError, re.error) as e:
                raise ValueError(
                    f"LoraConfig.targets[{i}] = {pat!r} is not a valid path pattern: {e}") from None
        object.__setattr__(self, "targets", tuple(t))

    @property
    def scale(self) -> float:
        """s = alpha / rank (a Python float, so it never promotes a bf16 delta)."""
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoraConfig":
        """Strict: unknown keys are an error naming them (missing keys take the defaults)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"LoraConfig.from_dict: expected a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - set(_CONFIG_FIELDS))
        if unknown:
            raise ValueError(f"LoraConfig: unknown field(s) {unknown}; allowed: {list(_CONFIG_FIELDS)}")
        return cls(**dict(d))


# ----------------------------------------------------------------------------------------------
# targets and init
# ----------------------------------------------------------------------------------------------


def _is_target(cfg: LoraConfig):
    def pred(path, leaf):
        if (getattr(leaf, "ndim", 0) or 0) < 2 or not mx.issubdtype(leaf.dtype, mx.floating):
            return False  # integer tables (hash_moe's tid2eid) are not linear maps
        parts = path.split(".")
        if parts[-1] in NEVER_LEAVES or any(c in NEVER_MODULES for c in parts[:-1]):
            return False
        return path_matches(path, cfg.targets)
    return pred


def lora_targets(params, cfg: LoraConfig) -> list[str]:
    """Dotted paths of the leaves ``cfg`` adapts in ``params``, in the tree's order."""
    pred = _is_target(cfg)
    return [p for p, leaf in flatten(params).items() if pred(p, leaf)]


def lora_param_count(params, cfg: LoraConfig) -> int:
    """Trainable parameters ``init_lora(key, params, cfg)`` creates: sum of r * (d_in + d_out)
    (times the stack size for stacked weights).

    Shapes only (nothing is evaluated). For an existing adapter tree use ``count_params``.
    """
    flat = flatten(params)
    return sum(cfg.rank * (flat[p].shape[-2] + flat[p].shape[-1]) * math.prod(flat[p].shape[:-2])
               for p in lora_targets(params, cfg))


def init_lora(key: mx.array, params, cfg: LoraConfig, dtype=mx.float32):
    """A fresh adapter tree for ``params``: at each target ``W (*S, d_out, d_in)``,
    ``{"lora_A": U(-1/sqrt(d_in), 1/sqrt(d_in)) (*S, r, d_in), "lora_B": zeros (*S, d_out, r)}``.

    ``dtype`` defaults to float32 (adapters are the trained weights: keep them full precision
    even over a bf16 base; ``apply_lora`` casts each delta to its weight's dtype).
    Raises ``ValueError`` when ``cfg.targets`` selects no adaptable leaf of ``params``.
    """
    targets = lora_targets(params, cfg)
    if not targets:
        raise ValueError(
            f"LoraConfig.targets {list(cfg.targets)} match no adaptable (>= 2-D) leaf of the params "
            f"(first paths: {list(flatten(params))[:6]})")
    keys = dict(zip(targets, mx.random.split(key, len(targets))))
    r = cfg.rank

    def make(path, w):
        *stack, d_out, d_in = w.shape
        bound = 1.0 / math.sqrt(d_in)
        a = mx.random.uniform(-bound, bound, (*stack, r, d_in), key=keys[path]).astype(dtype)
        return {"lora_A": a, "lora_B": mx.zeros((*stack, d_out, r), dtype=dtype)}

    return tree_map_with_path(make, filter_tree(_is_target(cfg), params))


# ----------------------------------------------------------------------------------------------
# apply / merge / unmerge
# ----------------------------------------------------------------------------------------------


def _pairs(adapters) -> dict[str, tuple[mx.array, mx.array]]:
    """{target path: (A, B)} from an adapter tree, checking its leaf names."""
    flat = flatten(adapters)
    out: dict[str, list] = {}
    bad = []
    for k, v in flat.items():
        base, _, leaf = k.rpartition(".")
        if leaf not in ("lora_A", "lora_B") or not base:
            bad.append(k)
            continue
        out.setdefault(base, [None, None])[0 if leaf == "lora_A" else 1] = v
    half = [f"{p}.{'lora_B' if ab[0] is not None else 'lora_A'}" for p, ab in out.items()
            if ab[0] is None or ab[1] is None]
    if bad or half:
        msg = []
        if bad:
            msg.append(f"leaves not named <path>.lora_A / <path>.lora_B: {bad}")
        if half:
            msg.append(f"missing halves: {half}")
        raise ValueError("adapter tree is malformed: " + "; ".join(msg))
    return {p: (a, b) for p, (a, b) in out.items()}


def _check(pairs, flat_params, cfg: LoraConfig) -> None:
    problems = []
    for p, (a, b) in pairs.items():
        w = flat_params.get(p)
        if w is None:
            problems.append(f"{p}: no such leaf in params")
            continue
        if (getattr(w, "ndim", 0) or 0) < 2:
            problems.append(f"{p}: base leaf must be >= 2-D, got shape {tuple(getattr(w, 'shape', ()))}")
            continue
        *stack, d_out, d_in = w.shape
        want_a, want_b = (*stack, cfg.rank, d_in), (*stack, d_out, cfg.rank)
        if tuple(a.shape) != want_a:
            problems.append(f"{p}.lora_A: expected shape {want_a}, got {tuple(a.shape)}")
        if tuple(b.shape) != want_b:
            problems.append(f"{p}.lora_B: expected shape {want_b}, got {tuple(b.shape)}")
    if problems:
        raise ValueError(f"adapters do not fit params (rank {cfg.rank}):\n  " + "\n  ".join(problems))


def _delta(a: mx.array, b: mx.array, cfg: LoraConfig, key) -> mx.array:
    """s * B @ A, batched over stack axes (with the per-call input-feature dropout on A, one mask
    per matrix, when ``key`` is given)."""
    if key is not None and cfg.dropout > 0.0:
        keep = mx.random.bernoulli(1.0 - cfg.dropout, (*a.shape[:-2], 1, a.shape[-1]), key=key)
        a = mx.where(keep, a * (1.0 / (1.0 - cfg.dropout)), mx.zeros_like(a))
    return cfg.scale * (b @ a)


def _edit(params, adapters, cfg: LoraConfig, sign: float, key=None):
    pairs = _pairs(adapters)
    flat = flatten(params)
    _check(pairs, flat, cfg)
    keys = {}
    if key is not None and cfg.dropout > 0.0 and pairs:
        keys = dict(zip(pairs, mx.random.split(key, len(pairs))))

    def edit(path, w):
        ab = pairs.get(path)
        if ab is None:
            return w
        d = _delta(ab[0], ab[1], cfg, keys.get(path))
        # W + d in the wider of the two dtypes, one rounding back to W's dtype.
        return (w + d if sign > 0 else w - d).astype(w.dtype)

    return tree_map_with_path(edit, params)


def apply_lora(params, adapters, cfg: LoraConfig, key: mx.array | None = None):
    """``params`` with every adapted ``W`` replaced by ``W + (alpha/r) B @ A``, eq. (1).

    Same structure, key order and dtypes as ``params`` (the delta is computed in the adapters'
    dtype and added in the wider dtype, then cast back to W's); leaves without an adapter are
    shared, not copied. Differentiable w.r.t. ``adapters`` (and ``params``); use it inside the loss::

        loss = lambda ad, params, batch: ce(model.apply(apply_lora(params, ad, cfg), batch))
        grads = mx.grad(loss)(adapters, params, batch)          # a tree shaped like adapters

    ``key``: with ``cfg.dropout > 0``, draws the weight-delta dropout masks (module docstring).
    Raises ``ValueError`` naming each adapter path that is missing from ``params`` or mis-shaped.
    """
    return _edit(params, adapters, cfg, +1.0, key)


def merge_lora(params, adapters, cfg: LoraConfig):
    """The merged base tree ``W + (alpha/r) B @ A`` (no dropout): ship it as a plain checkpoint."""
    return _edit(params, adapters, cfg, +1.0, None)


def unmerge_lora(merged, adapters, cfg: LoraConfig):
    """Inverse of ``merge_lora``: ``W' - (alpha/r) B @ A``. Exact up to one rounding per
    element in fp32 (``|err| <= ulp(|W'|)``); in bf16 the merge itself already rounded."""
    return _edit(merged, adapters, cfg, -1.0, None)


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------


def _skeleton(adapters):
    """The adapter tree with each {"lora_A", "lora_B"} pair replaced by a marker (JSON-able)."""
    pairs = _pairs(adapters)

    def go(node, path):
        if path in pairs:
            return _TARGET_MARK
        if isinstance(node, dict):
            return {k: go(v, f"{path}.{k}" if path else k) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [go(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(node)]
        raise ValueError(f"adapter tree is malformed at '{path}': {type(node).__name__}")

    return go(adapters, "")


def save_adapters(path, adapters, cfg: LoraConfig) -> None:
    """Write ``path/adapters.safetensors`` and ``path/adapter_config.json``, each atomically.

    The JSON holds ``{"format": "alloy.lora", "version": 1, "config": cfg.to_dict(),
    "tree": skeleton}``; the skeleton is the adapter tree with ``"lora"`` at each target and
    ``{}`` holes, so loading restores the exact structure and key order. The weights are written
    first: a config file always describes a complete weights file.
    """
    if not isinstance(cfg, LoraConfig):
        raise TypeError(f"save_adapters: cfg must be a LoraConfig, got {type(cfg).__name__}")
    pairs = _pairs(adapters)
    if not pairs:
        raise ValueError("save_adapters: the adapter tree holds no adapters")
    bad = [f"{p}: lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}" for p, (a, b) in pairs.items()
           if a.ndim < 2 or b.ndim < 2 or a.shape[-2] != cfg.rank or b.shape[-1] != cfg.rank]
    if bad:
        raise ValueError(f"save_adapters: adapters do not have rank {cfg.rank}:\n  " + "\n  ".join(bad))
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    meta = {"format": _FORMAT, "version": _VERSION, "config": cfg.to_dict(), "tree": _skeleton(adapters)}
    save_safetensors(root / ADAPTER_WEIGHTS, flatten(adapters), metadata={"format": _FORMAT})
    atomic_write(root / ADAPTER_CONFIG, json.dumps(meta, indent=2) + "\n")


def load_adapters(path) -> tuple[Any, LoraConfig]:
    """``(adapters, cfg)`` from a directory written by ``save_adapters`` (bit-exact, same order).

    Strict: a missing file, a foreign or newer format, unknown config fields, a malformed
    skeleton, and tensors missing / unexpected / of the wrong rank are all errors
    (``ValueError`` / ``FileNotFoundError`` / ``alloy.params.CheckpointError`` listing every
    offending key at once).
    """
    root = Path(path)
    cpath, wpath = root / ADAPTER_CONFIG, root / ADAPTER_WEIGHTS
    for p in (cpath, wpath):
        if not p.is_file():
            raise FileNotFoundError(f"load_adapters: {p} not found (expected {ADAPTER_CONFIG} and "
                                    f"{ADAPTER_WEIGHTS} in {root})")
    try:
        meta = load_json(cpath)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cpath}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise ValueError(f"{cpath}: not an alloy LoRA adapter config (want \"format\": \"{_FORMAT}\")")
    if meta.get("version") != _VERSION:
        raise ValueError(f"{cpath}: adapter format version {meta.get('version')!r} is not supported "
                         f"(want {_VERSION})")
    unknown = sorted(set(meta) - {"format", "version", "config", "tree"})
    if unknown:
        raise ValueError(f"{cpath}: unknown key(s) {unknown}")
    for k in ("config", "tree"):
        if k not in meta:
            raise ValueError(f"{cpath}: missing key {k!r}")
    try:
        cfg = LoraConfig.from_dict(meta["config"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{cpath}: {e}") from None
    flat = load_safetensors(wpath)

    missing, used, other = [], set(), []

    def take(p, mark):
        if mark != _TARGET_MARK:
            other.append(f"skeleton leaf at '{p}' is {mark!r}, expected {_TARGET_MARK!r}")
            return mark
        out = {}
        for name in ("lora_A", "lora_B"):
            k = f"{p}.{name}"
            if k not in flat:
                missing.append(k)
                continue
            v = flat[k]
            used.add(k)
            r_axis = -2 if name == "lora_A" else -1
            if v.ndim < 2 or v.shape[r_axis] != cfg.rank:
                want = (f"(..., rank={cfg.rank}, d_in)" if name == "lora_A"
                        else f"(..., d_out, rank={cfg.rank})")
                other.append(f"{k}: expected shape {want}, got {tuple(v.shape)}")
            out[name] = v
        return out

    skeleton = meta["tree"]
    if not is_container(skeleton):
        raise ValueError(f"{cpath}: 'tree' must be a nested object, got {type(skeleton).__name__}")
    adapters = tree_map_with_path(take, skeleton)
    unexpected = [k for k in flat if k not in used]
    if missing or unexpected or other:
        raise CheckpointError(missing=missing, unexpected=unexpected, other=other, source=str(root))
    return adapters, cfg


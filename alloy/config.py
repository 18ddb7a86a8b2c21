"""``ModelConfig``: the frozen, validated description of a hybrid stack.

JSON form (every key optional except vocab_size, d_model, layer_types)::

    {"vocab_size": 256, "d_model": 256,
     "layer_types": ["mamba2", "mamba2", "local", "attention"],   # mixer name per depth
     "ffn_types":   ["none",   "none",   "mlp",   "mlp"],         # FFN name per depth ("none": no FFN)
     "mixers": {"attention": {"n_heads": 4, "n_kv_heads": 2},     # settings per name;
                "local": {"kind": "attention", "window": 64}},     # a name may alias a kind
     "ffns": {"mlp": {"d_ff": 512}},
     "norm_eps": 1e-5, "tie_embeddings": true, "dtype": "float32"}

A name in ``layer_types`` that has no entry in ``mixers`` is a kind with default settings.
``ffn_types`` defaults to "mlp" at every depth (the Alloy block: mixer then FFN).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from alloy.layers.registry import LayerSettings, get_layer, make_settings

DTYPES = ("float32", "bfloat16", "float16")
_TOP_FIELDS = ("vocab_size", "d_model", "layer_types", "ffn_types", "mixers", "ffns", "norm_eps",
               "tie_embeddings", "init_std", "dtype", "name", "embedding_multiplier", "residual_multiplier",
               "logits_scaling", "logits_soft_cap", "shared", "block_style", "residual_scales", "hyper")
BLOCK_STYLES = ("pre_norm", "norm_residual", "hyper")
_HYPER_DEFAULTS = {"streams": 4, "sinkhorn_iters": 20, "eps": 1e-6}


def _resolve(role: str, names: tuple[str, ...], given: Any, d_model: int) -> tuple:
    """-> ((name, kind, settings), ...) for every name used, in first-use order."""
    if isinstance(given, tuple):  # already resolved (dataclasses.replace / copy)
        given = {n: s for n, _, s in given}
    if not isinstance(given, Mapping):
        raise ValueError(f"{role}s must be a mapping of name -> settings, got {type(given).__name__}")
    extra = sorted(set(given) - set(names))
    if extra:
        raise ValueError(f"{role}s: {extra} defined but not used in {role if role == 'ffn' else 'layer'}_types")
    out = []
    for name in dict.fromkeys(names):
        if name == "none":
            continue
        entry = given.get(name, {})
        if isinstance(entry, LayerSettings):
            kind = _kind_of(role, name, entry)
            settings = dataclasses.replace(entry, d_model=d_model)
        elif isinstance(entry, Mapping):
            fields = dict(entry)
            kind = fields.pop("kind", name)
            if not isinstance(kind, str):
                raise ValueError(f"{role}s.{name}.kind must be a string, got {kind!r}")
            settings = make_settings(role, name, kind, fields, d_model)
        else:
            raise ValueError(f"{role}s.{name} must be a mapping of settings, got {type(entry).__name__}")
        out.append((name, kind, settings))
    return tuple(out)


def _kind_of(role: str, name: str, settings: LayerSettings) -> str:
    """The kind a settings object belongs to: ``name`` itself if it fits, else its class's kind."""
    from alloy.layers.registry import registered
    kinds = [k for k in registered(role) if type(settings) is get_layer(role, k).settings]
    if not kinds:
        raise ValueError(f"{role}s.{name}: no registered {role} kind uses {type(settings).__name__}")
    return name if name in kinds else kinds[0]


def _with_vocab(where: str, settings, vocab: int):
    """Settings carrying a ``vocab_size`` (a token-indexed table, e.g. hash_moe's tid2eid): 0 takes
    the model's; any other value must equal it."""
    v = getattr(settings, "vocab_size", None)
    if v is None or v == vocab:
        return settings
    if v == 0:
        return dataclasses.replace(settings, vocab_size=vocab)
    raise ValueError(f"{where}.vocab_size {v} differs from the model's vocab_size {vocab}")


def _hyper_settings(h) -> tuple:
    """Validated hyper-connection settings as a sorted tuple of (key, value) (hashable)."""
    if h is None:
        h = {}
    if not isinstance(h, (Mapping, tuple)):
        raise ValueError(f"ModelConfig.hyper must be a mapping {sorted(_HYPER_DEFAULTS)}, got {type(h).__name__}")
    h = dict(h)
    unknown = sorted(set(h) - set(_HYPER_DEFAULTS))
    if unknown:
        raise ValueError(f"ModelConfig.hyper: unknown field(s) {unknown}; allowed: {sorted(_HYPER_DEFAULTS)}")
    h = {**_HYPER_DEFAULTS, **h}
    for k in ("streams", "sinkhorn_iters"):
        if not isinstance(h[k], int) or isinstance(h[k], bool) or h[k] < 1:
            raise ValueError(f"ModelConfig.hyper.{k} must be a positive int, got {h[k]!r}")
    if isinstance(h["eps"], bool) or not isinstance(h["eps"], (int, float)) or not 0 <= h["eps"] < 1:
        raise ValueError(f"ModelConfig.hyper.eps must be in [0, 1), got {h['eps']!r}")
    return tuple(sorted((k, float(v) if k == "eps" else v) for k, v in h.items()))


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int
    layer_types: tuple[str, ...]
    ffn_types: tuple[str, ...] | None = None
    mixers: Any = field(default_factory=dict)
    ffns: Any = field(default_factory=dict)
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02  # embedding / untied head init (GPT-2 scale); layers init their own weights
    dtype: str = "float32"  # parameter / activation dtype; A_log, D, dt_bias and SSM states stay fp32
    name: str = "alloy"
    # scalar multipliers (Granite / Falcon-H1 style; 1.0 = off):
    embedding_multiplier: float = 1.0  # h0 = embed(tokens) * m
    residual_multiplier: float = 1.0  # h = h + m * block(h)
    logits_scaling: float = 1.0  # logits = head(h) / s
    logits_soft_cap: float = 0.0  # logits = cap * tanh(logits / cap) (Gemma); 0: off
    # shared transformer blocks reused at several depths (Zamba2); see alloy.layers.shared
    shared: Any = None
    # "pre_norm": h + r * f(norm(h)).  "norm_residual" (MiniMax): x = norm(h); h = alpha * x + beta * f(x),
    # with (alpha, beta) per mixer name and for "ffn" in residual_scales.
    # "hyper" (DeepSeek-V4's manifold-constrained hyper-connections): `streams` residual streams mixed
    # by Sinkhorn-normalised weights; hyper = {"streams", "sinkhorn_iters", "eps"} (alloy.layers.hyper)
    block_style: str = "pre_norm"
    residual_scales: Any = None
    hyper: Any = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        for k in ("vocab_size", "d_model"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"ModelConfig.{k} must be a positive int, got {v!r}")
        lt = self.layer_types
        if isinstance(lt, str) or not isinstance(lt, (list, tuple)) or not lt:
            raise ValueError(f"ModelConfig.layer_types must be a non-empty list of mixer names, got {lt!r}")
        if not all(isinstance(t, str) for t in lt):
            raise ValueError(f"ModelConfig.layer_types entries must be strings, got {lt!r}")
        set_("layer_types", tuple(lt))
        ft = self.ffn_types
        if ft is None:
            ft = ("mlp",) * len(lt)
        if isinstance(ft, str) or not isinstance(ft, (list, tuple)):
            raise ValueError(f"ModelConfig.ffn_types must be a list of FFN names, got {ft!r}")
        if len(ft) != len(lt):
            raise ValueError(f"ModelConfig.ffn_types has {len(ft)} entries but layer_types has {len(lt)}")
        set_("ffn_types", tuple(ft))
        if self.dtype not in DTYPES:
            raise ValueError(f"ModelConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not isinstance(self.norm_eps, (int, float)) or not 0 < self.norm_eps < 1:
            raise ValueError(f"ModelConfig.norm_eps must be in (0, 1), got {self.norm_eps!r}")
        if not isinstance(self.init_std, (int, float)) or self.init_std <= 0:
            raise ValueError(f"ModelConfig.init_std must be positive, got {self.init_std!r}")
        for k in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"ModelConfig.{k} must be a positive number, got {v!r}")
            set_(k, float(v))
        if isinstance(self.logits_soft_cap, bool) or not isinstance(self.logits_soft_cap, (int, float)) \
                or self.logits_soft_cap < 0:
            raise ValueError(f"ModelConfig.logits_soft_cap must be >= 0 (0 = off), got {self.logits_soft_cap!r}")
        set_("logits_soft_cap", float(self.logits_soft_cap))
        if self.block_style not in BLOCK_STYLES:
            raise ValueError(f"ModelConfig.block_style must be one of {BLOCK_STYLES}, got {self.block_style!r}")
        if self.block_style == "hyper":
            set_("hyper", _hyper_settings(self.hyper))
            if self.shared is not None or self.residual_multiplier != 1.0:
                raise ValueError("ModelConfig: block_style 'hyper' does not combine with shared blocks or a "
                                 "residual_multiplier")
        elif self.hyper is not None:
            raise ValueError("ModelConfig.hyper is only used with block_style 'hyper'")
        if self.block_style == "norm_residual":
            rs = self.residual_scales
            if not isinstance(rs, (dict, tuple)):
                raise ValueError("ModelConfig.residual_scales: norm_residual needs {name: [alpha, beta], 'ffn': [...]}")
            rs = dict(rs)
            need = sorted((set(lt) - {"none"}) | ({"ffn"} if set(ft) - {"none"} else set()))
            missing = [n for n in need if n not in rs]
            extra = sorted(set(rs) - set(need))
            if missing or extra:
                raise ValueError(f"ModelConfig.residual_scales: missing {missing}, unexpected {extra}")
            for n, ab in rs.items():
                if not (isinstance(ab, (list, tuple)) and len(ab) == 2
                        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in ab)):
                    raise ValueError(f"ModelConfig.residual_scales.{n} must be [alpha, beta], got {ab!r}")
            set_("residual_scales", tuple((n, (float(a), float(b))) for n, (a, b) in sorted(rs.items())))
        elif self.residual_scales is not None:
            raise ValueError("ModelConfig.residual_scales is only used with block_style 'norm_residual'")
        if all(t == "none" for t in lt) and all(f == "none" for f in ft):
            raise ValueError("ModelConfig: every layer has layer_types 'none' and ffn_types 'none'")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"ModelConfig.tie_embeddings must be a bool, got {self.tie_embeddings!r}")
        set_("mixers", _resolve("mixer", self.layer_types, self.mixers, self.d_model))
        if self.shared is not None:
            from alloy.layers.shared import SharedBlocks
            if not isinstance(self.shared, SharedBlocks):
                set_("shared", SharedBlocks.from_dict(self.shared, self.d_model, len(lt)))
            bad = [i for i in self.shared.at if lt[i] == "none"]
            if bad:
                raise ValueError(f"ModelConfig.shared.at: depths {bad} have no mixer to feed")
        set_("ffns", _resolve("ffn", self.ffn_types, self.ffns, self.d_model))
        set_("ffns", tuple((n, k, _with_vocab(f"ffns.{n}", s, self.vocab_size)) for n, k, s in self.ffns))

    # -- lookups -----------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layer_types)

    def mixer(self, i: int):
        """(kind, settings) of the mixer at depth i, or None for "none" (an FFN-only layer)."""
        name = self.layer_types[i]
        if name == "none":
            return None
        for n, kind, s in self.mixers:
            if n == name:
                return kind, s
        raise KeyError(name)

    def mixer_kind(self, i: int) -> str:
        """The mixer kind at depth i, "none" for an FFN-only layer."""
        m = self.mixer(i)
        return "none" if m is None else m[0]

    def ffn_kind(self, i: int) -> str:
        """The FFN kind at depth i, "none" for a mixer-only layer."""
        f = self.ffn(i)
        return "none" if f is None else f[0]

    def ffn(self, i: int):
        """(kind, settings) of the FFN at depth i, or None for "none"."""
        name = self.ffn_types[i]
        if name == "none":
            return None
        for n, kind, s in self.ffns:
            if n == name:
                return kind, s
        raise KeyError(name)

    # -- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        def settings_dict(kind, s):
            return {"kind": kind, **s.to_dict()}

        return {
            "name": self.name,
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "layer_types": list(self.layer_types),
            "ffn_types": list(self.ffn_types),
            "mixers": {n: settings_dict(k, s) for n, k, s in self.mixers},
            "ffns": {n: settings_dict(k, s) for n, k, s in self.ffns},
            "norm_eps": self.norm_eps,
            "tie_embeddings": self.tie_embeddings,
            "init_std": self.init_std,
            "dtype": self.dtype,
            "embedding_multiplier": self.embedding_multiplier,
            "residual_multiplier": self.residual_multiplier,
            "logits_scaling": self.logits_scaling,
            "logits_soft_cap": self.logits_soft_cap,
            **({"shared": self.shared.to_dict()} if self.shared is not None else {}),
            **({"block_style": self.block_style,
                "residual_scales": {n: list(ab) for n, ab in self.residual_scales}}
               if self.block_style == "norm_residual" else {}),
            **({"block_style": self.block_style, "hyper": dict(self.hyper)} if self.block_style == "hyper" else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: Mapping) -> "ModelConfig":
        if not isinstance(d, Mapping):
            raise ValueError(f"model config must be a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - set(_TOP_FIELDS))
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {unknown}; allowed: {list(_TOP_FIELDS)}")
        missing = [k for k in ("vocab_size", "d_model", "layer_types") if k not in d]
        if missing:
            raise ValueError(f"ModelConfig: missing required field(s) {missing}")
        return cls(**dict(d))

    @classmethod
    def from_json(cls, path_or_text: str | os.PathLike) -> "ModelConfig":
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            with open(path_or_text) as f:
                text = f.read()
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"model config is not valid JSON: {e}") from None
        return cls.from_dict(d)

"""The search space of ``alloy research``: YAML -> a validated ``SearchSpace``; points -> configs.

YAML (every top-level key below is allowed, unknown keys are errors; see
``alloy/configs/research/space.yaml`` for a commented example)::

    seed: 0                        # model init, data order and the proposal RNG
    max_experiments: 8             # default for --max-experiments
    train: {batch_size: 16, seq_len: 128, lr: 3.0e-3, warmup: 10, weight_decay: 0.1,
            corpus_bytes: 4000000, val_fraction: 0.05, eval_batches: 8}
    model: {vocab_size: 256, ffn: mlp, tie_embeddings: true,
            mixers: {mamba2: {head_dim: 32, chunk_size: 64}},   # fixed settings per mixer name
            ffns: {mlp: {d_ff: 0}}}
    patterns: {attention: [attention], mamba2: [mamba2], hybrid: [mamba2, mamba2, mamba2, attention]}
    space:                         # each dimension: the ordered list of values it may take
      pattern: [attention, mamba2, hybrid]
      depth: [2, 4, 6]
      d_model: [64, 96, 128]
      d_state: [16, 32, 64]
      n_heads: [2, 4, 8]
      n_kv_heads: [1, 2, 4]
    start:                         # points run first, in order (missing dims: the first value)
      - {pattern: hybrid, depth: 4, d_model: 96}

A point is ``{dimension: value}``. Its config tiles the pattern to ``depth`` layers, each followed by
the FFN ``model.ffn`` ("none" for none); ``d_state`` goes to every mixer whose settings have a
``d_state`` field, ``n_heads`` / ``n_kv_heads`` to every mixer that has those fields (found through
the layer registry, so a new mixer kind joins the search by being named in a pattern).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from alloy.config import ModelConfig
from alloy.layers.registry import get_layer

DIMENSIONS = ("pattern", "depth", "d_model", "d_state", "n_heads", "n_kv_heads")
_TOP = ("seed", "max_experiments", "train", "model", "patterns", "space", "start")
_MODEL_KEYS = ("vocab_size", "ffn", "tie_embeddings", "mixers", "ffns", "norm_eps")


@dataclass(frozen=True)
class TrainSettings:
    """Fixed for every experiment of a search (only the architecture varies)."""

    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3          # AdamW peak lr, constant after a linear warmup (the budget fixes no step count)
    warmup: int = 10
    weight_decay: float = 0.1
    clip: float = 1.0
    corpus_bytes: int = 4_000_000  # first bytes of the stdlib corpus (sorted files)
    val_fraction: float = 0.05     # share of files held out (by a hash of the file name)
    eval_batches: int = 8          # validation batches of batch_size x seq_len bytes, same for all

    def __post_init__(self):
        for f in ("batch_size", "seq_len", "eval_batches", "corpus_bytes"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"train.{f} must be a positive int, got {v!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"train.warmup must be a non-negative int, got {self.warmup!r}")
        for f in ("lr", "clip"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or v <= 0:
                raise ValueError(f"train.{f} must be positive, got {v!r}")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise ValueError(f"train.weight_decay must be >= 0, got {self.weight_decay!r}")
        if not isinstance(self.val_fraction, (int, float)) or not 0 < self.val_fraction < 1:
            raise ValueError(f"train.val_fraction must be in (0, 1), got {self.val_fraction!r}")


@dataclass(frozen=True)
class SearchSpace:
    space: dict                    # dimension -> tuple of allowed values (ordered)
    patterns: dict                 # pattern name -> tuple of mixer names
    train: TrainSettings = field(default_factory=TrainSettings)
    model: dict = field(default_factory=dict)
    start: tuple = ()
    seed: int = 0
    max_experiments: int = 8

    def complete(self, point: Mapping) -> dict:
        """``point`` with missing dimensions set to their first value; ValueError on a value or a
        dimension outside the space."""
        bad = sorted(set(point) - set(self.space))
        if bad:
            raise ValueError(f"point {dict(point)}: unknown dimension(s) {bad}; space has {list(self.space)}")
        out = {}
        for d, values in self.space.items():
            v = point.get(d, values[0])
            if v not in values:
                raise ValueError(f"point {dict(point)}: {d} = {v!r} is not in the space {list(values)}")
            out[d] = v
        return out

    def to_config(self, point: Mapping) -> ModelConfig:
        """The ModelConfig of a (completed) point; ValueError (from the config) if it is invalid,
        e.g. n_heads not dividing d_model."""
        p = self.complete(point)
        m = self.model
        pattern = self.patterns[p["pattern"]]
        depth = p.get("depth", len(pattern))
        layer_types = [pattern[i % len(pattern)] for i in range(depth)]
        mixers = {}
        for name in dict.fromkeys(layer_types):
            s = dict(m.get("mixers", {}).get(name, {}))
            fields = get_layer("mixer", s.get("kind", name)).settings.user_fields()
            for dim in ("d_state", "n_heads", "n_kv_heads"):
                if dim in p and dim in fields:
                    s[dim] = p[dim]
            mixers[name] = s
        ffn = m.get("ffn", "mlp")
        return ModelConfig(
            vocab_size=m.get("vocab_size", 256), d_model=p.get("d_model", 64),
            layer_types=tuple(layer_types), ffn_types=(ffn,) * depth, mixers=mixers,
            ffns={} if ffn == "none" else {ffn: dict(m.get("ffns", {}).get(ffn, {}))},
            tie_embeddings=m.get("tie_embeddings", True), norm_eps=m.get("norm_eps", 1e-5),
            name=f"research-{p['pattern']}-L{depth}")

    def is_valid(self, point: Mapping) -> bool:
        try:
            self.to_config(point)
            return True
        except ValueError:
            return False


def experiment_id(space: SearchSpace, point: Mapping, budget_s: float | None = None) -> str:
    """A stable id of what an experiment trains: the model config the point makes (so points that
    differ only in a dimension the pattern ignores, e.g. d_state of pure attention, share an id),
    the training settings, the seed and the budget. A recorded result is reused on resume only if
    all of these match. ValueError for a point outside the space or an invalid config."""
    cfg = space.to_config(point).to_dict()
    cfg.pop("name")
    key = {"config": cfg, "train": dataclasses.asdict(space.train), "seed": space.seed}
    if budget_s is not None:
        key["budget_s"] = round(float(budget_s), 3)
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
    p = space.complete(point)
    return f"{p['pattern']}-L{len(cfg['layer_types'])}-d{cfg['d_model']}-{digest}"


def _as_tuple_list(name, v, unique=True) -> tuple:
    if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)) or not v:
        raise ValueError(f"{name} must be a non-empty list, got {v!r}")
    if unique and len(set(map(repr, v))) != len(v):
        raise ValueError(f"{name} has repeated values: {v!r}")
    return tuple(v)


def parse_space(d: Mapping) -> SearchSpace:
    """Validate a decoded YAML mapping; errors name the key."""
    if not isinstance(d, Mapping):
        raise ValueError(f"search space must be a mapping, got {type(d).__name__}")
    bad = sorted(set(d) - set(_TOP))
    if bad:
        raise ValueError(f"search space: unknown key(s) {bad}; allowed: {list(_TOP)}")
    for k in ("patterns", "space"):
        if k not in d:
            raise ValueError(f"search space: missing required key {k!r}")
    train = d.get("train") or {}
    unknown = sorted(set(train) - {f.name for f in dataclasses.fields(TrainSettings)})
    if unknown:
        raise ValueError(f"train: unknown key(s) {unknown}; allowed: "
                         f"{[f.name for f in dataclasses.fields(TrainSettings)]}")
    tset = TrainSettings(**train)
    model = dict(d.get("model") or {})
    unknown = sorted(set(model) - set(_MODEL_KEYS))
    if unknown:
        raise ValueError(f"model: unknown key(s) {unknown}; allowed: {list(_MODEL_KEYS)}")
    patterns = d["patterns"]
    if not isinstance(patterns, Mapping) or not patterns:
        raise ValueError("patterns must be a mapping of name -> list of mixer names")
    pats = {str(k): _as_tuple_list(f"patterns.{k}", v, unique=False) for k, v in patterns.items()}
    for k, names in pats.items():
        for n in names:
            kind = (model.get("mixers", {}).get(n) or {}).get("kind", n)
            get_layer("mixer", kind)  # ValueError naming the unknown kind and the registered ones
    space = d["space"]
    if not isinstance(space, Mapping) or not space:
        raise ValueError("space must be a mapping of dimension -> list of values")
    bad = sorted(set(space) - set(DIMENSIONS))
    if bad:
        raise ValueError(f"space: unknown dimension(s) {bad}; allowed: {list(DIMENSIONS)}")
    if "pattern" not in space:
        raise ValueError("space: the 'pattern' dimension is required")
    dims = {k: _as_tuple_list(f"space.{k}", v) for k, v in space.items()}
    missing = sorted(set(dims["pattern"]) - set(pats))
    if missing:
        raise ValueError(f"space.pattern: {missing} not defined under patterns ({list(pats)})")
    for k, vals in dims.items():
        if k != "pattern" and not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in vals):
            raise ValueError(f"space.{k} values must be positive ints, got {list(vals)}")
    seed = d.get("seed", 0)
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    s = SearchSpace(dims, pats, tset, model, (), seed, d.get("max_experiments", 8))
    if not isinstance(s.max_experiments, int) or s.max_experiments <= 0:
        raise ValueError(f"max_experiments must be a positive int, got {s.max_experiments!r}")
    start = d.get("start") or []
    if not isinstance(start, list):
        raise ValueError(f"start must be a list of points, got {start!r}")
    pts = []
    for i, p in enumerate(start):
        if not isinstance(p, Mapping):
            raise ValueError(f"start[{i}] must be a mapping of dimension -> value, got {p!r}")
        try:
            s.to_config(p)
        except ValueError as e:
            raise ValueError(f"start[{i}]: {e}") from None
        pts.append(s.complete(p))
    s.to_config(s.complete({}))  # the model section itself must make a valid config
    return dataclasses.replace(s, start=tuple(pts))


def load_space(path) -> SearchSpace:
    """Read and validate a YAML (or JSON) search space file, or a bundled name ("space")."""
    import yaml
    p = Path(path)
    if not p.exists() and p.suffix == "" and len(p.parts) == 1:
        from importlib import resources
        p = Path(str(resources.files("alloy") / "configs" / "research" / f"{path}.yaml"))
    if not p.is_file():
        raise FileNotFoundError(f"search space file not found: {path}")
    try:
        d = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML: {e}") from None
    try:
        return parse_space(d)
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None


def neighbours(values: tuple, v: Any) -> list:
    """Values one step from ``v`` in an ordered dimension (all others for a categorical one)."""
    i = values.index(v)
    if all(isinstance(x, int) for x in values):
        return [values[j] for j in (i - 1, i + 1) if 0 <= j < len(values)]
    return [x for x in values if x != v]

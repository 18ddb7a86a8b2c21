"""Parallel mixers: several token mixers read the same normed input and their outputs add up
(Falcon-H1's attention + Mamba-2 in every layer; the ``parallel`` combinator of stax, as data).

    y = sum_b mixer_b(x)          params {branch: params_b}, state {branch: state_b}

Settings name the branches in order, each a mixer kind with its own settings::

    "mixers": {"hybrid": {"kind": "parallel",
                          "branches": {"mamba": {"kind": "mamba2", "head_dim": 64},
                                       "self_attn": {"kind": "attention", "n_heads": 8}}}}

Scalar input/output multipliers are folded into the branch projections by converters, so the
combinator itself is a plain sum.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

from alloy.layers.registry import LayerSettings, get_mixer, make_settings, register_mixer
from alloy.params import init as I


@dataclass(frozen=True)
class ParallelSettings(LayerSettings):
    branches: tuple = ()  # ((name, kind, settings), ...) once built; a {name: {"kind": ..., ...}} mapping in JSON

    def __post_init__(self):
        b = self.branches
        if isinstance(b, Mapping):
            out = []
            for name, fields in b.items():
                if isinstance(fields, LayerSettings):
                    raise ValueError(f"branches.{name}: give settings as a mapping with a 'kind'")
                if not isinstance(fields, Mapping) or not isinstance(fields.get("kind"), str):
                    raise ValueError(f"branches.{name} must be a mapping with a string 'kind'")
                f = dict(fields)
                kind = f.pop("kind")
                if kind == "parallel":
                    raise ValueError(f"branches.{name}: a parallel mixer cannot nest another")
                out.append((name, kind, make_settings("mixer", f"branches.{name}", kind, f, self.d_model)))
            b = tuple(out)
        elif isinstance(b, (list, tuple)):
            b = tuple((n, k, dataclasses.replace(s, d_model=self.d_model)) for n, k, s in b)
        object.__setattr__(self, "branches", b)
        super().__post_init__()

    def validate(self):
        if len(self.branches) < 2:
            raise ValueError(f"branches: a parallel mixer needs at least two, got {len(self.branches)}")
        names = [n for n, _, _ in self.branches]
        if len(set(names)) != len(names) or any("." in n or not n for n in names):
            raise ValueError(f"branches: names must be unique, non-empty and dot-free, got {names}")

    def to_dict(self) -> dict:
        return {"branches": {n: {"kind": k, **s.to_dict()} for n, k, s in self.branches}}


def init(key, cfg: ParallelSettings) -> dict:
    keys = I.split(key, len(cfg.branches))
    return {n: get_mixer(k).init(kk, s) for kk, (n, k, s) in zip(keys, cfg.branches)}


def init_state(cfg: ParallelSettings, batch: int, max_len: int, dtype=None) -> dict:
    return {n: get_mixer(k).init_state(s, batch, max_len, dtype) for n, k, s in cfg.branches}


@register_mixer("parallel", settings=ParallelSettings, init=init, init_state=init_state, state="kv",
                mask="causal")
def apply(params, x, state, cfg: ParallelSettings):
    y, new = None, {}
    valid = None if state is None else state.get("valid")
    for n, k, s in cfg.branches:
        s_in = None if state is None else (state[n] if valid is None else {**state[n], "valid": valid})
        yb, new[n] = get_mixer(k).apply(params[n], x, s_in, s)
        y = yb if y is None else y + yb
    return y, (None if state is None else new)

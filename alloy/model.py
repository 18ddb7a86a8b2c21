"""The public model bundle: ``alloy.build(config) -> Model``."""
from __future__ import annotations

import os
from functools import partial
from typing import Any, Callable, Mapping, NamedTuple

from alloy.config import ModelConfig
from alloy.layers import stack
from alloy.layers.common import dtype_of
from alloy.params.tree import cast


class Model(NamedTuple):
    """An immutable bundle of a validated config and pure functions closed over it.

    init(key) -> params;  init_state(batch, max_len, dtype=None) -> state;
    apply(params, tokens, state=None) -> (logits, state). ``mx.compile(model.apply)`` works as is.
    """

    config: ModelConfig
    init: Callable
    init_state: Callable
    apply: Callable


def as_config(config: Any) -> ModelConfig:
    if isinstance(config, ModelConfig):
        return config
    if isinstance(config, Mapping):
        return ModelConfig.from_dict(config)
    if isinstance(config, (str, os.PathLike)):
        return ModelConfig.from_json(config)
    raise TypeError(f"build: expected a ModelConfig, a dict or a JSON path, got {type(config).__name__}")


def build(config: Any) -> Model:
    cfg = as_config(config)
    dtype = dtype_of(cfg.dtype)

    def init(key):
        return cast(stack.init(key, cfg), dtype)

    return Model(cfg, init, partial(stack.init_state, cfg), stack.make_apply(cfg))

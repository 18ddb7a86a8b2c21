"""The layer registry: token mixers and FFNs by kind name.

A layer is three pure functions plus a frozen settings dataclass::

    init(key, cfg) -> params
    init_state(cfg, batch, max_len, dtype) -> state        # {} for stateless layers
    apply(params, x, state, cfg) -> (y, state)              # state None: plain full forward

Registering is one decorator on ``apply``::

    @register_mixer("mamba2", settings=Mamba2Settings, init=init, init_state=init_state, state="ssm")
    def apply(params, x, state, cfg): ...

``state`` declares what the layer carries between calls ("none", "kv", "ssm": a fixed-size
recurrent state with a conv tail); ``mask`` declares how it sees the past ("causal",
"sliding", "none"). A layer registered with ``tokens=True`` also reads the call's token ids: the
stack calls ``apply(params, x, state, cfg, tokens=ids)`` (DeepSeek-V4's hash-routed MoE). The stack
never names mixer kinds: it looks them up here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

STATE_KINDS = ("none", "kv", "ssm")
MASK_KINDS = ("causal", "sliding", "none")


@dataclass(frozen=True)
class LayerSettings:
    """Base of every layer's settings. ``d_model`` is filled in by ``ModelConfig``."""

    d_model: int = 0

    def __post_init__(self):
        if not isinstance(self.d_model, int) or self.d_model <= 0:
            raise ValueError(f"{type(self).__name__}.d_model must be a positive int, got {self.d_model!r}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):  # JSON lists -> hashable tuples
                object.__setattr__(self, f.name, tuple(v))
        self.validate()

    def validate(self) -> None:
        """Override: raise ValueError naming the field and what is allowed."""

    @classmethod
    def user_fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "d_model")

    def to_dict(self) -> dict:
        """The JSON form of the user fields (``d_model`` comes from the model config)."""
        return {f: list(v) if isinstance(v, tuple) else v for f in self.user_fields() for v in (getattr(self, f),)}


@dataclass(frozen=True)
class LayerSpec:
    kind: str
    role: str  # "mixer" | "ffn"
    settings: type
    init: Callable
    init_state: Callable
    apply: Callable
    state: str = "none"
    mask: str = "none"
    tokens: bool = False  # apply also takes tokens=(B, T) int ids
    # optional fused pre-norm residual half-block for inference (decode):
    # residual_block(params, h, norm_weight, eps, state, settings) -> (h + mixer(rms_norm(h)), state),
    # or None where it does not apply (the stack then runs norm, apply and the residual add)
    residual_block: Callable | None = None
    # optional whole-stack decode for models whose every depth is this mixer (same settings, pre-norm,
    # no FFN): stack_prepare(layer_params_list, settings) -> (stacked dict, layer params list sharing
    # the stacks' buffers) | None (once per model, see ``alloy.layers.stack.prepare_decode``); stack_decode(stacked, h (B, 1, D), [mixer states],
    # norm_eps, settings, tag=first depth of the stretch) -> (h after the last block, [mixer states]) | None
    # where it does not apply
    stack_prepare: Callable | None = None
    stack_decode: Callable | None = None


_REGISTRY: dict[str, dict[str, LayerSpec]] = {"mixer": {}, "ffn": {}}


def _no_state(cfg, batch, max_len, dtype):
    return {}


def _register(role: str, kind: str, *, settings, init, init_state=None, state="none", mask="none",
              replace=False, tokens=False, residual_block=None, stack_decode=None):
    if state not in STATE_KINDS:
        raise ValueError(f"register_{role}({kind!r}): state must be one of {STATE_KINDS}, got {state!r}")
    if mask not in MASK_KINDS:
        raise ValueError(f"register_{role}({kind!r}): mask must be one of {MASK_KINDS}, got {mask!r}")
    if not (isinstance(settings, type) and issubclass(settings, LayerSettings)):
        raise TypeError(f"register_{role}({kind!r}): settings must subclass LayerSettings")
    if kind == "none" or "." in kind:
        raise ValueError(f"register_{role}: {kind!r} is not a valid kind name")

    def deco(apply):
        if kind in _REGISTRY[role] and not replace:
            raise ValueError(f"{role} kind {kind!r} is already registered (pass replace=True to override)")
        _REGISTRY[role][kind] = LayerSpec(kind, role, settings, init, init_state or _no_state, apply,
                                          state, mask, bool(tokens), residual_block,
                                          *(stack_decode or (None, None)))
        return apply

    return deco


def register_mixer(kind: str, *, settings, init, init_state=None, state="none", mask="causal",
                   replace=False, residual_block=None, stack_decode=None):
    """Decorator registering a token mixer's ``apply`` with its settings, init and init_state
    (and optionally a fused inference ``residual_block`` and a whole-stack decode given as the pair
    ``stack_decode=(stack_prepare, stack_decode)``, see ``LayerSpec``)."""
    return _register("mixer", kind, settings=settings, init=init, init_state=init_state, state=state,
                     mask=mask, replace=replace, residual_block=residual_block, stack_decode=stack_decode)


def register_ffn(kind: str, *, settings, init, init_state=None, replace=False, tokens=False):
    """Decorator registering a position-wise FFN's ``apply`` (FFNs carry no state); ``tokens=True``:
    apply also receives the token ids (``tokens=``)."""
    return _register("ffn", kind, settings=settings, init=init, init_state=init_state, replace=replace,
                     tokens=tokens)


def _ensure_builtins():
    from alloy.layers import builtin  # noqa: F401  (imports register the built-in layers)


def get_layer(role: str, kind: str) -> LayerSpec:
    _ensure_builtins()
    try:
        return _REGISTRY[role][kind]
    except KeyError:
        raise ValueError(f"unknown {role} kind {kind!r}; registered: {sorted(_REGISTRY[role])}") from None


def get_mixer(kind: str) -> LayerSpec:
    return get_layer("mixer", kind)


def get_ffn(kind: str) -> LayerSpec:
    return get_layer("ffn", kind)


def registered(role: str) -> list[str]:
    _ensure_builtins()
    return sorted(_REGISTRY[role])


def make_settings(role: str, name: str, kind: str, fields: dict[str, Any], d_model: int) -> LayerSettings:
    """Build a layer's settings from user fields, naming unknown fields and bad values."""
    spec = get_layer(role, kind)
    allowed = spec.settings.user_fields()
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise ValueError(f"{role}s.{name} ({kind}): unknown field(s) {unknown}; allowed: {list(allowed)}")
    try:
        return spec.settings(d_model=d_model, **fields)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{role}s.{name} ({kind}): {e}") from None

"""Feed-forward activations: SwiGLU and friends."""
from __future__ import annotations

import functools

import mlx.core as mx
import mlx.nn as nn


def swiglu(gate: mx.array, up: mx.array, fused: bool = False) -> mx.array:
    """silu(gate) * up (Shazeer 2020). gate, up: (..., F).

    fused (gate and up of one dtype): computed in float32 and rounded once, with a written-out
    gradient (dgate = dy up s (1 + gate (1 - s)), dup = dy gate s, s = sigmoid(gate)): on a GPU the
    kernels of `alloy.metal.swiglu` (one pass each way instead of autodiff's chain, which keeps
    sigmoid(gate) as its own launch for the backward), elsewhere the same math in MLX ops."""
    if fused and gate.dtype == up.dtype:
        from alloy import metal
        from alloy.metal import swiglu as kernels

        if metal.backend() is not None and kernels.applies(gate, up):
            return _swiglu_kernel()(gate, up)[0]
        return _swiglu_fused(gate, up)
    return nn.silu(gate) * up


@functools.lru_cache(maxsize=None)
def _swiglu_kernel():
    from alloy import metal
    from alloy.metal import swiglu as kernels

    return metal.differentiable(lambda g, u: (kernels.swiglu(g, u),), lambda g, u: (_swiglu_fused(g, u),),
                                kernels.swiglu_vjp)


def swiglu_packed(gu: mx.array) -> mx.array:
    """silu(gate) * up with gate, up the two halves of gu's last axis: (..., 2F) -> (..., F) (the output
    of one projection whose weight stacks the gate's and up's), as `swiglu(fused=True)`: on a GPU the
    packed kernels of `alloy.metal.swiglu`, whose gradient comes back in gu's layout (no split or
    concatenation copies); elsewhere the fused MLX form of the two halves."""
    if gu.shape[-1] % 2:
        raise ValueError("swiglu_packed: the last axis holds gate and up, so it must be even; "
                         f"got shape {tuple(gu.shape)}")
    from alloy import metal
    from alloy.metal import swiglu as kernels

    if metal.backend() is not None and kernels.packed_applies(gu):
        return _swiglu_packed_kernel()(gu)[0]
    return _swiglu_fused(*mx.split(gu, 2, axis=-1))


@functools.lru_cache(maxsize=None)
def _swiglu_packed_kernel():
    from alloy import metal
    from alloy.metal import swiglu as kernels

    return metal.differentiable(lambda gu: (kernels.swiglu_packed(gu),),
                                lambda gu: (_swiglu_fused(*mx.split(gu, 2, axis=-1)),), kernels.swiglu_packed_vjp)


@mx.custom_function
def _swiglu_fused(gate, up):
    g = gate.astype(mx.float32)
    return (g * mx.sigmoid(g) * up.astype(mx.float32)).astype(gate.dtype)


@_swiglu_fused.vjp
def _swiglu_fused_vjp(primals, cotangent, output):
    gate, up = primals
    g, u, d = gate.astype(mx.float32), up.astype(mx.float32), cotangent.astype(mx.float32)
    s = mx.sigmoid(g)
    return (d * u * s * (1.0 + g * (1.0 - s))).astype(gate.dtype), (d * g * s).astype(up.dtype)


def relu2(x: mx.array) -> mx.array:
    """Squared ReLU (Primer; Nemotron-H experts)."""
    r = mx.maximum(x, 0)
    return r * r


ACTIVATIONS = {
    "silu": nn.silu,
    "gelu": nn.gelu,
    "gelu_tanh": nn.gelu_approx,
    "relu": nn.relu,
    "relu2": relu2,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None

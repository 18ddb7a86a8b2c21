"""Causal depthwise 1-D convolution with a carried state (the short conv of Mamba / GDN).

    xp = concat(state, x) along time          state: the last K-1 inputs seen so far
    y_t = b + sum_k w[:, k] * xp[t + k]       k = 0 .. K-1 (w[:, K-1] multiplies the newest input)
    new_state = xp[-(K-1):]

Shapes: x (B, T, C); weight (C, K) (the HF (C, 1, K) layout squeezed); bias (C,) or None;
state (B, K-1, C) or None (zeros). ``activation`` is None or "silu".

`causal_conv1d(impl="auto")` runs the fused GPU kernel (`alloy.metal.conv1d`, one launch for
prefill and for the single-step update) on a CUDA or Metal default device when K >= 2 and x is
a float type, and `causal_conv1d_ref` otherwise. The kernel's gradient is the reference's (VJP
through `causal_conv1d_ref`), so training may use either path.
"""
from __future__ import annotations

import functools

import mlx.core as mx
import mlx.nn as nn

from alloy import metal
from alloy.metal import conv1d as _conv_kernel

_FLOATS = (mx.float32, mx.float16, mx.bfloat16)


def _activate(y, activation):
    if activation is None:
        return y
    if activation == "silu":
        return nn.silu(y)
    raise ValueError(f"causal_conv1d: activation must be None or 'silu', got {activation!r}")


def _depthwise(weight, C: int):
    """The depthwise kernel as (C, K) (HF's (C, 1, K) accepted), checked against C channels."""
    if weight.ndim == 3:
        weight = weight.reshape(weight.shape[0], weight.shape[-1])
    if weight.shape[0] != C:
        raise ValueError(f"causal_conv1d: weight has {weight.shape[0]} channels, x has {C}")
    return weight


def causal_conv1d_ref(x, weight, bias=None, state=None, activation=None):
    """Returns (y (B, T, C) in x.dtype, new_state (B, K-1, C) in x.dtype)."""
    B, T, C = x.shape
    weight = _depthwise(weight, C)
    K = weight.shape[1]
    # No op ever runs on an empty array here (T == 0, or a width-1 kernel's (B, 0, C) state): MLX-CUDA
    # was seen to die with SIGFPE on such inputs; empty results are views of x instead.
    if T == 0:
        return x, (x[:, :0] if K == 1 else (mx.zeros((B, K - 1, C), x.dtype) if state is None
                                            else state.astype(x.dtype)))
    if K == 1:
        xp = x
    else:
        if state is None:
            state = mx.zeros((B, K - 1, C), dtype=x.dtype)
        xp = mx.concatenate([state.astype(x.dtype), x], axis=1)  # (B, T+K-1, C)
    w = weight.astype(mx.float32)
    y = mx.zeros((B, T, C), dtype=mx.float32)
    for k in range(K):  # loop over the kernel width, not over time
        y = y + xp[:, k:k + T].astype(mx.float32) * w[:, k]
    if bias is not None:
        y = y + bias.astype(mx.float32)
    new_state = xp[:, T:] if K > 1 else x[:, :0]
    return _activate(y, activation).astype(x.dtype), new_state


# The kernel path's gradient: the gradient kernel (`alloy.metal.conv1d.BWD`; GPU test
# tests/metal/test_kernels_gpu.py::test_conv1d_gradient_kernel_matches_autodiff passed on an H100,
# session 6) or, switched off, autodiff of the reference. bench/mamba2_layer_profile.py times both:
# 1.14 vs 5.83 ms forward + backward at the toy mixer's 16 x 2048 x 1792 (H100, docs/benchmarks.md).
GRADIENT_KERNEL = True


@functools.lru_cache(maxsize=None)
def _fused(activation, gradient_kernel: bool = False):
    """The kernel with the reference's VJP, or with its gradient kernel (the same math), for one
    activation (all four arguments arrays)."""
    silu = activation == "silu"
    return metal.differentiable(
        lambda x, w, b, s: _conv_kernel.causal_conv1d(x, w, b, s, silu),
        lambda x, w, b, s: causal_conv1d_ref(x, w, b, s, activation),
        (lambda x, w, b, s, dy, dns: _conv_kernel.causal_conv1d_vjp(x, w, b, s, dy, dns, silu))
        if gradient_kernel else None,
    )


def kernel_applies(x, weight) -> bool:
    """Static facts under which `impl="auto"` takes the fused kernel."""
    return (metal.backend() is not None and x.ndim == 3 and x.shape[1] > 0
            and weight.shape[-1] >= 2 and x.dtype in _FLOATS)


def causal_conv1d(x, weight, bias=None, state=None, activation=None, impl: str = "auto"):
    """Public causal depthwise conv1d (see module docstring).

    impl: "ref" (MLX ops), "kernel" (the fused GPU kernel; needs a GPU default device) or
    "auto" (the kernel where `kernel_applies`, else the reference)."""
    if impl not in ("auto", "ref", "kernel"):
        raise ValueError(f"causal_conv1d: impl must be 'auto', 'ref' or 'kernel', got {impl!r}")
    if impl == "ref" or (impl == "auto" and not kernel_applies(x, weight)) or (x.ndim == 3 and x.shape[1] == 0):
        # (an empty x has nothing to launch: the reference returns the carried state)
        return causal_conv1d_ref(x, weight, bias, state, activation)
    if activation not in (None, "silu"):
        raise ValueError(f"causal_conv1d: activation must be None or 'silu', got {activation!r}")
    if metal.backend() is None:
        raise ValueError("causal_conv1d: impl='kernel' needs a CUDA or Metal default device")
    B, T, C = x.shape
    weight = _depthwise(weight, C)
    K = weight.shape[1]
    if K < 2:
        raise ValueError(f"causal_conv1d: impl='kernel' needs kernel width >= 2, got {K}")
    if state is None:
        state = mx.zeros((B, K - 1, C), dtype=x.dtype)
    elif state.shape != (B, K - 1, C):
        raise ValueError(f"causal_conv1d: state must have shape {(B, K - 1, C)}, got {state.shape}")
    if bias is None:
        bias = mx.zeros((C,), dtype=weight.dtype)
    y, new_state = _fused(activation, GRADIENT_KERNEL)(x, weight, bias, state)
    return y, new_state

"""Causal depthwise 1-D convolution with a carried state (the short conv of Mamba / GDN).

    xp = concat(state, x) along time          state: the last K-1 inputs seen so far
    y_t = b + sum_k w[:, k] * xp[t + k]       k = 0 .. K-1 (w[:, K-1] multiplies the newest input)
    new_state = xp[-(K-1):]

Shapes: x (B, T, C); weight (C, K) (the HF (C, 1, K) layout squeezed); bias (C,) or None;
state (B, K-1, C) or None (zeros). ``activation`` is None or "silu".

`causal_conv1d(impl="auto")` runs the fused GPU kernel (`alloy.metal.conv1d`, one launch for
prefill and for the single-step update) on a CUDA or Metal default device when K >= 2 and x is
a float type, and `causal_conv1d_ref` otherwise. The kernel's gradient is the gradient kernel
(`alloy.metal.conv1d.BWD`, the same math in one launch) while `GRADIENT_KERNEL` is on, else the
reference's VJP (through `causal_conv1d_ref`), so training may use either path.

`causal_conv1d_split(..., widths=(C0, C1, C2))` is `causal_conv1d` followed by a split of y along
channels; on the kernel path one launch writes the three pieces as contiguous arrays (and the
gradient kernel reads their cotangents as three arrays), so a consumer that splits the output
(Mamba-2's x, B, C) pays for no slicing copies nor the split's gradient concatenation.
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


def _takes_ref(x, weight, impl: str) -> bool:
    """Whether `impl` resolves to the reference path for x (an empty x has nothing to launch: the
    reference returns the carried state)."""
    if impl not in ("auto", "ref", "kernel"):
        raise ValueError(f"causal_conv1d: impl must be 'auto', 'ref' or 'kernel', got {impl!r}")
    return impl == "ref" or (impl == "auto" and not kernel_applies(x, weight)) or (x.ndim == 3 and x.shape[1] == 0)


def _kernel_args(x, weight, bias, state, activation, tail: int = 0):
    """(weight (C, K), bias (C,), state (B, K-1, C)) for the kernel: checked, zeros for the missing
    (C: x's channels less a passed-through tail)."""
    if activation not in (None, "silu"):
        raise ValueError(f"causal_conv1d: activation must be None or 'silu', got {activation!r}")
    if metal.backend() is None:
        raise ValueError("causal_conv1d: impl='kernel' needs a CUDA or Metal default device")
    B, T, C = x.shape
    C -= tail
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
    return weight, bias, state


def causal_conv1d(x, weight, bias=None, state=None, activation=None, impl: str = "auto"):
    """Public causal depthwise conv1d (see module docstring).

    impl: "ref" (MLX ops), "kernel" (the fused GPU kernel; needs a GPU default device) or
    "auto" (the kernel where `kernel_applies`, else the reference)."""
    if _takes_ref(x, weight, impl):
        return causal_conv1d_ref(x, weight, bias, state, activation)
    y, new_state = _fused(activation, GRADIENT_KERNEL)(x, *_kernel_args(x, weight, bias, state, activation))
    return y, new_state


def _split_ref(x, weight, bias, state, activation, widths, tail: int = 0):
    """The reference of `causal_conv1d_split`: the whole y, then split -> (y0, y1, y2, new_state), or
    with a tail (y0, y1, y2, x's last `tail` columns, new_state)."""
    C = x.shape[-1] - tail
    y, new_state = causal_conv1d_ref(x[..., :C] if tail else x, weight, bias, state, activation)
    ys = mx.split(y, [widths[0], widths[0] + widths[1]], axis=-1)
    return (*ys, x[..., C:], new_state) if tail else (*ys, new_state)


def _pass_tail(x, tail: int):
    """x's last `tail` columns as their own contiguous array (the kernel path's passed-through output)."""
    return mx.contiguous(x[..., x.shape[-1] - tail:])


@functools.lru_cache(maxsize=None)
def _fused_split(activation, widths: tuple, gradient_kernel: bool = False, tail: int = 0):
    """`_fused` with y split into three arrays of ``widths`` channels (forward: the split kernel;
    gradient: the split gradient kernel, or the reference's VJP); with a tail, x's last `tail`
    columns pass through as a fourth output, their cotangent written into dx by the gradient kernel."""
    silu = activation == "silu"

    def fast(x, w, b, s):
        *ys, ns = _conv_kernel.causal_conv1d_split(x, w, b, s, silu, widths)
        return (*ys, _pass_tail(x, tail), ns) if tail else (*ys, ns)

    def grad(x, w, b, s, dy0, dy1, dy2, *rest):  # rest: (dtail, dns) with a tail, else (dns,)
        return _conv_kernel.causal_conv1d_split_vjp(x, w, b, s, dy0, dy1, dy2, rest[-1], silu, widths,
                                                    rest[0] if tail else None)
    return metal.differentiable(fast, lambda x, w, b, s: _split_ref(x, w, b, s, activation, widths, tail),
                                grad if gradient_kernel else None)


def causal_conv1d_split(x, weight, bias=None, state=None, activation=None, *, widths, tail: int = 0,
                        impl: str = "auto"):
    """`causal_conv1d` with y split along channels: widths (C0, C1, C2), positive ints summing to C
    -> ([y0 (B, T, C0), y1 (B, T, C1), y2 (B, T, C2)], new_state (B, K-1, C)), the same values as
    `mx.split` of `causal_conv1d`'s y. On the kernel path (same `impl` rule) one launch writes the
    three pieces, each contiguous, and the gradient takes their cotangents as they come.

    tail: x is (B, T, C + tail) and its last `tail` columns are not convolved but returned as a
    fourth piece ([y0, y1, y2, x[..., C:]], new_state): a projection whose output feeds the conv and,
    beside it, something else (Mamba-2's dt) is one product, and on the kernel path its gradient
    arrives as one array (the gradient kernel writes the tail's cotangent into dx's last columns),
    not a concatenation."""
    if not isinstance(tail, int) or isinstance(tail, bool) or not 0 <= tail < x.shape[-1]:
        raise ValueError(f"causal_conv1d_split: tail must be an int in [0, {x.shape[-1]}) (x has {x.shape[-1]} "
                         f"columns), got {tail!r}")
    C = x.shape[-1] - tail
    if (not isinstance(widths, (tuple, list)) or len(widths) != 3
            or any(not isinstance(w, int) or isinstance(w, bool) or w <= 0 for w in widths) or sum(widths) != C):
        raise ValueError(f"causal_conv1d_split: widths must be three positive ints summing to the {C} channels "
                         f"of x{f' (its {x.shape[-1]} columns less a tail of {tail})' if tail else ''}, got {widths!r}")
    widths = tuple(widths)
    if _takes_ref(x, weight, impl):
        *ys, new_state = _split_ref(x, weight, bias, state, activation, widths, tail)
        return ys, new_state
    *ys, new_state = _fused_split(activation, widths, GRADIENT_KERNEL, tail)(
        x, *_kernel_args(x, weight, bias, state, activation, tail))
    return ys, new_state

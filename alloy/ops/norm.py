"""RMSNorm and gated RMSNorm.

    rms_norm(x)            = x / sqrt(mean(x^2) + eps) * w
    gated, gate after norm = rms_norm(x) * silu(z)            (norm_before_gate=True)
    gated, gate before     = rms_norm(x * silu(z))            (norm_before_gate=False, Mamba-2 / HF default)

A group size splits the last axis into groups normalised independently (Mamba-2 with n_groups > 1).
Statistics are computed in float32 whatever the input dtype.
"""
from __future__ import annotations

import functools

import mlx.core as mx


def rms_norm_ref(x: mx.array, weight: mx.array | None, eps: float = 1e-6) -> mx.array:
    """x: (..., D); weight: (D,) or None. Returns x's dtype."""
    xf = x.astype(mx.float32)
    y = xf * mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + eps)
    y = y.astype(x.dtype)
    return y if weight is None else y * weight.astype(x.dtype)


# "auto" takes the plain RMSNorm kernels (`alloy.metal.gated_norm` without its gate: forward and
# gradient, 16-byte accesses where D is a multiple of 256) on a GPU while this is on. MLX's RMSNorm
# gradient took 2.9 ms over the toy train step's 25 norms on an H100 (docs/benchmarks.md, session 7);
# with the kernels the toy step took 95.7 ms against 96.5 / 97.9 without, same job, and 0.7 GB less
# peak memory (session 8).
RMS_KERNEL = True


@functools.lru_cache(maxsize=None)
def _rms_kernel(eps: float):
    from alloy import metal
    from alloy.metal import gated_norm

    return metal.differentiable(
        lambda x, w: (gated_norm.rms_norm(x, w, eps),),
        lambda x, w: (mx.fast.rms_norm(x, w, eps),),
        lambda x, w, dy: gated_norm.rms_norm_vjp(x, w, eps, dy))


def rms_norm(x: mx.array, weight: mx.array | None, eps: float = 1e-6, impl: str = "auto") -> mx.array:
    """Public RMSNorm: ``mx.fast.rms_norm`` (fp32 statistics), the reference, or ("kernel", or
    "auto" with `RMS_KERNEL` on, on a GPU) the plain RMSNorm kernels of `alloy.metal.gated_norm`."""
    if impl == "ref":
        return rms_norm_ref(x, weight, eps)
    if impl not in ("auto", "fast", "kernel"):
        raise ValueError(f"rms_norm: impl must be 'auto', 'fast', 'kernel' or 'ref', got {impl!r}")
    w = None if weight is None else weight.astype(x.dtype)
    if impl == "kernel" or (impl == "auto" and RMS_KERNEL):
        from alloy import metal
        from alloy.metal import gated_norm

        ok = metal.backend() is not None and gated_norm.rms_norm_applies(x, w)
        if impl == "kernel" and not ok:
            raise ValueError("rms_norm: impl='kernel' needs a GPU default device, a weight of shape (D,) "
                             f"and D a multiple of 32 (D={x.shape[-1]})")
        if ok:
            return _rms_kernel(float(eps))(x, w)[0]
    return mx.fast.rms_norm(x, w, eps)


@functools.lru_cache(maxsize=None)
def _add_rms_kernel(eps: float):
    from alloy import metal
    from alloy.metal import gated_norm

    def slow(x, r, w):
        hs = x + r
        return hs, mx.fast.rms_norm(hs, w, eps)

    return metal.differentiable(
        lambda x, r, w: gated_norm.add_rms_norm(x, r, w, eps), slow,
        lambda x, r, w, dhs, dy, hs, _y: (lambda d, dw: (d, d, dw))(*gated_norm.add_rms_norm_vjp(hs, w, eps, dhs, dy)),
        vjp_outputs=True)


def add_rms_norm(x: mx.array, r: mx.array, weight: mx.array | None, eps: float = 1e-6,
                 impl: str = "auto") -> tuple[mx.array, mx.array]:
    """(hs, y) = (x + r, rms_norm(x + r, weight)): a residual stream's update and the next
    half-block's pre-norm. On a GPU with `RMS_KERNEL` ("auto") or impl="kernel", one pass each way
    (`alloy.metal.gated_norm.ADD_FWD` / `ADD_BWD`: the gradient adds hs's own cotangent inside the
    norm's gradient instead of a separate add); otherwise the two ops (`impl` as for `rms_norm`)."""
    if x.shape != r.shape or x.dtype != r.dtype:
        raise ValueError(f"add_rms_norm: x and r must match, got {tuple(x.shape)} {x.dtype} and "
                         f"{tuple(r.shape)} {r.dtype}")
    if impl == "kernel" or (impl == "auto" and RMS_KERNEL):
        from alloy import metal
        from alloy.metal import gated_norm

        w = None if weight is None else weight.astype(x.dtype)
        ok = metal.backend() is not None and gated_norm.rms_norm_applies(x, w)
        if impl == "kernel" and not ok:
            raise ValueError("add_rms_norm: impl='kernel' needs a GPU default device, a weight of shape (D,) "
                             f"and D a multiple of 32 (D={x.shape[-1]})")
        if ok:
            return _add_rms_kernel(float(eps))(x, r, w)
    hs = x + r
    return hs, rms_norm(hs, weight, eps, impl=impl)


def gated_rms_norm_ref(
    x: mx.array,
    z: mx.array | None,
    weight: mx.array | None,
    eps: float = 1e-6,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> mx.array:
    """x, z: (..., D); weight: (D,); group_size divides D (None: one group).

    1. (gate first)  h = x * silu(z)
    2. per group     h = h / sqrt(mean(h^2) + eps)
    3. scale         y = h * w            (then * silu(z) when norm_before_gate)
    """
    dtype = x.dtype
    h = x.astype(mx.float32)
    if z is not None and not norm_before_gate:
        zf = z.astype(mx.float32)
        h = h * (zf * mx.sigmoid(zf))
    d = h.shape[-1]
    g = d if group_size is None else group_size
    if d % g:
        raise ValueError(f"gated_rms_norm: group_size {g} does not divide the feature size {d}")
    hg = h.reshape(*h.shape[:-1], d // g, g)
    hg = hg * mx.rsqrt(mx.mean(hg * hg, axis=-1, keepdims=True) + eps)
    h = hg.reshape(h.shape)
    if weight is not None:
        h = h * weight.astype(mx.float32)
    if z is not None and norm_before_gate:
        zf = z.astype(mx.float32)
        h = h * (zf * mx.sigmoid(zf))
    return h.astype(dtype)


# "auto" takes the fused kernels (`alloy.metal.gated_norm`: forward and gradient) where they apply
# while this is on. Their GPU test (tests/metal/test_kernels_gpu.py::test_gated_rms_norm_kernels_match_ref)
# passed on an H100 (session 6); bench/mamba2_layer_profile.py: 1.48 vs 3.53 ms forward + backward
# against the MLX ops at the toy mixer's 16 x 2048 x 1536 (docs/benchmarks.md).
GATED_KERNEL = True


@functools.lru_cache(maxsize=None)
def _gated_kernel(eps: float, group_size, norm_before_gate: bool):
    from alloy import metal
    from alloy.metal import gated_norm

    return metal.differentiable(
        lambda x, z, w: (gated_norm.gated_rms_norm(x, z, w, eps, group_size, norm_before_gate),),
        lambda x, z, w: (gated_rms_norm_ref(x, z, w, eps, group_size, norm_before_gate),),
        lambda x, z, w, dy: gated_norm.gated_rms_norm_vjp(x, z, w, eps, group_size, norm_before_gate, dy))


def gated_rms_norm(x, z, weight, eps: float = 1e-6, group_size: int | None = None,
                   norm_before_gate: bool = False, impl: str = "auto") -> mx.array:
    """Public gated RMSNorm (see module docstring). impl: "ref" (MLX ops), "kernel" (the fused
    forward and gradient kernels of `alloy.metal.gated_norm`; a GPU, a gate and a weight, D and the
    group size multiples of 32) or "auto" (the kernels when `GATED_KERNEL` is on and they apply)."""
    if impl not in ("auto", "ref", "kernel"):
        raise ValueError(f"gated_rms_norm: impl must be 'auto', 'ref' or 'kernel', got {impl!r}")
    if impl != "ref":
        from alloy import metal
        from alloy.metal import gated_norm

        on_gpu = metal.backend() is not None and gated_norm.applies(x, z, weight, group_size)
        if impl == "kernel" and not on_gpu:
            raise ValueError("gated_rms_norm: impl='kernel' needs a GPU default device, a gate z of x's dtype "
                             f"and shape, a weight, and D and group size multiples of 32 (D={x.shape[-1]}, "
                             f"group_size={group_size})")
        if on_gpu and (impl == "kernel" or GATED_KERNEL):
            return _gated_kernel(float(eps), group_size, bool(norm_before_gate))(x, z, weight)[0]
    return gated_rms_norm_ref(x, z, weight, eps, group_size, norm_before_gate)

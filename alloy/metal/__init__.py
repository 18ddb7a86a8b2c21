"""Hand-written GPU kernels: one portable body per kernel, rendered to CUDA (`mx.fast.cuda_kernel`)
or Metal (`mx.fast.metal_kernel`) by `alloy.metal.prelude`.

Kernels (each an inference kernel; the public ops in `alloy.ops` attach VJPs through their
differentiable MLX paths with `differentiable`):

    conv1d               fused causal depthwise conv1d + SiLU, state in/out (prefill and step), and
                         its gradient in one launch
    ssd_step             Mamba-2 decode step: state update + readout + D skip
    gated_delta_recurrent  gated delta rule token by token, state in registers (decode, short prompts)
    gated_delta_chunked  the chunked gated delta rule's sweep across chunks, state in registers
    gated_delta_wy       the chunked gated delta rule on tensor cores (16-bit, K = 128): a chunk-local
                         WY kernel and a state pass of warp tile products
    gated_norm           gated RMSNorm forward and gradient, one warp per row
    gemv                 decode matrix-vector product, optionally behind a grouped RMSNorm
    mamba2_step          the whole Mamba-2 mixer between its projections for one decode token
                         (conv step + dt + SSD step + D + gate), one launch per layer
    mamba2_stack         a whole pre-norm Mamba-2 stack for one decode token in ONE persistent
                         launch (grid-wide barriers between the phases of each layer; CUDA)
    selective_scan_step  Mamba-1 decode step: state update + readout + D skip + gate
    selective_scan       Mamba-1 forward scan (prefill), state in registers
    ssd_chunked          Mamba-2 chunked SSD forward: prep / state-passing / chunk-output kernels
                         around tensor-core matmuls
    ssd_cb               the SSD's chunk products C B^T (float32) on tensor cores from 16-bit B / C
    swiglu               silu(gate) * up, forward and gradient (the MLP's elementwise part)
"""
from __future__ import annotations

import mlx.core as mx

from alloy.metal import conv1d, gated_delta_chunked, gated_delta_recurrent, gated_delta_wy, gated_norm, gemv, mamba2_stack, mamba2_step, selective_scan, selective_scan_step, ssd_chunked, ssd_step, swiglu
from alloy.metal import rope, ssd_cb
from alloy.metal.prelude import DIALECTS, Kernel, backend  # noqa: F401

# every kernel: the module-level `Kernel`s of each kernel module (as `emulate.patch` finds them), and
# the persistent stack kernel, which is built per layer count (one instance stands for them)
KERNELS = {
    k.name: k
    for k in [v for mod in (conv1d, gated_norm, gemv, gated_delta_recurrent, gated_delta_chunked, gated_delta_wy,
                            ssd_step, ssd_chunked, ssd_cb, mamba2_step, selective_scan_step, selective_scan, swiglu, rope)
              for v in vars(mod).values() if isinstance(v, Kernel)] + [mamba2_stack.kernel(4)]
}


# MLX copies a strided (sliced) kernel input at every launch that reads it: one array read by a
# forward and a gradient kernel, or by several kernels of one side, is copied each time (the toy
# train step: 8 copies per Mamba-2 layer — conv forward + gradient, gated norm forward + gradient,
# 4 SSD kernels — the profile's 72 `copy_g_nd` bf16 launches, ~6 ms per step on an H100,
# docs/benchmarks.md session 6). On: `differentiable` makes its arguments contiguous once on a GPU,
# so the forward and the gradient share that copy (kept for the backward: ~0.3 GB more per toy
# layer at 16 x 2048). H100, session 7, toy step: 104.1 / 101.8 ms on vs 111.7 / 105.7 off (same
# job, alternating); 45 such copies per step instead of 72 (bench/gpu_kernel_profile.py).
PACK_INPUTS = True
# Only arguments of at least this many elements are packed: a decode step's small arrays would add
# graph nodes per kernel call for copies that cost next to nothing anyway.
PACK_MIN_SIZE = 1 << 16


def differentiable(fast, slow, vjp=None, vjp_outputs: bool = False):
    """`fast` with the gradient of `slow`: an `mx.custom_function` whose forward runs `fast` and
    whose VJP differentiates `slow` (the same math as a differentiable MLX composition), or, when
    given, calls ``vjp(*primals, *cotangents)`` (a hand-written gradient, e.g. a kernel) instead;
    ``vjp(*primals, *cotangents, *outputs)`` with `vjp_outputs` (a gradient reusing what the forward
    computed, e.g. an extra output kept for it).

    All take the same positional arrays and return a tuple of arrays. With `PACK_INPUTS` on and a
    GPU backend, the arrays are made contiguous before the call (once for both directions)."""

    @mx.custom_function
    def f(*args):
        return tuple(fast(*args))

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        # MLX hands a one-argument function's primals (and a lone cotangent / output) as a bare array
        primals, cotangents, outputs = (
            (v,) if isinstance(v, mx.array) else tuple(v) for v in (primals, cotangents, outputs))
        if vjp is not None:
            return tuple(vjp(*primals, *cotangents, *(outputs if vjp_outputs else ())))
        _, grads = mx.vjp(lambda *a: list(slow(*a)), list(primals), list(cotangents))
        return tuple(grads)

    def call(*args):
        if PACK_INPUTS and backend() is not None:
            args = [mx.contiguous(a) if a.size >= PACK_MIN_SIZE else a for a in args]
        return f(*args)

    return call

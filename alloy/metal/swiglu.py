"""SwiGLU's elementwise part, silu(gate) * up, forward and gradient, one pass each way.

    h = g s u,  s = sigmoid(g)
    dup = dy g s,   dgate = dy u s (1 + g (1 - s))

Arithmetic in float32, rounded once to the output dtype. Each thread takes VW consecutive elements
(VW = 8 where the element count allows: one 16-byte load or store per array for bf16 / fp16). Autodiff
of `silu(gate) * up` runs ~5 launches per MLP in a compiled train step (a sigmoid kept for the
backward, three products, one fused kernel; docs/benchmarks.md, session 6); these are two.

The packed pair reads gate and up as the two halves of each row of one (rows, 2F) array (the output
of one projection with the gate's and up's weights stacked) and writes its gradient in that layout:
the MLP's backward is then one matmul for dx (no sum of two) and no split / concatenation copies.
"""
from __future__ import annotations

import mlx.core as mx

from alloy.metal.prelude import VEC_IO, Kernel, groups

GROUP = 256  # threads per group

# opening of every kernel here: element i0 .. i0 + VW - 1 of h = silu(g) * u, with gv / uv loaded;
# packed (PF = F > 0): g and u are the two halves of each row of one (rows, 2F) array `gu` (a single
# projection's output), element i of h at row i / F, column i % F
_HEAD = {False: """
  const long n = static_cast<long>(g_shape[0]);
  const long i0 = (static_cast<long>(bid_x) * nthreads + tid) * VW;
  if (i0 < n) {
    float gv[VW];
    float uv[VW];
    LDV(g, i0, gv);
    LDV(u, i0, uv);
""", True: """
  const long n = static_cast<long>(gu_shape[0]) / 2;
  const long i0 = (static_cast<long>(bid_x) * nthreads + tid) * VW;
  if (i0 < n) {
    const long go = (i0 / PF) * (2 * PF) + i0 % PF;   // the gate's column in the packed row
    float gv[VW];
    float uv[VW];
    LDV(gu, go, gv);
    LDV(gu, go + PF, uv);
"""}

_FWD_MATH = """
    float hv[VW];
    for (int k = 0; k < VW; ++k) hv[k] = fsilu(gv[k]) * uv[k];
    STV(h, i0, hv);
  }
"""

_BWD_MATH = """
    float dv[VW];
    float dgv[VW];
    float duv[VW];
    LDV(dy, i0, dv);
    for (int k = 0; k < VW; ++k) {
      const float s = 1.0f / (1.0f + fexp(-gv[k]));
      duv[k] = dv[k] * gv[k] * s;
      dgv[k] = dv[k] * uv[k] * s * (1.0f + gv[k] * (1.0f - s));
    }
"""

FWD = Kernel(name="alloy_swiglu", inputs=("g", "u"), outputs=("h",), body=_HEAD[False] + _FWD_MATH, helpers=VEC_IO)

BWD = Kernel(name="alloy_swiglu_bwd", inputs=("g", "u", "dy"), outputs=("dg", "du"), body=_HEAD[False] + _BWD_MATH + """
    STV(dg, i0, dgv);
    STV(du, i0, duv);
  }
""", helpers=VEC_IO)

# the packed pair: gu (rows, 2F) -> h (rows, F); its gradient writes dgu (rows, 2F) in gu's layout
FWD_PACKED = Kernel(name="alloy_swiglu_packed", inputs=("gu",), outputs=("h",), body=_HEAD[True] + _FWD_MATH,
                    helpers=VEC_IO)

BWD_PACKED = Kernel(name="alloy_swiglu_packed_bwd", inputs=("gu", "dy"), outputs=("dgu",),
                    body=_HEAD[True] + _BWD_MATH + """
    STV(dgu, go, dgv);
    STV(dgu, go + PF, duv);
  }
""", helpers=VEC_IO)


def applies(gate, up) -> bool:
    """Static facts under which the kernels run: one float dtype, one shape."""
    return gate.shape == up.shape and gate.dtype == up.dtype and gate.dtype in (mx.float32, mx.bfloat16, mx.float16)


def _launch(kernel, arrays, n_out):
    shape, dtype = arrays[0].shape, arrays[0].dtype
    flat = [a.astype(dtype).reshape(-1) for a in arrays]
    n = flat[0].size
    vw = 8 if n % 8 == 0 else 1
    outs = kernel(flat, template=[("T", dtype), ("VW", vw)], grid=(groups(groups(n, vw), GROUP), 1, 1),
                  threadgroup=GROUP, output_shapes=[(n,)] * n_out, output_dtypes=[dtype] * n_out)
    return tuple(o.reshape(shape) for o in outs)


def swiglu(gate, up):
    """FWD launch: silu(gate) * up in gate's dtype."""
    return _launch(FWD, [gate, up], 1)[0]


def swiglu_vjp(gate, up, dy):
    """BWD launch: (dgate, dup) in gate's dtype."""
    return _launch(BWD, [gate, up, dy], 2)


def packed_applies(gu) -> bool:
    """Static facts under which the packed kernels run: a float dtype, an even last axis."""
    return gu.dtype in (mx.float32, mx.bfloat16, mx.float16) and gu.ndim >= 1 and gu.shape[-1] % 2 == 0


def _launch_packed(kernel, gu, arrays, out_last: int):
    F = gu.shape[-1] // 2
    dtype, rows = gu.dtype, gu.size // gu.shape[-1]
    flat = [a.astype(dtype).reshape(-1) for a in arrays]
    vw = 8 if F % 8 == 0 else 1
    out = kernel(flat, template=[("T", dtype), ("VW", vw), ("PF", F)],
                 grid=(groups(groups(rows * F, vw), GROUP), 1, 1), threadgroup=GROUP,
                 output_shapes=[(rows * out_last,)], output_dtypes=[dtype])[0]
    return out.reshape(*gu.shape[:-1], out_last)


def swiglu_packed(gu):
    """FWD_PACKED launch: gu (..., 2F), gate then up along the last axis -> silu(gate) * up (..., F)."""
    return _launch_packed(FWD_PACKED, gu, [gu], gu.shape[-1] // 2)


def swiglu_packed_vjp(gu, dy):
    """BWD_PACKED launch: the cotangent of gu (..., 2F), (dgate, dup) side by side as gu is laid out."""
    return (_launch_packed(BWD_PACKED, gu, [gu, dy], gu.shape[-1]),)

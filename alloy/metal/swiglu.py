"""SwiGLU's elementwise part, silu(gate) * up, forward and gradient, one pass each way.

    h = g s u,  s = sigmoid(g)
    dup = dy g s,   dgate = dy u s (1 + g (1 - s))

Arithmetic in float32, rounded once to the output dtype. Each thread takes VW consecutive elements
(VW = 8 where the element count allows: one 16-byte load or store per array for bf16 / fp16). Autodiff
of `silu(gate) * up` runs ~5 launches per MLP in a compiled train step (a sigmoid kept for the
backward, three products, one fused kernel; docs/benchmarks.md, session 6); these are two.
"""
from __future__ import annotations

import mlx.core as mx

from alloy.metal.prelude import VEC_IO, Kernel, groups

GROUP = 256  # threads per group

_HEAD = """
  const long n = static_cast<long>(g_shape[0]);
  const long i0 = (static_cast<long>(bid_x) * nthreads + tid) * VW;
  if (i0 < n) {
    float gv[VW];
    float uv[VW];
    LDV(g, i0, gv);
    LDV(u, i0, uv);
"""

FWD = Kernel(
    name="alloy_swiglu",
    inputs=("g", "u"),
    outputs=("h",),
    body=_HEAD + """
    float hv[VW];
    for (int k = 0; k < VW; ++k) hv[k] = fsilu(gv[k]) * uv[k];
    STV(h, i0, hv);
  }
""",
    helpers=VEC_IO,
)

BWD = Kernel(
    name="alloy_swiglu_bwd",
    inputs=("g", "u", "dy"),
    outputs=("dg", "du"),
    body=_HEAD + """
    float dv[VW];
    float dgv[VW];
    float duv[VW];
    LDV(dy, i0, dv);
    for (int k = 0; k < VW; ++k) {
      const float s = 1.0f / (1.0f + fexp(-gv[k]));
      duv[k] = dv[k] * gv[k] * s;
      dgv[k] = dv[k] * uv[k] * s * (1.0f + gv[k] * (1.0f - s));
    }
    STV(dg, i0, dgv);
    STV(du, i0, duv);
  }
""",
    helpers=VEC_IO,
)


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

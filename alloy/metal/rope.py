"""RoPE on the attention training path: rotate q / k and change their layout in one pass.

    forward   x (B, T, H, D) (the projection's layout)  ->  y (B, H, T, D) contiguous (attention's)
              y[b, h, t, i]        = x_i c - x_j s      for each rotated pair (i, j), angle of (row b, t)
              y[b, h, t, j]        = x_i s + x_j c      c, s = cos_tab, sin_tab[r, t, pair]
              y[b, h, t, f]        = x[b, t, h, f]      f >= dims (partial rotary: copied)
    gradient  dy (B, H, T, D)  ->  dx (B, T, H, D): the inverse rotation (s -> -s), layouts swapped

Pairs (i, j) = (p, p + dims/2) or, with TRAD, (2p, 2p + 1), p < dims/2 (`alloy.ops.rope.rope_ref`).
The angles come in as float32 tables cos_tab / sin_tab (R, T, dims/2) made by MLX from the positions
and inverse frequencies (`alloy.ops.rope.rope_tables`: every rope_type / scale / offset exactly as the
reference; YaRN's attention factor folded in); R = 1 (one offset for all rows) or B (ROWTAB: a row's own
offset, e.g. a cached chunk). Math in float32, one rounding to x's dtype.

Work items: a thread takes VW pairs of one (b, h, t) row (VW = 8 where dims/2 and D allow: two 16-byte
loads and stores of the row, two 32-byte loads of each table) or VW features of its copied tail; the
grid is (T * units per row / group, H, B), threads in (b, h, t, unit) order so that consecutive
threads write consecutive bytes of the (B, H, T, D) side (forward output, gradient input).

Replaces, per attention layer and step of the toy training config, `transpose` + `mx.fast.rope` on a
strided view (MLX-CUDA: ~100 / 192 us forward for k / q at 16 x 2048, ~5x their bytes' time).
"""
from __future__ import annotations

import mlx.core as mx

from alloy.metal.prelude import VEC_IO, Kernel, fits_int32, groups

GROUP = 256  # threads per group (fewer for short rows: a multiple of 32 covering T * units)

_HELPERS = VEC_IO + """
// v[0..VW) = p[o..o+VW) of a float32 table (VW = 8: two 16-byte loads; o a multiple of 8)
#define LDT(p, o, v) if (VW == 8) { \\
    const float4 t0_ = *reinterpret_cast<const DEV float4*>(p + (o)); \\
    const float4 t1_ = *reinterpret_cast<const DEV float4*>(p + (o) + 4); \\
    v[0] = t0_.x; v[1 % VW] = t0_.y; v[2 % VW] = t0_.z; v[3 % VW] = t0_.w; \\
    v[4 % VW] = t1_.x; v[5 % VW] = t1_.y; v[6 % VW] = t1_.z; v[7 % VW] = t1_.w; \\
  } else { v[0] = p[o]; }
"""

# {SRC} / {DST}: the offsets of the row read / written; {SGN}: the sine's sign (-1: inverse rotation)
_BODY = """
  constexpr int NR = HALF / VW;                  // rotation units per row (VW pairs each)
  constexpr int NU = NR + (HD - 2 * HALF) / VW;  // + the copied tail's units (VW features each)
  const int Tn = cos_tab_shape[1];
  const int g = static_cast<int>(bid_x * nthreads + tid);
  const int t = g / NU;
  const int u = g - t * NU;
  if (t < Tn) {
    const int b = static_cast<int>(bid_z);
    const int h = static_cast<int>(bid_y);
    const int bthd = ((b * Tn + t) * NH + h) * HD;   // row (b, t, h) of the projection layout
    const int bhtd = ((b * NH + h) * Tn + t) * HD;   // row (b, h, t) of the attention layout
    const int src = {SRC};
    const int dst = {DST};
    if (u < NR) {
      const int p0 = u * VW;                         // first pair of the unit
      const int c = ((ROWTAB ? b : 0) * Tn + t) * HALF + p0;
      const int ia = TRAD ? 2 * p0 : p0;             // its features: [ia, ia + VW) and [ib, ib + VW)
      const int ib = TRAD ? 2 * p0 + VW : p0 + HALF;
      float cv[VW];
      float sv[VW];
      float va[VW];
      float vb[VW];
      LDT(cos_tab, c, cv);
      LDT(sin_tab, c, sv);
      LDV(x, src + ia, va);
      LDV(x, src + ib, vb);
      for (int k = 0; k < VW; ++k) sv[k] = {SGN} * sv[k];
      if (TRAD) {                                     // pair k: features 2k, 2k + 1 of [va | vb]
        float w[2 * VW];
        for (int j = 0; j < VW; ++j) {
          w[j] = va[j];
          w[VW + j] = vb[j];
        }
        for (int k = 0; k < VW; ++k) {
          const float a = w[2 * k];
          const float e = w[2 * k + 1];
          w[2 * k] = a * cv[k] - e * sv[k];
          w[2 * k + 1] = a * sv[k] + e * cv[k];
        }
        for (int j = 0; j < VW; ++j) {
          va[j] = w[j];
          vb[j] = w[VW + j];
        }
      } else {                                        // pair k: va[k], vb[k]
        for (int k = 0; k < VW; ++k) {
          const float a = va[k];
          const float e = vb[k];
          va[k] = a * cv[k] - e * sv[k];
          vb[k] = a * sv[k] + e * cv[k];
        }
      }
      STV(y, dst + ia, va);
      STV(y, dst + ib, vb);
    } else {
      const int o = 2 * HALF + (u - NR) * VW;
      float v[VW];
      LDV(x, src + o, v);
      STV(y, dst + o, v);
    }
  }
"""

FWD = Kernel(name="alloy_rope_heads", inputs=("x", "cos_tab", "sin_tab"), outputs=("y",),
             body=_BODY.replace("{SRC}", "bthd").replace("{DST}", "bhtd").replace("{SGN}", "1.0f"),
             helpers=_HELPERS)

BWD = Kernel(name="alloy_rope_heads_bwd", inputs=("x", "cos_tab", "sin_tab"), outputs=("y",),
             body=_BODY.replace("{SRC}", "bhtd").replace("{DST}", "bthd").replace("{SGN}", "-1.0f"),
             helpers=_HELPERS)


def applies(x, dims: int, cos_tab) -> bool:
    """Static facts under which the kernels run: x (B, T, H, D) of a float dtype, dims even and <= D,
    tables (1 or B, T, dims/2), 32-bit indexing."""
    if x.ndim != 4 or x.dtype not in (mx.float32, mx.bfloat16, mx.float16):
        return False
    B, T, H, D = x.shape
    return (dims % 2 == 0 and 0 < dims <= D and cos_tab.shape[0] in (1, B) and cos_tab.shape[1:] == (T, dims // 2)
            and fits_int32(B, T, H, D))


def _launch(kernel, a, cos_tab, sin_tab, traditional: bool, B, T, H, D, out_shape):
    half = cos_tab.shape[-1]
    vw = 8 if half % 8 == 0 and D % 8 == 0 else 1
    nu = half // vw + (D - 2 * half) // vw
    tg = min(GROUP, groups(T * nu, 32) * 32)
    return kernel([a, cos_tab.astype(mx.float32), sin_tab.astype(mx.float32)],
                  template=[("T", a.dtype), ("NH", H), ("HD", D), ("HALF", half), ("VW", vw),
                            ("TRAD", bool(traditional)), ("ROWTAB", cos_tab.shape[0] > 1)],
                  grid=(groups(T * nu, tg), H, B), threadgroup=tg, output_shapes=[out_shape],
                  output_dtypes=[a.dtype])[0]


def rope_heads(x, cos_tab, sin_tab, traditional: bool):
    """FWD launch: x (B, T, H, D) -> rotated (B, H, T, D) in x's dtype."""
    B, T, H, D = x.shape
    return _launch(FWD, x, cos_tab, sin_tab, traditional, B, T, H, D, (B, H, T, D))


def rope_heads_vjp(x, cos_tab, sin_tab, dy, traditional: bool):
    """BWD launch: the cotangent of x (B, T, H, D) from dy (B, H, T, D); the tables get none (zeros:
    positions and frequencies are constants here, as with `mx.fast.rope`)."""
    B, T, H, D = x.shape
    dx = _launch(BWD, dy.astype(x.dtype), cos_tab, sin_tab, traditional, B, T, H, D, (B, T, H, D))
    return dx, mx.zeros_like(cos_tab), mx.zeros_like(sin_tab)

"""Gated RMSNorm (Mamba-2's and Gated DeltaNet's output norm), forward and gradient, one warp per row.

    gate first (NBG false):  h = x * silu(z);  y = h * rstd_g(h) * w
    gate after (NBG true):   h = x;            y = h * rstd_g(h) * w * silu(z)
    rstd_g(h) = 1 / sqrt(mean over the row's group g of h^2 + eps)       (groups of G along the row)

Rows are the flattened leading axes, D the last; lane l of a warp owns columns l, l + 32, ...
(coalesced across lanes), so D and G are multiples of 32; where G is a multiple of 256, lane l owns
the eight columns 8 l .. 8 l + 7 of each 256-column chunk instead (16-byte loads and stores).
Statistics and arithmetic in float32, as `alloy.ops.norm.gated_rms_norm_ref`.

`FWD` writes y. `ADD_FWD` / `ADD_BWD` (no gate) put a residual add in front of the norm: hs = x + r
(rounded to the dtype, as MLX's add), y = rmsnorm(hs) w; the gradient adds hs's own cotangent to dx.
`BWD` recomputes h and the group statistics and writes dx, dz and, per warp, its
rows' share of dw (float32, summed by `sum_rows` afterwards):

    u = w dy (gate first) or w dy silu(z) (gate after);  c_g = rstd_g^3 mean_g(h u)
    dh = rstd_g u - c_g h;   gate first: dx = dh silu(z), dz = dh x silu'(z)
                             gate after: dx = dh,        dz = dy w h rstd_g silu'(z)
    dw = sum over rows of dy h rstd_g (times silu(z) when the gate is after)
"""
from __future__ import annotations

import mlx.core as mx

from alloy.metal.prelude import VEC_IO, Kernel, groups, sum_rows

NWP = 8  # warps (rows) per group
RPW = 8  # rows per warp in the gradient kernel (its dw share covers these rows)

_COMMON = """
  constexpr int J = D / (32 * VW);           // chunks of VW columns per lane
  constexpr int NGP = D / G;                  // groups per row
  constexpr int JG = G / (32 * VW);          // a lane's chunks per group
  const float ep = eps[0];
"""

_FWD_BODY = _COMMON + """
  const int R = x_shape[0];
  const int row = static_cast<int>(bid_x * NWP + warp);
  if (row < R) {
    const int base = row * D + VW * static_cast<int>(lane);
    float ss[NGP];
    float xh[HOLD ? J * VW : 1];               // HOLD: the row kept in registers for the second pass
    float zh[HOLD ? J * VW : 1];
    for (int g = 0; g < NGP; ++g) ss[g] = 0.0f;
    for (int j = 0; j < J; ++j) {
      float xv[VW];
      float zv[VW];
      LDV(x, base + 32 * VW * j, xv);/*ADD_STORE*/
      LDZ(base + 32 * VW * j, zv);
      if (HOLD) { for (int u = 0; u < VW; ++u) { xh[HI(j, u)] = xv[u]; zh[HI(j, u)] = zv[u]; } }
      for (int u = 0; u < VW; ++u) {
        const float h = NBG ? xv[u] : xv[u] * SILU_Z(zv[u]);
        ss[j / JG] += h * h;
      }
    }
    for (int g = 0; g < NGP; ++g) ss[g] = frsqrt(warp_sum(ss[g]) / static_cast<float>(G) + ep);
    for (int j = 0; j < J; ++j) {
      float xv[VW];
      float zv[VW];
      float wv[VW];
      float yv[VW];
      if (HOLD) { for (int u = 0; u < VW; ++u) { xv[u] = xh[HI(j, u)]; zv[u] = zh[HI(j, u)]; } }
      else { LDV(x, base + 32 * VW * j, xv);/*ADD*/
        LDZ(base + 32 * VW * j, zv); }
      LDV(w, VW * static_cast<int>(lane) + 32 * VW * j, wv);
      for (int u = 0; u < VW; ++u) {
        const float s = SILU_Z(zv[u]);
        yv[u] = NBG ? xv[u] * ss[j / JG] * wv[u] * s : xv[u] * s * ss[j / JG] * wv[u];
      }
      STV(y, base + 32 * VW * j, yv);
    }
  }
"""

# the residual add in front of a plain RMSNorm (the ADD_ kernels): hs = x + r rounded to T, as MLX's
# add of the two; the norm reads hs; the first pass writes it
_ADD = """
      { float r_[VW]; LDV(r, base + 32 * VW * j, r_);
        for (int u_ = 0; u_ < VW; ++u_) xv[u_] = static_cast<float>(static_cast<T>(xv[u_] + r_[u_])); }"""
_ADD_STORE = _ADD + """
      STV(hs, base + 32 * VW * j, xv);"""
# its gradient: x is hs, dr the cotangent hs receives directly (the residual stream's); the gradient of
# both addends is dx + dr
_ADD_GRAD = """
      { float r_[VW]; LDV(dr, base + 32 * VW * j, r_); for (int u_ = 0; u_ < VW; ++u_) dxv[u_] += r_[u_]; }"""


def _fwd_body(add: bool) -> str:
    return (_FWD_BODY.replace("/*ADD_STORE*/", _ADD_STORE if add else "")
            .replace("/*ADD*/", _ADD if add else ""))


_HELPERS = VEC_IO + """
// GATE false (a plain RMSNorm): z is neither read nor written and silu(z) counts as 1
#define LDZ(o, v) if (GATE) { LDV(z, o, v); } else { for (int u_ = 0; u_ < VW; ++u_) v[u_] = 0.0f; }
#define SILU_Z(v) (GATE ? fsilu(v) : 1.0f)
// HOLD: the register slot of a lane's value u of its chunk j of the row (0 where nothing is held, so
// the one-element arrays of HOLD false are never indexed past their end)
#define HI(j, u) ((VW * (j) + (u)) % (HOLD ? J * VW : 1))
"""

FWD = Kernel(name="alloy_gated_rms_norm", inputs=("x", "z", "w", "eps"), outputs=("y",), body=_fwd_body(False),
             helpers=_HELPERS)
# (x + r, rmsnorm(x + r) w): the residual stream's update and the next half-block's norm in one pass
ADD_FWD = Kernel(name="alloy_add_rms_norm", inputs=("x", "z", "w", "eps", "r"), outputs=("y", "hs"),
                 body=_fwd_body(True), helpers=_HELPERS)

_BWD_BODY = _COMMON + """
  const int R = x_shape[0];
  const int wid = static_cast<int>(bid_x * NWP + warp);   // this warp's rows: wid * RPW ...
  float dw[J * VW];                          // the weight is re-read per row (L1), not held
  for (int j = 0; j < J * VW; ++j) dw[j] = 0.0f;
  for (int q = 0; q < RPW; ++q) {
    const int row = wid * RPW + q;
    if (row >= R) break;
    const int base = row * D + VW * static_cast<int>(lane);
    float ss[NGP];
    float hu[NGP];
    float xh[HOLD ? J * VW : 1];               // HOLD: the row's x, z, dy kept for the second pass
    float zh[HOLD ? J * VW : 1];
    float dyh[HOLD ? J * VW : 1];
    for (int g = 0; g < NGP; ++g) {
      ss[g] = 0.0f;
      hu[g] = 0.0f;
    }
    for (int j = 0; j < J; ++j) {
      float xv[VW];
      float zv[VW];
      float dyv[VW];
      float wv[VW];
      LDV(x, base + 32 * VW * j, xv);
      LDZ(base + 32 * VW * j, zv);
      LDV(dy, base + 32 * VW * j, dyv);
      LDV(w, VW * static_cast<int>(lane) + 32 * VW * j, wv);
      if (HOLD) {
        for (int u = 0; u < VW; ++u) {
          const int i_ = HI(j, u);
          xh[i_] = xv[u];
          zh[i_] = zv[u];
          dyh[i_] = dyv[u];
        }
      }
      for (int u = 0; u < VW; ++u) {
        const float s = SILU_Z(zv[u]);
        const float h = NBG ? xv[u] : xv[u] * s;
        const float uu = wv[u] * dyv[u] * (NBG ? s : 1.0f);
        ss[j / JG] += h * h;
        hu[j / JG] += h * uu;
      }
    }
    for (int g = 0; g < NGP; ++g) {
      const float r = frsqrt(warp_sum(ss[g]) / static_cast<float>(G) + ep);
      ss[g] = r;
      hu[g] = r * r * r * warp_sum(hu[g]) / static_cast<float>(G);
    }
    for (int j = 0; j < J; ++j) {
      float xv[VW];
      float zv[VW];
      float dyv[VW];
      float dxv[VW];
      float dzv[VW];
      float wv[VW];
      if (HOLD) {
        for (int u = 0; u < VW; ++u) {
          const int i_ = HI(j, u);
          xv[u] = xh[i_];
          zv[u] = zh[i_];
          dyv[u] = dyh[i_];
        }
      } else {
        LDV(x, base + 32 * VW * j, xv);
        LDZ(base + 32 * VW * j, zv);
        LDV(dy, base + 32 * VW * j, dyv);
      }
      LDV(w, VW * static_cast<int>(lane) + 32 * VW * j, wv);
      const float r = ss[j / JG];
      for (int u = 0; u < VW; ++u) {
        const float sg = GATE ? 1.0f / (1.0f + fexp(-zv[u])) : 1.0f;
        const float s = GATE ? zv[u] * sg : 1.0f;
        const float ds = sg * (1.0f + zv[u] * (1.0f - sg));
        const float h = NBG ? xv[u] : xv[u] * s;
        const float uu = wv[u] * dyv[u] * (NBG ? s : 1.0f);
        const float dh = r * uu - hu[j / JG] * h;
        dxv[u] = NBG ? dh : dh * s;
        dzv[u] = NBG ? dyv[u] * wv[u] * h * r * ds : dh * xv[u] * ds;
        dw[VW * j + u] += dyv[u] * h * r * (NBG ? s : 1.0f);
      }
/*ADD_GRAD*/
      STV(dx, base + 32 * VW * j, dxv);
      if (GATE) { STV(dz, base + 32 * VW * j, dzv); }
    }
  }
  for (int j = 0; j < J; ++j)
    for (int u = 0; u < VW; ++u) dwp[wid * D + VW * static_cast<int>(lane) + 32 * VW * j + u] = dw[VW * j + u];
"""

BWD = Kernel(name="alloy_gated_rms_norm_bwd", inputs=("x", "z", "w", "eps", "dy"), outputs=("dx", "dz", "dwp"),
             body=_BWD_BODY.replace("/*ADD_GRAD*/", ""), helpers=_HELPERS)
ADD_BWD = Kernel(name="alloy_add_rms_norm_bwd", inputs=("x", "z", "w", "eps", "dy", "dr"),
                 outputs=("dx", "dz", "dwp"), body=_BWD_BODY.replace("/*ADD_GRAD*/", _ADD_GRAD), helpers=_HELPERS)


def applies(x, z, weight, group_size) -> bool:
    """Static facts under which the kernels run: a gate, a weight, D and G multiples of 32."""
    D = x.shape[-1]
    G = D if group_size is None else group_size
    return (z is not None and weight is not None and z.dtype == x.dtype and z.shape == x.shape
            and D % 32 == 0 and G % 32 == 0 and D % G == 0)


# The second pass over a row reuses its values kept in registers (instead of loading them again from
# L1 / L2) where a lane's share of the row is at most HOLD_FWD (forward: x, z) / HOLD_BWD (gradient:
# x, z, dy) values; 0 turns it off.
HOLD_FWD = 48
HOLD_BWD = 24


def _template(x, D, G, nbg, gate: bool = True, bwd: bool = False):
    # eight consecutive columns per lane (16-byte loads and stores) where every group spans whole
    # 256-column chunks; else one column per lane, 32 apart
    vw = 8 if G % 256 == 0 else 1
    hold = D // 32 <= (HOLD_BWD if bwd else HOLD_FWD)
    return [("T", x.dtype), ("D", D), ("G", G), ("NBG", bool(nbg)), ("NWP", NWP), ("RPW", RPW), ("VW", vw),
            ("GATE", bool(gate)), ("HOLD", bool(hold))]


def _rows(x, z):
    """(D, x and z as (R, D) rows, R); z None (no gate): a one-element placeholder the kernels never read."""
    D = x.shape[-1]
    x2 = x.reshape(-1, D)
    return D, x2, mx.zeros((1,), x.dtype) if z is None else z.reshape(-1, D), x2.shape[0]


def gated_rms_norm(x, z, weight, eps: float, group_size, norm_before_gate: bool, r=None):
    """FWD launch: y in x.dtype, the shape of x. z None: a plain RMSNorm (GATE false). r (no gate):
    ADD_FWD, the norm of hs = x + r -> (y, hs)."""
    D, x2, z2, R = _rows(x, z)
    G = D if group_size is None else group_size
    add = r is not None
    outs = (ADD_FWD if add else FWD)(
        [x2, z2, weight, mx.array([eps], mx.float32)] + ([r.astype(x.dtype).reshape(-1, D)] if add else []),
        template=_template(x, D, G, norm_before_gate, gate=z is not None),
        grid=(groups(R, NWP), 1, 1), threadgroup=32 * NWP, output_shapes=[(R, D)] * (1 + add),
        output_dtypes=[x.dtype] * (1 + add))
    return tuple(o.reshape(x.shape) for o in outs) if add else outs[0].reshape(x.shape)


def gated_rms_norm_vjp(x, z, weight, eps: float, group_size, norm_before_gate: bool, dy, dr=None):
    """BWD launch: (dx, dz, dweight) in the argument dtypes; z None: a plain RMSNorm's gradient,
    dz None. dr (no gate): ADD_BWD, x is hs and dr its direct cotangent, added to dx."""
    D, x2, z2, R = _rows(x, z)
    G = D if group_size is None else group_size
    nw = groups(R, RPW)
    gate = z is not None
    extra = [] if dr is None else [dr.astype(x.dtype).reshape(-1, D)]
    dx, dz, dwp = (BWD if dr is None else ADD_BWD)(
        [x2, z2, weight, mx.array([eps], mx.float32), dy.astype(x.dtype).reshape(-1, D)] + extra,
        template=_template(x, D, G, norm_before_gate, gate=gate, bwd=True), grid=(groups(nw, NWP), 1, 1),
        threadgroup=32 * NWP, output_shapes=[(R, D), (R, D) if gate else (1,), (groups(nw, NWP) * NWP, D)],
        output_dtypes=[x.dtype, z.dtype if gate else x.dtype, mx.float32])
    return dx.reshape(x.shape), dz.reshape(z.shape) if gate else None, sum_rows(dwp).astype(weight.dtype)


def rms_norm_applies(x, weight) -> bool:
    """Static facts under which the plain RMSNorm kernels run: a weight, D a multiple of 32."""
    return weight is not None and weight.shape == (x.shape[-1],) and x.shape[-1] % 32 == 0


def rms_norm(x, weight, eps: float):
    """FWD without a gate (GATE false): x * rsqrt(mean(x^2) + eps) * w in x.dtype, one rounding."""
    return gated_rms_norm(x, None, weight, eps, None, False)


def rms_norm_vjp(x, weight, eps: float, dy):
    """BWD without a gate: (dx, dweight) in the argument dtypes."""
    dx, _, dw = gated_rms_norm_vjp(x, None, weight, eps, None, False, dy)
    return dx, dw


def add_rms_norm(x, r, weight, eps: float):
    """ADD_FWD: (hs, y) with hs = x + r in x.dtype and y = rmsnorm(hs) w, one pass."""
    y, hs = gated_rms_norm(x, None, weight, eps, None, False, r=r)
    return hs, y


def add_rms_norm_vjp(hs, weight, eps: float, dhs, dy):
    """ADD_BWD: the gradient of `add_rms_norm` from its output hs and the cotangents of hs and y ->
    (d(x + r), dweight): the one cotangent both addends receive, and the weight's."""
    dx, _, dw = gated_rms_norm_vjp(hs, None, weight, eps, None, False, dy, dr=dhs)
    return dx, dw

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
rows' share of dw (float32, summed by `sum_rows` afterwards). `BWD_PIPE_K` / `ADD_BWD_PIPE_K` (the
default, switch `BWD_PIPE`) compute the same in one DRAM read per row: the row's 16-bit values held in
registers, split over SPL warps, the next row's loads in flight, one dw share per group of warps:

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
// one element of the gradient's second pass: x, z, dy, w; sg = sigmoid(z) (1 without a gate); r = rstd_g,
// c = rstd_g^3 mean_g(h u) -> dx, dz and the element's dw term (the formulas of the module docstring)
struct NormGrad { float dx, dz, dw; };
DEVICE_FN NormGrad norm_grad(bool gate, bool nbg, float x, float z, float sg, float dy, float w, float r, float c) {
  const float s = gate ? z * sg : 1.0f;
  const float ds = sg * (1.0f + z * (1.0f - sg));   // silu'(z)
  const float h = nbg ? x : x * s;
  const float uu = w * dy * (nbg ? s : 1.0f);
  const float dh = r * uu - c * h;
  NormGrad o;
  o.dx = nbg ? dh : dh * s;
  o.dz = nbg ? dy * w * h * r * ds : dh * x * ds;
  o.dw = dy * h * r * (nbg ? s : 1.0f);
  return o;
}
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
        const NormGrad e = norm_grad(GATE, NBG, xv[u], zv[u], sg, dyv[u], wv[u], r, hu[j / JG]);
        dxv[u] = e.dx;
        dzv[u] = e.dz;
        dw[VW * j + u] += e.dw;
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

# ---------------------------------------------------------------- the pipelined gradient (BWD_PIPE)
# The gradient in one DRAM read of each row: a row's x, z, dy (and dr) are loaded once as raw 16-bit
# words (`RawV`, packed: half a register per value) and kept for the second pass; with PIPE the next
# row's loads are issued before the current row is reduced (two rows in flight per warp). A row is
# split over SPL warps (a "team", S chosen so that a lane holds at most PIPE_COLS columns of it); the
# warps of a team exchange their group statistics through shared memory where a group spans several
# warps (EX). A group of NW warps holds NW / SPL teams, team t taking rows r0 + t, r0 + t + NT, ...
# (RPW rows each); the teams' dw shares are summed in shared memory, one float32 share per group.
_PIPE_HELPERS = _HELPERS + """
// a lane's VW consecutive elements kept unconverted: VW = 8 one Raw8 (16 bytes), VW = 1 one float
template <typename U> struct RawV { Raw8<U> r8; float f; };
#define LDR(p, o, rv) if (VW == 8) { rv.r8 = ldr8(p + (o)); } else { rv.f = static_cast<float>(p[o]); }
#define CVR(rv, v) if (VW == 8) { cvt8(rv.r8, v); } else { v[0] = rv.f; }
"""

_BWD_PIPE_BODY = """
  constexpr int J = D / (32 * VW);            // chunks of VW columns per lane and row
  constexpr int JS = J / SPL;                    // ... of the lane's warp's share of the row
  constexpr int JG = G / (32 * VW);           // chunks per group
  constexpr bool EX = JG > JS;                 // a group spans several warps of the team
  constexpr int NGL = EX ? 1 : JS / JG;        // groups within a warp's share
  constexpr int NT = NW / SPL;                   // teams (rows at a time) per group
  constexpr int P = PIPE ? JS : 1;             // PIPE: the next row's raw values
  constexpr int KS = (KSG && GATE) ? JS * VW : 1;   // KSG: sigmoid(z) kept from the first pass
  const float ep = eps[0];
  const int R = x_shape[0];
  const int ws = static_cast<int>(warp) % SPL;
  const int team = static_cast<int>(warp) / SPL;
  const int cb = 32 * VW * JS * ws + VW * static_cast<int>(lane);   // chunk jj: columns cb + 32 VW jj ..
  const int r0 = static_cast<int>(bid_x) * NT * RPW + team;         // the team's rows r0 + NT k
  SHARED float sx[EX ? 4 * NW : 1];           // (sum h^2, sum h u) per warp, two rows (parity)
  SHARED float red[NT > 1 ? D : 1];           // the teams' dw shares, summed
  float dw[JS * VW];
  for (int i = 0; i < JS * VW; ++i) dw[i] = 0.0f;
  RawV<T> xa[JS], za[JS], da[JS], ra[JS];
  RawV<T> xb[P], zb[P], db[P], rb[P];
  {
    const int o = (r0 < R ? r0 : R - 1) * D + cb;
    for (int jj = 0; jj < JS; ++jj) {
      LDR(x, o + 32 * VW * jj, xa[jj]);
      if (GATE) { LDR(z, o + 32 * VW * jj, za[jj]); }
      LDR(dy, o + 32 * VW * jj, da[jj]);/*LD_DR_A*/
    }
  }
#pragma unroll 1
  for (int k = 0; k < RPW; ++k) {
    const int row = r0 + NT * k;
    if (PIPE) {  // the next row's loads, in flight while this row is reduced (the last row reloaded)
      const int rn = row + NT < R ? row + NT : R - 1;
      const int o = (k + 1 < RPW ? rn : (row < R ? row : R - 1)) * D + cb;
      for (int jj = 0; jj < P; ++jj) {
        LDR(x, o + 32 * VW * jj, xb[jj]);
        if (GATE) { LDR(z, o + 32 * VW * jj, zb[jj]); }
        LDR(dy, o + 32 * VW * jj, db[jj]);/*LD_DR_B*/
      }
    }
    float ss[NGL];
    float hu[NGL];
    float sgk[KS];
    for (int g = 0; g < NGL; ++g) {
      ss[g] = 0.0f;
      hu[g] = 0.0f;
    }
    for (int jj = 0; jj < JS; ++jj) {
      float xv[VW];
      float zv[VW];
      float dyv[VW];
      float wv[VW];
      CVR(xa[jj], xv);
      if (GATE) { CVR(za[jj], zv); } else { for (int u = 0; u < VW; ++u) zv[u] = 0.0f; }
      CVR(da[jj], dyv);
      LDV(w, cb + 32 * VW * jj, wv);
      for (int u = 0; u < VW; ++u) {
        const float sg = GATE ? 1.0f / (1.0f + fexp(-zv[u])) : 1.0f;
        if (KSG && GATE) sgk[(VW * jj + u) % KS] = sg;
        const float s = GATE ? zv[u] * sg : 1.0f;
        const float h = NBG ? xv[u] : xv[u] * s;
        const float uu = wv[u] * dyv[u] * (NBG ? s : 1.0f);
        ss[EX ? 0 : jj / JG] += h * h;
        hu[EX ? 0 : jj / JG] += h * uu;
      }
    }
    for (int g = 0; g < NGL; ++g) {
      ss[g] = warp_sum(ss[g]);
      hu[g] = warp_sum(hu[g]);
    }
    if (EX) {  // the group's sums over the warps sharing it (fixed order); parity buffers: one barrier
      const int b = (k & 1) * 2 * NW;
      if (lane == 0) {
        sx[b + 2 * static_cast<int>(warp)] = ss[0];
        sx[b + 2 * static_cast<int>(warp) + 1] = hu[0];
      }
      BARRIER();
      const int w0 = team * SPL + (JS * ws / JG) * (JG / JS);
      float a = 0.0f;
      float c = 0.0f;
      for (int i = 0; i < (EX ? JG / JS : 1); ++i) {
        a += sx[b + 2 * (w0 + i)];
        c += sx[b + 2 * (w0 + i) + 1];
      }
      ss[0] = a;
      hu[0] = c;
    }
    for (int g = 0; g < NGL; ++g) {
      const float r = frsqrt(ss[g] / static_cast<float>(G) + ep);
      ss[g] = r;
      hu[g] = r * r * r * hu[g] / static_cast<float>(G);
    }
    // fl is never true (a NaN sum aside, where every output is NaN anyway): converting the raw words
    // again through it keeps the compiler from holding the first pass's floats (twice the registers)
    const bool fl = !(ss[0] >= 0.0f);
    if (row < R) {
      const int o = row * D + cb;
      for (int jj = 0; jj < JS; ++jj) {
        float xv[VW];
        float zv[VW];
        float dyv[VW];
        float wv[VW];
        float dxv[VW];
        float dzv[VW];
        const RawV<T> xq = fl ? da[jj] : xa[jj];
        const RawV<T> dq = fl ? xa[jj] : da[jj];
        CVR(xq, xv);
        if (GATE) { const RawV<T> zq = fl ? xa[jj] : za[jj]; CVR(zq, zv); } else { for (int u = 0; u < VW; ++u) zv[u] = 0.0f; }
        CVR(dq, dyv);
        LDV(w, cb + 32 * VW * jj, wv);
        const float r = ss[EX ? 0 : jj / JG];
        const float c = hu[EX ? 0 : jj / JG];
        for (int u = 0; u < VW; ++u) {
          const float sg = GATE ? ((KSG && GATE) ? sgk[(VW * jj + u) % KS] : 1.0f / (1.0f + fexp(-zv[u]))) : 1.0f;
          const NormGrad e = norm_grad(GATE, NBG, xv[u], zv[u], sg, dyv[u], wv[u], r, c);
          dxv[u] = e.dx;
          dzv[u] = e.dz;
          dw[VW * jj + u] += e.dw;
        }/*ADD_DR*/
        STV(dx, o + 32 * VW * jj, dxv);
        if (GATE) { STV(dz, o + 32 * VW * jj, dzv); }
      }
    }
    if (PIPE) {
      for (int jj = 0; jj < JS; ++jj) {
        xa[jj] = xb[jj % P];
        za[jj] = zb[jj % P];
        da[jj] = db[jj % P];/*MV_DR*/
      }
    } else if (k + 1 < RPW) {
      const int rn = row + NT < R ? row + NT : R - 1;
      const int o = rn * D + cb;
      for (int jj = 0; jj < JS; ++jj) {
        LDR(x, o + 32 * VW * jj, xa[jj]);
        if (GATE) { LDR(z, o + 32 * VW * jj, za[jj]); }
        LDR(dy, o + 32 * VW * jj, da[jj]);/*LD_DR_A*/
      }
    }
  }
  const int gb = static_cast<int>(bid_x) * D;
  if (NT > 1) {  // the teams' shares summed in order into red, then written by all threads
    for (int t = 0; t < NT; ++t) {
      if (team == t) {
        for (int jj = 0; jj < JS; ++jj)
          for (int u = 0; u < VW; ++u) {
            const int c = cb + 32 * VW * jj + u;
            red[c % (NT > 1 ? D : 1)] = (t == 0 ? 0.0f : red[c % (NT > 1 ? D : 1)]) + dw[VW * jj + u];
          }
      }
      BARRIER();
    }
    for (int c = static_cast<int>(tid); c < D; c += static_cast<int>(nthreads)) dwp[gb + c] = red[c % (NT > 1 ? D : 1)];
  } else {
    for (int jj = 0; jj < JS; ++jj)
      for (int u = 0; u < VW; ++u) dwp[gb + cb + 32 * VW * jj + u] = dw[VW * jj + u];
  }
"""


def _bwd_pipe_body(add: bool) -> str:
    b = _BWD_PIPE_BODY
    if add:
        b = (b.replace("/*LD_DR_A*/", "\n      LDR(dr, o + 32 * VW * jj, ra[jj]);")
             .replace("/*LD_DR_B*/", "\n        LDR(dr, o + 32 * VW * jj, rb[jj]);")
             .replace("/*MV_DR*/", "\n        ra[jj] = rb[jj % P];")
             .replace("/*ADD_DR*/", "\n        { float r_[VW]; CVR(ra[jj], r_); for (int u = 0; u < VW; ++u) dxv[u] += r_[u]; }"))
    return b


BWD_PIPE_K = Kernel(name="alloy_gated_rms_norm_bwd_pipe", inputs=("x", "z", "w", "eps", "dy"),
                    outputs=("dx", "dz", "dwp"), body=_bwd_pipe_body(False), helpers=_PIPE_HELPERS)
ADD_BWD_PIPE_K = Kernel(name="alloy_add_rms_norm_bwd_pipe", inputs=("x", "z", "w", "eps", "dy", "dr"),
                        outputs=("dx", "dz", "dwp"), body=_bwd_pipe_body(True), helpers=_PIPE_HELPERS)


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

# The gradient: BWD_PIPE_K / ADD_BWD_PIPE_K (one DRAM read per row, 16-bit values held, the next row's
# loads in flight; dw summed per group of warps) where True, else the per-warp BWD / ADD_BWD above.
BWD_PIPE = True
PIPE_COLS = 8        # at most this many columns of a row per lane: a row is split over S warps to fit
PIPE_WARPS = 8       # warps per group (NW = S * max(1, PIPE_WARPS // S))
PIPE_ROWS = 32       # rows per group (one dw share each): RPW = PIPE_ROWS / (NW / S) rows per team
PIPE_PREFETCH = True  # PIPE: issue the next row's loads before reducing the current one
PIPE_KEEP_SIG = True  # KSG: keep sigmoid(z) from the first pass in registers (else recomputed)


def _pipe_split(D: int, G: int, vw: int):
    """Warps per row S of the pipelined gradient: the fewest that divide the row's chunks, give each
    lane at most PIPE_COLS columns, and cut no group unevenly (a warp's share holds whole groups, or a
    group whole shares); None where no S <= 32 does (the per-warp kernel runs)."""
    J, JG = D // (32 * vw), G // (32 * vw)
    for S in range(1, min(J, 32) + 1):
        JS = J // S
        if J % S == 0 and (JS % JG == 0 or JG % JS == 0) and JS * vw <= PIPE_COLS:
            return S
    return None


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
    gate = z is not None
    extra = [] if dr is None else [dr.astype(x.dtype).reshape(-1, D)]
    vw = 8 if G % 256 == 0 else 1
    S = _pipe_split(D, G, vw) if BWD_PIPE and R > 0 else None
    if S is not None:
        nt = max(1, PIPE_WARPS // S)
        rpw = groups(PIPE_ROWS, nt)
        nb = groups(R, nt * rpw)
        dx, dz, dwp = (BWD_PIPE_K if dr is None else ADD_BWD_PIPE_K)(
            [x2, z2, weight, mx.array([eps], mx.float32), dy.astype(x.dtype).reshape(-1, D)] + extra,
            template=[("T", x.dtype), ("D", D), ("G", G), ("NBG", bool(norm_before_gate)), ("GATE", gate),
                      ("VW", vw), ("SPL", S), ("NW", nt * S), ("RPW", rpw), ("PIPE", bool(PIPE_PREFETCH)),
                      ("KSG", bool(PIPE_KEEP_SIG))],
            grid=(nb, 1, 1), threadgroup=32 * nt * S,
            output_shapes=[(R, D), (R, D) if gate else (1,), (nb, D)],
            output_dtypes=[x.dtype, z.dtype if gate else x.dtype, mx.float32])
        return dx.reshape(x.shape), dz.reshape(z.shape) if gate else None, sum_rows(dwp).astype(weight.dtype)
    nw = groups(R, RPW)
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

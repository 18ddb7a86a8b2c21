"""A whole stack of pre-norm Mamba-2 residual blocks for one decode token, in ONE persistent launch.

    for each layer l:                                                   (h: the residual stream)
        zxbcdt = rms_norm(h) W_in[l]^T                                  phase A
        y      = mamba2_step(zxbcdt, conv[l], ssm[l], ...)              phase B (conv, dt, SSD, D, gate)
        h      = h + group_rms_norm(y) W_out[l]^T                       phase C

Why: batch-1 decode of a 1.3B Mamba-2 is ~2.6 GB of weights per token — under a millisecond of HBM
time on an H100 — but the per-layer path is ~150 launches, and MLX's CUDA back-end spends ~8 us of
host time encoding each one (plus per-input work in the compiled call), more than the GPU work
itself. Here a fixed grid of NB groups (one 512-thread group per SM, all resident) walks every
layer; the three phases of a layer are separated by grid-wide barriers, so a token costs one launch
and ~3 x layers barriers of 1-2 us.

Work split, every phase over all groups:
  A / C  the projection's output rows are strided over all warps of the grid (row o: warp o % TW);
         each group first builds the normalised input vector in group-shared memory (every group
         redoes the few-KB norm: cheaper than another barrier), then each warp multiplies its rows in
         work units of 256 * CU columns (CU 16-byte loads per lane) and reduces each row with one
         warp sum. A covers the z, x, B and C rows of in_proj (8448 rows of the 1.3B shape: exactly
         four per warp); C adds the residual.
  B      the state rows (batch x heads x head_dim) are split into NB ranges; each group computes the
         dt rows of in_proj for its heads (from A's normalised input, still in group-shared memory),
         convolves its rows' x channels and every row's B / C channels into group-shared memory
         (group 0 writes the B / C conv state), then each warp updates whole state rows with lanes
         along d_state and reduces the readout.
Weights do not depend on the token, so they stream ahead of the dependency chain: each warp holds
two work units of raw weights in registers (`ldr8`, converted at use by `cvt8`); inside a phase
unit k + 2 loads while unit k is multiplied, and a phase's first two units, its norm weights, the
next PF units (towards L2) and phase B's first state rows load between the two halves of the grid
barrier before it (`grid_arrive` ... `grid_wait`), so the barrier's wait overlaps HBM traffic.
Scratch between phases (the residual, in_proj outputs, gated y) lives in float32 outputs read with
`ld_cg` (coherent across groups of the launch). Values are rounded to the activation dtype T where
the per-layer path rounds them (normalised inputs, projection outputs, conv outputs, y, the gate,
the residual sum), so the result matches the three-launch path (dt's row sum is split into units
whose partial sums add in a different order).

Weights are stacked per layer (`alloy.layers.mamba2.stack_prepare`, once per model); states are per
layer in the model's state tree: layer l's conv / SSM state pointers are picked by a generated
select chain (2 x layers state inputs) and the new states are written to two stacked outputs
whose per-layer views become the next state.
Metal caps a kernel at 31 buffers, so this kernel is dispatched on CUDA only (its Metal dialect
is generated from the same body; Metal also gives no forward-progress guarantee to spinning
threadgroups); elsewhere the per-layer fused path runs.

Shapes: x (MB, DM) in T; nw (NL, DM), gw (NL, DIN) float32 norm weights; win (NL, DP, DM), wout
(NL, DM, DIN) in the weight dtype; cw (NL, CD, K); cb (NL, CD) (any array when HAS_BIAS is false);
dtb, alog, dsk (NL, H); prm float32 [eps, norm_eps, dt_lo, dt_hi]; bar (1024,) uint32 zeros (the
barrier's counters; bigger than 8 bytes so that MLX-CUDA takes it from device memory — its <= 8-byte
pool is managed memory, where the spinning made every barrier ~0.6 ms); conv states c<l>
(MB, K-1, CD) in S; ssm states s<l> (MB, H, HD, NS) float32. Outputs: h (MB, DM) in T, scratch res
(MB, DM), zx (MB, DP), yg (MB, DIN) float32, new states stacked: nconv (NL, MB, K-1, CD) in S,
nssm (NL, MB, H, HD, NS) float32 (the caller takes per-layer views; few outputs keep MLX's
per-node host work small).
"""
from __future__ import annotations

import ctypes
import functools
import os

import mlx.core as mx

from alloy.metal.prelude import Kernel
from alloy.params.tree import unstack

NT = 512  # threads per group
PER_SM = 1  # resident groups per SM (CUDA launch bounds cap registers at 128 for this)
MAX_ROWS = 4  # batch rows the kernel takes (group-shared input vectors)
SHARED_BUDGET = 44 * 1024  # bytes of static group-shared memory we allow ourselves

_BODY = r"""
  constexpr int H = DIN / HD;
  constexpr int GN = NGR * NS;
  constexpr int CD = DIN + 2 * GN;
  constexpr int DP = 2 * DIN + 2 * GN + H;
  constexpr int NWP = NT / 32;
  constexpr int TW = NB * NWP;                   // warps in the grid
  constexpr int RS = MB * H * HD;                // state rows of phase B
  constexpr int RBS = (RS + NB - 1) / NB;        // state rows per group
  constexpr int VPT = (XMAX + NT - 1) / NT;      // input-vector elements per thread
  constexpr int NV = NS / 32 > 0 ? NS / 32 : 1;  // state elements per lane (whole 32-lane rounds)
  constexpr int UC = 256 * CU;                   // columns of one work unit (CU 8-column blocks per lane)
  constexpr int UPA = (DM + UC - 1) / UC;        // units per in_proj row
  constexpr int UPC = (DIN + UC - 1) / UC;       // units per out_proj row
  constexpr int PFE = 128 / static_cast<int>(sizeof(W));  // weight elements per 128-byte line
  ALIGN16 SHARED T xn[MB * XMAX];                // the normalised projection input (16-byte rows)
  SHARED float red[MB * (NG > 1 ? NG : 1) * NWP];
  SHARED float bc[MB * 2 * GN];                  // convolved B and C of every batch row
  SHARED float xc[RBS];                          // convolved x of this group's state rows
  SHARED float dts[(RBS / HD + 2) * UPA];        // partial dt projections of this group's heads
  const int g0 = bid_x;
  const int gwarp = g0 * NWP + warp;
  // a warp's projection work: its rows o = gwarp + j * TW, each split into units of UC columns
  constexpr int DPA = 2 * DIN + 2 * GN;          // in_proj rows of phase A (z, x, B, C; dt: phase B)
  const int nuA = gwarp < DPA ? ((DPA - 1 - gwarp) / TW + 1) * UPA : 0;
  // phase B's rows [lo, hi) span the (batch row, head) pairs hb0 .. hb0 + nhd - 1 (r / HD = m * H + h);
  // their dt rows of in_proj are phase B's own work: NJ jobs of one unit each, job j = pair j / UPA,
  // unit j % UPA, partial sums meet in group-shared dts[]
  const int lo = g0 * RBS;
  const int hi = lo + RBS < RS ? lo + RBS : RS;
  const int hb0 = lo / HD;
  const int njob = hi > lo ? ((hi - 1) / HD - hb0 + 1) * UPA : 0;
  const int nuC = gwarp < DM ? ((DM - 1 - gwarp) / TW + 1) * UPC : 0;
  // weights do not depend on the activations: each warp keeps two units of raw weights in registers
  // (pa, pb), loaded before the grid barrier that precedes their phase, so the barrier wait overlaps
  // the weight stream; inside a phase unit k + 2 is loaded while unit k is multiplied
  Raw8<W> pa[CU];
  Raw8<W> pb[CU];
  float nv[VPT];  // the next projection phase's norm weights
#define ALLOY_UNIT(KU, INP)                                                                       \
  const int in_ = (INP) ? DM : DIN;                                                               \
  const int upr_ = (INP) ? UPA : UPC;                                                             \
  const int o_ = gwarp + ((KU) / upr_) * TW;                                                      \
  const int c_ = ((KU) % upr_) * UC;
#define ALLOY_LOAD(BUF, KU, LL, INP)                                                              \
  {                                                                                               \
    ALLOY_UNIT(KU, INP)                                                                           \
    const DEV W* p_ = (INP) ? win + (static_cast<long>(LL) * DP + o_) * DM                        \
                            : wout + (static_cast<long>(LL) * DM + o_) * DIN;                     \
    for (int u = 0; u < CU; ++u)                                                                  \
      if (c_ + lane * 8 + 256 * u < in_) BUF[u] = ldr8(p_ + c_ + lane * 8 + 256 * u);             \
  }
#define ALLOY_PREFETCH(KU, LL, INP)                                                               \
  {                                                                                               \
    ALLOY_UNIT(KU, INP)                                                                           \
    const DEV W* p_ = (INP) ? win + (static_cast<long>(LL) * DP + o_) * DM                        \
                            : wout + (static_cast<long>(LL) * DM + o_) * DIN;                     \
    for (int c = c_ + lane * PFE; c < c_ + UC && c < in_; c += 32 * PFE) prefetch_l2(p_ + c);    \
  }
  // dt job J of layer LL (a unit of the dt row of (batch row, head) pair hb0 + J / UPA) into BUF
#define ALLOY_LOAD_DT(BUF, J, LL)                                                                 \
  {                                                                                               \
    const int c_ = ((J) % UPA) * UC;                                                              \
    const DEV W* p_ = win + (static_cast<long>(LL) * DP + DPA + (hb0 + (J) / UPA) % H) * DM;       \
    for (int u = 0; u < CU; ++u)                                                                  \
      if (c_ + lane * 8 + 256 * u < DM) BUF[u] = ldr8(p_ + c_ + lane * 8 + 256 * u);              \
  }
  // phase B's state rows lo + Q0 + i * NWP (i < QB) of this warp: SSM state, per-head constants
#define ALLOY_LOAD_ROWS(Q0)                                                                       \
  for (int i = 0; i < QB; ++i) {                                                                  \
    const int r = lo + (Q0) + i * NWP;                                                            \
    if ((Q0) + i * NWP < RBS && r < hi) {                                                         \
      const int h = (r % (H * HD)) / HD;  /* state row r is (batch row, head, p) in order */       \
      for (int u = 0; u < NS / 32; ++u) sv[i * NV + u] = sst[r * NS + lane + 32 * u];            \
      hdt[i] = static_cast<float>(dtb[l * H + h]);                                                \
      hal[i] = static_cast<float>(alog[l * H + h]);                                               \
      hds[i] = static_cast<float>(dsk[l * H + h]);                                                \
    }                                                                                             \
  }
  // ... and their gates (written in phase A)
#define ALLOY_LOAD_GATES(Q0)                                                                      \
  for (int i = 0; i < QB; ++i) {                                                                  \
    const int r = lo + (Q0) + i * NWP;                                                            \
    if ((Q0) + i * NWP < RBS && r < hi) rz[i] = ld_cg(zx + (r / (H * HD)) * DP + r % (H * HD));   \
  }
  // the first two units of phase `INP` of layer LL into pa / pb, the next PF towards L2, and the
  // phase's norm weights (this thread's input columns) into nv
#define ALLOY_PRELOAD(LL, INP)                                                                    \
  {                                                                                               \
    const int nu_ = (INP) ? nuA : nuC;                                                            \
    if (nu_ > 0) ALLOY_LOAD(pa, 0, LL, INP)                                                       \
    if (nu_ > 1) ALLOY_LOAD(pb, 1, LL, INP)                                                       \
    for (int k = 0; k < VPT; ++k) {                                                               \
      const int c = tid + k * NT;                                                                 \
      if ((INP) && c < DM) nv[k] = nw[(LL) * DM + c];                                             \
      if (!(INP) && NG > 0 && c < DIN) nv[k] = gw[(LL) * DIN + c];                                \
    }                                                                                             \
    for (int k = 2; k < nu_ && k < 2 + PF; ++k) ALLOY_PREFETCH(k, LL, INP)                        \
  }
  // multiply unit KU held in BUF with the normalised input; at a row's last unit reduce and store
#define ALLOY_DOT(BUF, KU)                                                                        \
  {                                                                                               \
    ALLOY_UNIT(KU, inp)                                                                           \
    if (!inp && c_ == 0 && lane == 0)                                                             \
      for (int m = 0; m < MB; ++m) rv[m] = ld_cg(res + m * DM + o_);                              \
    for (int u = 0; u < CU; ++u) {                                                                \
      const int c = c_ + lane * 8 + 256 * u;                                                      \
      if (c < in_) {                                                                              \
        float w[8];                                                                               \
        cvt8(BUF[u], w);                                                                          \
        for (int m = 0; m < MB; ++m) {                                                            \
          float xv[8];                                                                            \
          ld8(xn + m * XMAX + c, xv);                                                             \
          for (int j = 0; j < 8; ++j) acc[m] += w[j] * xv[j];                                     \
        }                                                                                         \
      }                                                                                           \
    }                                                                                             \
    if ((KU) % upr_ == upr_ - 1) {                                                                \
      for (int m = 0; m < MB; ++m) {                                                              \
        const float s = warp_sum(acc[m]);                                                         \
        acc[m] = 0.0f;                                                                            \
        if (lane == 0) {                                                                          \
          if (inp) {                                                                              \
            zx[m * DP + o_] = static_cast<float>(static_cast<T>(s));                              \
          } else {                                                                                \
            const float v = static_cast<float>(static_cast<T>(s + rv[m]));                        \
            res[m * DM + o_] = v;                                                                 \
            if (l == NL - 1) hout[m * DM + o_] = static_cast<T>(v);                               \
          }                                                                                       \
        }                                                                                         \
      }                                                                                           \
    }                                                                                             \
  }
  unsigned int nsync = 0;
  // prologue: the residual stream starts as the embedded token; layer 0's first in_proj units load
  for (int i = g0 * NT + tid; i < MB * DM; i += NB * NT) res[i] = static_cast<float>(x[i]);
  nsync += NB;
  grid_arrive(bar, nsync, tid);
  ALLOY_PRELOAD(0, true)
  grid_wait(bar, nsync, tid);
  for (int l = 0; l < NL; ++l) {
    const DEV S* cst = SELECT_CONV;
    const DEV float* sst = SELECT_SSM;
    DEV S* ncst = nconv + static_cast<long>(l) * MB * (K - 1) * CD;
    DEV float* nsst = nssm + static_cast<long>(l) * MB * H * HD * NS;
    // phase B's first QB state rows of this warp and their per-head constants (loaded before the
    // barrier that ends phase A)
    float sv[QB * NV];
    float hdt[QB], hal[QB], hds[QB];
    for (int ph = 0; ph < 3; ph += 2) {
      if (ph == 2) {  // <phase B>
        // ---------------- phase B: conv + dt + SSD state update + D skip + gate ----------------
        // this warp's first rows' gate (written in phase A), issued with the conv's loads
        float rz[QB];
        ALLOY_LOAD_GATES(warp)
        // the dt projections of this group's heads, from phase A's normalised input (still in xn); the
        // first job of each warp was loaded into pb at the end of phase A
        for (int j = warp; j < njob; j += NWP) {
          if (j != warp) ALLOY_LOAD_DT(pb, j, l)
          const int m = (hb0 + j / UPA) / H;
          const int c_ = (j % UPA) * UC;
          float acc = 0.0f;
          for (int u = 0; u < CU; ++u) {
            const int c = c_ + lane * 8 + 256 * u;
            if (c < DM) {
              float w[8], xv[8];
              cvt8(pb[u], w);
              ld8(xn + m * XMAX + c, xv);
              for (int k = 0; k < 8; ++k) acc += w[k] * xv[k];
            }
          }
          acc = warp_sum(acc);
          if (lane == 0) dts[j] = acc;
        }
        for (int i = tid; i < MB * 2 * GN + RBS; i += NT) {
          int m, c;
          const bool isx = i >= MB * 2 * GN;
          if (isx) {
            const int r = lo + i - MB * 2 * GN;
            if (r >= hi) continue;
            m = r / (H * HD);
            c = r % (H * HD);
          } else {
            m = i / (2 * GN);
            c = DIN + i % (2 * GN);
          }
          const float xin = ld_cg(zx + m * DP + DIN + c);
          const int sb = m * (K - 1) * CD + c;
          float acc = HAS_BIAS ? static_cast<float>(cb[l * CD + c]) : 0.0f;
          for (int k = 0; k < K - 1; ++k)
            acc += static_cast<float>(cw[(l * CD + c) * K + k]) * static_cast<float>(static_cast<T>(cst[sb + k * CD]));
          acc += static_cast<float>(cw[(l * CD + c) * K + K - 1]) * xin;
          const float v = static_cast<float>(static_cast<T>(fsilu(acc)));
          if (isx) xc[i - MB * 2 * GN] = v; else bc[i] = v;
          if (isx || g0 == 0) {
            for (int k = 0; k < K - 2; ++k) ncst[sb + k * CD] = cst[sb + (k + 1) * CD];
            ncst[sb + (K - 2) * CD] = static_cast<S>(xin);
          }
        }
        BARRIER();
        // each warp updates QB rows at a time (the first QB were loaded before the barrier)
        for (int q0 = warp; q0 < RBS; q0 += NWP * QB) {
          if (q0 != warp) {
            ALLOY_LOAD_ROWS(q0)
            ALLOY_LOAD_GATES(q0)
          }
          for (int i = 0; i < QB; ++i) {
            const int q = q0 + i * NWP;
            const int r = lo + q;
            if (q >= RBS || r >= hi) break;
            const int m = r / (H * HD);
            const int hp = r % (H * HD);
            const int h = hp / HD;
            const int g = h / (H / NGR);
            float dr = 0.0f;
            for (int u = 0; u < UPA; ++u) dr += dts[(r / HD - hb0) * UPA + u];
            float dtv = fsoftplus(static_cast<float>(static_cast<T>(dr)) + hdt[i]);
            dtv = dtv < prm[2] ? prm[2] : (dtv > prm[3] ? prm[3] : dtv);
            const float decay = fexp(-dtv * fexp(hal[i]));
            const float xv = xc[q];
            const float dx = dtv * xv;
            const int row = (m * H + h) * HD + hp % HD;
            const int bo = m * 2 * GN + g * NS;   // B at bc[bo + j], C at bc[bo + GN + j]
            float acc = 0.0f;
            for (int u = 0; u < NS / 32; ++u) {
              const int j = lane + 32 * u;
              const float s = decay * sv[i * NV + u] + dx * bc[bo + j];
              nsst[row * NS + j] = s;
              acc += s * bc[bo + GN + j];
            }
            for (int j = (NS / 32) * 32 + lane; j < NS; j += 32) {
              const float s = decay * sst[row * NS + j] + dx * bc[bo + j];
              nsst[row * NS + j] = s;
              acc += s * bc[bo + GN + j];
            }
            acc = warp_sum(acc);
            if (lane == 0) {
              const float y = static_cast<float>(static_cast<T>(acc + hds[i] * xv));
              yg[m * DIN + hp] = static_cast<float>(static_cast<T>(y * fsilu(rz[i])));
            }
          }
        }
        // while the grid gathers: the second out_proj unit of this warp loads
        nsync += NB;
        grid_arrive(bar, nsync, tid);
        if (nuC > 1) ALLOY_LOAD(pb, 1, l, false)
        grid_wait(bar, nsync, tid);
      }  // </phase B>
      // ---------------- phases A (ph 0: norm + in_proj) and C (ph 2: gated norm + out_proj + residual)
      const bool inp = ph == 0;
      const int IN = inp ? DM : DIN;
      const int ng = inp ? 1 : NG;                  // norm groups (0: no norm)
      const int nu = inp ? nuA : nuC;
      // <phase start>
      const DEV float* src = inp ? res : yg;
      const float ep = inp ? prm[0] : prm[1];
      const int gs = IN / (ng > 0 ? ng : 1);
      // the input vector is read once (registers); per-group sums of squares meet in shared memory
      float vv[MB * VPT];
      for (int m = 0; m < MB; ++m)
        for (int k = 0; k < VPT; ++k) {
          const int c = tid + k * NT;
          vv[m * VPT + k] = c < IN ? ld_cg(src + m * IN + c) : 0.0f;
        }
      if (ng > 0) {
        for (int m = 0; m < MB; ++m)
          for (int g = 0; g < ng; ++g) {
            float s = 0.0f;
            for (int k = 0; k < VPT; ++k) {
              const int c = tid + k * NT;
              if (c < IN && c / gs == g) s += vv[m * VPT + k] * vv[m * VPT + k];
            }
            s = warp_sum(s);
            if (lane == 0) red[(m * ng + g) * NWP + warp] = s;
          }
        BARRIER();
      }
      for (int m = 0; m < MB; ++m)
        for (int k = 0; k < VPT; ++k) {
          const int c = tid + k * NT;
          if (c < IN) {
            float v = vv[m * VPT + k];
            if (ng > 0) {
              const int g = c / gs;
              float s = 0.0f;
              for (int w = 0; w < NWP; ++w) s += red[(m * ng + g) * NWP + w];
              v = v * frsqrt(s / static_cast<float>(gs) + ep) * nv[k];
            }
            xn[m * XMAX + c] = static_cast<T>(v);
          }
        }
      BARRIER();
      // units in pairs: pa / pb hold units k / k + 1; each is refilled with unit k + 2 / k + 3
      // right after its multiply, so two units of weights are always on their way
      float acc[MB];
      float rv[MB];
      for (int m = 0; m < MB; ++m) acc[m] = 0.0f;
      for (int k = 0; k < nu; k += 2) {
        ALLOY_DOT(pa, k)
        if (k + 2 < nu) ALLOY_LOAD(pa, k + 2, l, inp)
        if (k + 1 < nu) {
          ALLOY_DOT(pb, k + 1)
          if (k + 3 < nu) ALLOY_LOAD(pb, k + 3, l, inp)
        }
      }
      const bool sync = l < NL - 1 || inp;
      if (sync) {
        nsync += NB;
        grid_arrive(bar, nsync, tid);
      }
      // while the grid gathers: loads that need nothing from this token
      if (inp) {  // phase B's first state rows, constants and dt job, out_proj's first unit
        if (warp < njob) ALLOY_LOAD_DT(pb, warp, l)
        ALLOY_LOAD_ROWS(warp)
        if (nuC > 0) ALLOY_LOAD(pa, 0, l, false)
        for (int k = 2; k < nuC && k < 2 + PF; ++k) ALLOY_PREFETCH(k, l, false)
        for (int k = 0; k < VPT; ++k)
          if (NG > 0 && tid + k * NT < DIN) nv[k] = gw[l * DIN + tid + k * NT];
      } else if (l < NL - 1) {  // the next layer's first in_proj units
        ALLOY_PRELOAD(l + 1, true)
      }
      if (sync) {
        grid_wait(bar, nsync, tid);
      }
    }
  }
#undef ALLOY_UNIT
#undef ALLOY_LOAD_DT
#undef ALLOY_LOAD_ROWS
#undef ALLOY_LOAD_GATES
#undef ALLOY_LOAD
#undef ALLOY_PREFETCH
#undef ALLOY_PRELOAD
#undef ALLOY_DOT
"""

_FIXED_INPUTS = ("x", "nw", "gw", "win", "wout", "cw", "cb", "dtb", "alog", "dsk", "prm", "bar")
_FIXED_OUTPUTS = ("hout", "res", "zx", "yg", "nconv", "nssm")


def _select(prefix: str, n: int) -> str:
    """`l == 0 ? p0 : l == 1 ? p1 : ... : p<n-1>`: layer l's pointer among n per-layer arguments."""
    return "".join(f"l == {i} ? {prefix}{i} : " for i in range(n - 1)) + f"{prefix}{n - 1}"


@functools.lru_cache(maxsize=None)
def kernel(n_layers: int) -> Kernel:
    """The persistent kernel for a stack of `n_layers` (state pointers are per layer)."""
    body = _BODY.replace("SELECT_CONV", _select("c", n_layers)).replace("SELECT_SSM", _select("s", n_layers))
    inputs = _FIXED_INPUTS + tuple(f"c{i}" for i in range(n_layers)) + tuple(f"s{i}" for i in range(n_layers))
    return Kernel(name=f"alloy_mamba2_stack_{n_layers}", inputs=inputs, outputs=_FIXED_OUTPUTS, body=body,
                  launch_bounds=(NT, PER_SM))


UNIT_BYTES = 16 * 4  # weight bytes per lane and work unit (four 16-byte loads)
QB = 4  # most state rows a warp loads before updating them
PREFETCH_UNITS = 2  # units after a phase's first two that start towards L2 during the barrier before it


def unit_blocks(weight_dtype) -> int:
    """CU: 8-column blocks per lane and work unit (a unit is 256 * CU columns of one row)."""
    return max(1, UNIT_BYTES // (8 * weight_dtype.size))


def rows_per_pass(mb: int, din: int, nb: int, threads: int) -> int:
    """QB: state rows a warp takes per pass (no more than its share of the group's rows)."""
    rbs = -(-(mb * din) // nb)
    return max(1, min(QB, -(-rbs // (threads // 32))))


def shared_bytes(dims: dict, mb: int, nb: int, act_bytes: int) -> int:
    """Static group-shared memory of the kernel for these dims (must stay under the 48 KB limit)."""
    xmax = max(dims["DM"], dims["DIN"])
    nwp = NT // 32
    rbs = -(-(mb * dims["DIN"]) // nb)
    dts = (rbs // (dims["DIN"] // dims["H"]) + 2) * -(-dims["DM"] // 256)  # dt partial sums (units >= 256 columns)
    return mb * xmax * act_bytes + 4 * (mb * max(dims["NG"], 1) * nwp + mb * 2 * dims["NGR"] * dims["NS"] + rbs + dts)


@functools.lru_cache(maxsize=None)
def resident_groups() -> int:
    """Groups the kernel launches: PER_SM per streaming multiprocessor (all resident at once, which the
    grid barrier needs; the launch bounds make PER_SM groups fit). ALLOY_PERSISTENT_GROUPS overrides; the CUDA driver is asked for the SM count."""
    env = os.environ.get("ALLOY_PERSISTENT_GROUPS")
    if env:
        return int(env)
    try:
        cu = ctypes.CDLL("libcuda.so.1")
        dev, n = ctypes.c_int(), ctypes.c_int()
        if cu.cuInit(0) == 0 and cu.cuDeviceGet(ctypes.byref(dev), 0) == 0 and \
                cu.cuDeviceGetAttribute(ctypes.byref(n), 16, dev) == 0 and n.value > 0:  # 16: SM count
            return PER_SM * n.value
    except OSError:
        pass
    return 32


def dims_of(stack: dict, d_state: int, norm_groups: int) -> dict:
    """Model dims read off the stacked weights (`alloy.layers.mamba2.stack_prepare`); norm_groups 0:
    no norm before out_proj."""
    NL, DP, DM = stack["win"].shape
    CD, K = stack["cw"].shape[1:]
    H = stack["dtb"].shape[1]
    DIN = stack["wout"].shape[2]
    return {"NL": NL, "DM": DM, "DIN": DIN, "DP": DP, "CD": CD, "K": K, "H": H, "HD": DIN // H, "NS": d_state,
            "NGR": (CD - DIN) // (2 * d_state), "NG": norm_groups}


def fits(d: dict, rows: int, act_dtype, nb: int) -> bool:
    """The dims fit the kernel: 8-column blocks, whole norm groups, group-shared memory."""
    if rows > MAX_ROWS or d["DM"] % 8 or d["DIN"] % 8 or (d["NG"] and d["DIN"] % d["NG"]) or d["K"] < 2:
        return False
    if -(-max(d["DM"], d["DIN"]) // NT) * rows > 32:  # input-vector registers per thread
        return False
    return shared_bytes(d, rows, nb, 4 if act_dtype == mx.float32 else 2) <= SHARED_BUDGET


def applies(stack: dict, x: mx.array, act_dtype, d_state: int, norm_groups: int) -> bool:
    """Static facts: the CUDA back-end (see the module docstring for Metal) and dims that fit."""
    from alloy.metal.prelude import backend

    return (backend() == "cuda" and act_dtype in (mx.float16, mx.bfloat16, mx.float32)
            and fits(dims_of(stack, d_state, norm_groups), x.shape[0], act_dtype, resident_groups()))


def launch(stack: dict, x: mx.array, conv_states, ssm_states, *, d_state: int, norm_groups: int, eps: float,
           norm_eps: float, dt_lim: tuple, nb: int | None = None, threads: int = NT, run=None,
           cu: int | None = None, pf: int | None = None, tag: int = 0):
    """Run the stack on one token: x (MB, DM) the embedded token in the activation dtype; per-layer
    conv states (MB, K-1, CD) and SSM states (MB, H, HD, NS) float32. Returns (h (MB, DM), [new
    conv states], [new ssm states]). ``nb`` / ``threads``: grid and group size (defaults: one group
    per SM, NT threads); ``run``: a launcher with Kernel.__call__'s signature (default: the kernel
    on the running backend; tests pass the CPU emulator); ``cu``: 8-column blocks per lane and work
    unit (default `unit_blocks` of the weight dtype; tests shrink it to split rows into units); ``pf``:
    units prefetched into L2 beyond the two held in registers (default PREFETCH_UNITS); ``tag``: a
    number distinct for each launch of one decode step (a hybrid's stretches: their first depth) —
    it sizes the barrier scratch (1024 + 32 tag words, the kernel uses the first 1024), so that
    `mx.compile` cannot merge two launches' zeroed scratch into one buffer."""
    d = dims_of(stack, d_state, norm_groups)
    NL = d["NL"]
    MB = x.shape[0]
    nb = nb or resident_groups()
    prm = mx.array([eps, norm_eps, dt_lim[0], dt_lim[1]], dtype=mx.float32)
    cb = stack.get("cb")
    inputs = [x, stack["nw"], stack["gw"], stack["win"], stack["wout"], stack["cw"],
              stack["cw"] if cb is None else cb, stack["dtb"], stack["alog"], stack["dsk"], prm,
              mx.zeros((1024 + 32 * tag,), dtype=mx.uint32), *conv_states, *ssm_states]
    cdt = conv_states[0].dtype
    outs = (run or kernel(NL))(
        inputs,
        template=[("T", x.dtype), ("S", cdt), ("NL", NL), ("DM", d["DM"]), ("DIN", d["DIN"]), ("NS", d["NS"]),
                  ("NGR", d["NGR"]), ("HD", d["HD"]), ("K", d["K"]), ("NG", d["NG"]), ("MB", MB),
                  ("NB", nb), ("NT", threads), ("W", stack["win"].dtype),
                  ("CU", cu or unit_blocks(stack["win"].dtype)), ("QB", rows_per_pass(MB, d["DIN"], nb, threads)),
                  ("PF", PREFETCH_UNITS if pf is None else pf), ("XMAX", max(d["DM"], d["DIN"])),
                  ("HAS_BIAS", cb is not None)],
        grid=(nb, 1, 1),
        threadgroup=threads,
        output_shapes=[(MB, d["DM"]), (MB, d["DM"]), (MB, d["DP"]), (MB, d["DIN"]),
                       (NL, *conv_states[0].shape), (NL, *ssm_states[0].shape)],
        output_dtypes=[x.dtype, mx.float32, mx.float32, mx.float32, cdt, mx.float32],
    )
    h, _, _, _, nconv, nssm = outs
    return h, unstack(nconv), unstack(nssm)

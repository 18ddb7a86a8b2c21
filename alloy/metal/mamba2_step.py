"""The whole Mamba-2 mixer between its two projections, for one decode token, in one launch.

    [z, xBC, dt] = zxbcdt                                      (the in_proj output of one token)
    xBC' = silu(conv_b + sum_k conv_w[:, k] * [conv_state, xBC][k])      new conv_state = shifted
    dt'  = clip(softplus(dt + dt_bias), lo, hi);   A = -exp(A_log)
    h'   = exp(dt' A) h + (dt' x) ⊗ B ;   y = h' · C + D x            (per head; x, B, C from xBC')
    out  = y * silu(z)                                          (the gate; the norm follows in MLX)

Batch-1 decode is bound by the number of launches, not by bytes: the unfused path issues the conv
step, the SSD step and ~60 small glue ops per layer. Here one group of 128 threads owns one head
of one batch row owns RPB rows of one head: it convolves those RPB x-channels and the group's 2N
B/C channels into group-shared memory (the first row block of each group's first head also writes
the B/C conv state), then each warp updates its rows of the (P, N) state with lanes along N (a
row's state loads all issued before use) and reduces the readout with a warp sum.
Roundings follow the reference path: conv outputs and y in the activation dtype T.

Shapes: zxbcdt (b, 2*DI + 2*G*N + H) with DI = H*P; conv_w (CD, K), CD = DI + 2*G*N; conv_b (CD,)
(or any array when HAS_BIAS is false); conv_state (b, K-1, CD); dt_bias, A_log, D (H,);
dt_lim (2,) float32 [lo, hi]; ssm_state (b, H, P, N) float32 -> out (b, DI) in T, new conv state
(b, K-1, CD) in the conv state's dtype S, new ssm state float32.
"""
from __future__ import annotations

import mlx.core as mx

from alloy.metal.prelude import Kernel, groups

GROUP = 128  # 4 warps
RPB = 8  # state rows per group: H * head_dim / 8 groups keep the GPU busy at batch 1

KERNEL = Kernel(
    name="alloy_mamba2_step",
    inputs=("zxbcdt", "conv_w", "conv_b", "conv_state", "dt_bias", "A_log", "D", "dt_lim", "ssm_state"),
    outputs=("out", "new_conv", "new_ssm"),
    body="""
  const int H = ssm_state_shape[1];
  const int DI = H * HD;
  const int CD = conv_w_shape[0];
  const int G = (CD - DI) / (2 * DS);
  const int DP = zxbcdt_shape[1];
  const int h = bid_x;
  const int r0 = bid_y * RPB;        // this group's first row of the head
  const int b = bid_z;
  const int hpg = H / G;
  const int g = h / hpg;
  const bool owner = (h % hpg) == 0 && bid_y == 0;  // writes the group's B/C conv state
  SHARED float xs[RPB];
  SHARED float Bs[DS];
  SHARED float Cs[DS];
  const int zo = b * DP;
  for (int i = tid; i < RPB + 2 * DS; i += nthreads) {
    if (i < RPB && r0 + i >= HD) continue;
    const int c = i < RPB ? h * HD + r0 + i
                : (i < RPB + DS ? DI + g * DS + (i - RPB) : DI + (G + g) * DS + (i - RPB - DS));
    const int sb = b * (K - 1) * CD + c;
    const float xin = static_cast<float>(zxbcdt[zo + DI + c]);
    float acc = HAS_BIAS ? static_cast<float>(conv_b[c]) : 0.0f;
    for (int k = 0; k < K - 1; ++k)
      acc += static_cast<float>(conv_w[c * K + k]) * static_cast<float>(static_cast<T>(conv_state[sb + k * CD]));
    acc += static_cast<float>(conv_w[c * K + K - 1]) * xin;
    const float v = static_cast<float>(static_cast<T>(fsilu(acc)));
    if (i < RPB) xs[i] = v; else if (i < RPB + DS) Bs[i - RPB] = v; else Cs[i - RPB - DS] = v;
    if (i < RPB || owner) {
      for (int k = 0; k < K - 2; ++k) new_conv[sb + k * CD] = conv_state[sb + (k + 1) * CD];
      new_conv[sb + (K - 2) * CD] = static_cast<S>(xin);
    }
  }
  BARRIER();
  float dtv = fsoftplus(static_cast<float>(zxbcdt[zo + DI + CD + h]) + static_cast<float>(dt_bias[h]));
  dtv = dtv < dt_lim[0] ? dt_lim[0] : (dtv > dt_lim[1] ? dt_lim[1] : dtv);
  const float decay = fexp(-dtv * fexp(static_cast<float>(A_log[h])));
  const float dskip = static_cast<float>(D[h]);
  // each warp owns rows r0 + warp, r0 + warp + W, ...; all of a warp's loads are issued before use
  const int nw = nthreads / 32;
  for (int q = warp; q < RPB; q += nw) {
    const int p = r0 + q;
    if (p < HD) {
      const int row = (b * H + h) * HD + p;
      const float xv = xs[q];
      const float dx = dtv * xv;
      float sv[DS / 32 > 0 ? DS / 32 : 1];
      for (int u = 0; u < DS / 32; ++u) sv[u] = ssm_state[row * DS + lane + 32 * u];
      float acc = 0.0f;
      for (int u = 0; u < DS / 32; ++u) {
        const int j = lane + 32 * u;
        const float s = decay * sv[u] + dx * Bs[j];
        new_ssm[row * DS + j] = s;
        acc += s * Cs[j];
      }
      for (int j = (DS / 32) * 32 + lane; j < DS; j += 32) {  // DS not a multiple of 32
        const float s = decay * ssm_state[row * DS + j] + dx * Bs[j];
        new_ssm[row * DS + j] = s;
        acc += s * Cs[j];
      }
      acc = warp_sum(acc);
      if (lane == 0) {
        const float y = static_cast<float>(static_cast<T>(acc + dskip * xv));
        out[b * DI + h * HD + p] = static_cast<T>(y * fsilu(static_cast<float>(zxbcdt[zo + h * HD + p])));
      }
    }
  }
""",
)


def mamba2_step(zxbcdt, conv_w, conv_b, conv_state, dt_bias, A_log, D, dt_lim, ssm_state):
    """Launch the fused step (see module docstring). conv_b may be None (no conv bias)."""
    b, _ = zxbcdt.shape
    _, H, P, N = ssm_state.shape
    CD, K = conv_w.shape
    out, new_conv, new_ssm = KERNEL(
        [zxbcdt, conv_w, conv_w if conv_b is None else conv_b, conv_state, dt_bias, A_log, D, dt_lim,
         ssm_state],
        template=[("T", zxbcdt.dtype), ("S", conv_state.dtype), ("K", K), ("HD", P), ("DS", N),
                  ("RPB", RPB), ("HAS_BIAS", conv_b is not None)],
        grid=(H, groups(P, RPB), b),
        threadgroup=GROUP,
        output_shapes=[(b, H * P), conv_state.shape, ssm_state.shape],
        output_dtypes=[zxbcdt.dtype, conv_state.dtype, mx.float32],
    )
    return out, new_conv, new_ssm

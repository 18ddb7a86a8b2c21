"""Gated delta rule, token by token with the state in registers: decode steps and short prompts.

Per head and token (`alloy.ops.gated_delta` is the specification):

    q, k = l2norm(q), l2norm(k) (optional);  q *= K^-1/2
    S = decay * S          decay = exp(g) per head, or exp(g_c) per key channel c (KDA)
    u = beta * (v - S^T k);  S += k u^T;  o = S^T q

Work item: one (batch row, value head, 32-column slice of V). A group of 128 threads holds the
(K, 32) slice of the float32 state in registers: lane j owns column j, warp w owns rows
w*K/4 .. (w+1)*K/4. Per token the group loads q_t and k_t into group-shared memory (normalising
them there), each thread updates its K/4 state entries, and the two column sums over the four
warps (S^T k and S^T q) go through group-shared memory. The state is read once at the start and
written once at the end, whatever the number of tokens.

Shapes: q, k (B, T, Hk, K); v (B, T, H, V), Hk | H; g (B, T, H) or (B, T, H, K) (PER_CHANNEL);
beta (B, T, H); state (B, H, K, V) float32 -> o (B, T, H, V) in v.dtype, new state float32.
K is a compile-time constant (a multiple of 4, at most 256); V any size.
"""
from __future__ import annotations

import mlx.core as mx

from alloy.metal.prelude import Kernel, groups

GROUP = 128
COLS = 32

KERNEL = Kernel(
    name="alloy_gated_delta_recurrent",
    inputs=("q", "k", "v", "g", "beta", "state"),
    outputs=("o", "new_state"),
    body="""
  const int Tn = q_shape[1];
  const int Hk = q_shape[2];
  const int H = v_shape[2];
  const int V = v_shape[3];
  const int j = bid_x * 32 + lane;           // value column
  const int h = bid_y;
  const int b = bid_z;
  const int hk = h / (H / Hk);
  const int R = KD / 4;                       // rows per warp
  const int r0 = warp * R;
  const bool live = j < V;
  SHARED float qs[KD];
  SHARED float ks[KD];
  SHARED float gs[KD];
  SHARED float red[2][4][32];
  SHARED float norms[2];
  float st[KD / 4];
  const int sbase = (b * H + h) * KD * V;
  for (int r = 0; r < R; ++r) st[r] = live ? state[sbase + (r0 + r) * V + j] : 0.0f;
  const float qscale = frsqrt(static_cast<float>(KD));
  for (int t = 0; t < Tn; ++t) {
    const int qk = ((b * Tn + t) * Hk + hk) * KD;
    const int vh = (b * Tn + t) * H + h;
    for (int i = tid; i < KD; i += nthreads) {
      qs[i] = static_cast<float>(q[qk + i]);
      ks[i] = static_cast<float>(k[qk + i]);
      gs[i] = PER_CHANNEL ? fexp(static_cast<float>(g[vh * KD + i])) : 0.0f;
    }
    BARRIER();
    if (warp < 2) {                           // warp 0: |q|^2, warp 1: |k|^2
      float s = 0.0f;
      for (int i = lane; i < KD; i += 32) s += warp == 0 ? qs[i] * qs[i] : ks[i] * ks[i];
      s = warp_sum(s);
      if (lane == 0) norms[warp] = L2NORM ? frsqrt(s + 1e-6f) : 1.0f;
    }
    BARRIER();
    const float nq = norms[0] * qscale;
    const float nk = norms[1];
    const float decay = PER_CHANNEL ? 1.0f : fexp(static_cast<float>(g[vh]));
    const float bt = static_cast<float>(beta[vh]);
    const float vj = live ? static_cast<float>(v[vh * V + j]) : 0.0f;
    float pk = 0.0f;
    for (int r = 0; r < R; ++r) {
      st[r] *= PER_CHANNEL ? gs[r0 + r] : decay;
      pk += st[r] * ks[r0 + r];
    }
    red[0][warp][lane] = pk * nk;
    BARRIER();
    const float u = bt * (vj - (red[0][0][lane] + red[0][1][lane] + red[0][2][lane] + red[0][3][lane]));
    float pq = 0.0f;
    for (int r = 0; r < R; ++r) {
      st[r] += ks[r0 + r] * nk * u;
      pq += st[r] * qs[r0 + r];
    }
    red[1][warp][lane] = pq * nq;
    BARRIER();
    if (warp == 0 && live)
      o[vh * V + j] = static_cast<T>(red[1][0][lane] + red[1][1][lane] + red[1][2][lane] + red[1][3][lane]);
  }
  if (live)
    for (int r = 0; r < R; ++r) new_state[sbase + (r0 + r) * V + j] = st[r];
""",
)


def gated_delta_recurrent(q, k, v, g, beta, state, l2norm: bool):
    """Launch (see module docstring); state is required (zeros for a fresh sequence)."""
    B, T, Hk, K = q.shape
    H, V = v.shape[2], v.shape[3]
    o, new_state = KERNEL(
        [q, k, v, g, beta, state],
        template=[("T", v.dtype), ("KD", K), ("PER_CHANNEL", g.ndim == 4), ("L2NORM", bool(l2norm))],
        grid=(groups(V, COLS), H, B),
        threadgroup=GROUP,
        output_shapes=[(B, T, H, V), (B, H, K, V)],
        output_dtypes=[v.dtype, mx.float32],
    )
    return o, new_state


def applies(q, v) -> bool:
    K = q.shape[-1]
    return K % 4 == 0 and K <= 256 and v.dtype in (mx.float32, mx.float16, mx.bfloat16)

"""The sequential part of the chunked gated delta rule: one sweep over chunks with the state in registers.

`alloy.ops.gated_delta.gated_delta_chunked` computes, for every chunk at once (batched matmuls),
the UT-transformed values u and keys w, the keys decayed to the chunk end k_dec, the decayed
queries q_dec, and the chunk's total decay. What remains is sequential across chunks:

    v_new = u - w S            o_inter = q_dec S            (S: the state entering the chunk)
    S     = diag(decay) S + k_dec^T v_new

This kernel does that sweep. Work item: one (batch row, value head, 32-column slice of V); a group
of NW warps holds the (K, 32) float32 state slice in registers (lane = column, warp = K/NW rows).
Per chunk, in blocks of 16 tokens, each thread forms its rows' partial products of w and q_dec
with its state column, the partials meet in group-shared memory, and the reduced v_new (kept in
group-shared memory for the update) and o_inter are written out; then the state update reads
k_dec rows and v_new. The intra-chunk output (causal q k^T times v_new) is one batched matmul in
MLX afterwards.

Shapes (n chunks of C tokens): w, q_dec, k_dec (B, H, n, C, K) float32; u (B, H, n, C, V) float32;
decay (B, H, n) or (B, H, n, K) (PER_CHANNEL); state (B, H, K, V) float32 -> v_new, o_inter
(B, H, n, C, V) float32, new state (B, H, K, V) float32. K, C, NW compile-time constants.
"""
from __future__ import annotations

import mlx.core as mx

from alloy.metal.prelude import Kernel, groups

NW = 8  # warps per group: K / NW state rows per thread
TB = 16  # tokens per reduction block

KERNEL = Kernel(
    name="alloy_gated_delta_chunk_pass",
    inputs=("w", "u", "kdec", "qdec", "decay", "state"),
    outputs=("v_new", "o_inter", "new_state"),
    body="""
  const int H = state_shape[1];
  const int V = state_shape[3];
  const int n = w_shape[2];
  const int j = bid_x * 32 + lane;
  const int h = bid_y;
  const int b = bid_z;
  const int R = KD / NW;
  const int r0 = warp * R;
  const bool live = j < V;
  SHARED float red[2][NW][TB][32];
  SHARED float vn[CH][32];
  float st[KD / NW];
  const int bh = b * H + h;
  for (int r = 0; r < R; ++r) st[r] = live ? static_cast<float>(state[(bh * KD + r0 + r) * V + j]) : 0.0f;
  for (int c = 0; c < n; ++c) {
    const int ck = (bh * n + c) * CH;        // row of (t = 0) in the (.., C, K) / (.., C, V) arrays
    for (int t0 = 0; t0 < CH; t0 += TB) {
      for (int tt = 0; tt < TB; ++tt) {
        const int row = (ck + t0 + tt) * KD + r0;
        float pw = 0.0f;
        float pq = 0.0f;
        for (int r = 0; r < R; ++r) {
          pw += static_cast<float>(w[row + r]) * st[r];
          pq += static_cast<float>(qdec[row + r]) * st[r];
        }
        red[0][warp][tt][lane] = pw;
        red[1][warp][tt][lane] = pq;
      }
      BARRIER();
      for (int e = tid; e < TB * 32; e += nthreads) {
        const int tt = e / 32;
        const int jj = e % 32;
        const int col = bid_x * 32 + jj;
        float sw = 0.0f;
        float sq = 0.0f;
        for (int q = 0; q < NW; ++q) {
          sw += red[0][q][tt][jj];
          sq += red[1][q][tt][jj];
        }
        const int vo = (ck + t0 + tt) * V + col;
        const float vv = col < V ? static_cast<float>(u[vo]) - sw : 0.0f;
        vn[t0 + tt][jj] = vv;
        if (col < V) {
          v_new[vo] = vv;
          o_inter[vo] = sq;
        }
      }
      BARRIER();
    }
    const int dbase = bh * n + c;
    for (int r = 0; r < R; ++r) {
      float acc = st[r] * static_cast<float>(PER_CHANNEL ? decay[dbase * KD + r0 + r] : decay[dbase]);
      for (int t = 0; t < CH; ++t) acc += static_cast<float>(kdec[(ck + t) * KD + r0 + r]) * vn[t][lane];
      st[r] = acc;
    }
    BARRIER();
  }
  if (live)
    for (int r = 0; r < R; ++r) new_state[(bh * KD + r0 + r) * V + j] = st[r];
""",
)


def chunk_pass(w, u, kdec, qdec, decay, state):
    """Launch (see module docstring). All inputs float32."""
    B, H, n, C, K = w.shape
    V = u.shape[-1]
    v_new, o_inter, new_state = KERNEL(
        [w, u, kdec, qdec, decay, state],
        template=[("KD", K), ("CH", C), ("NW", NW), ("TB", TB), ("PER_CHANNEL", decay.ndim == 4)],
        grid=(groups(V, 32), H, B),
        threadgroup=32 * NW,
        output_shapes=[(B, H, n, C, V), (B, H, n, C, V), (B, H, K, V)],
        output_dtypes=[mx.float32] * 3,
    )
    return v_new, o_inter, new_state


def applies(K: int, C: int) -> bool:
    return K % NW == 0 and K <= 256 and C % TB == 0 and C <= 64  # 48 KB of group-shared memory

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
k_dec rows and v_new.

Per token block of TB rows, the w / q_dec / k_dec rows are first staged into group-shared memory
with coalesced loads by all threads (every column slice then reads them as broadcasts), and the
state update k_dec^T v_new is accumulated in registers over the chunk's blocks and applied at the
chunk's end (every v_new of a chunk reads the state entering it). The intra-chunk output (causal q k^T times v_new) is one batched matmul in
MLX afterwards.

Shapes (n chunks of C tokens): w, q_dec, k_dec (B, H, n, C, K) float32; u (B, H, n, C, V) float32;
decay (B, H, n) or (B, H, n, K) (PER_CHANNEL); state (B, H, K, V) float32 -> v_new, o_inter
(B, H, n, C, V) float32, new state (B, H, K, V) float32. K, C, NW compile-time constants.
"""
from __future__ import annotations

import mlx.core as mx

from alloy.metal.prelude import Kernel, groups

NW = 8  # warps per group: K / NW state rows per thread
TB = 8  # tokens per staged block (shared memory: 3 x TB x K + 2 x NW x TB x 32 floats)

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
  SHARED float sw[TB][KD];                   // this token block's rows of w, q_dec, k_dec
  SHARED float sq[TB][KD];
  SHARED float sk[TB][KD];
  SHARED float red[2][NW][TB][32];
  SHARED float vn[TB][32];
  float st[KD / NW];
  float ds[KD / NW];
  const int bh = b * H + h;
  for (int r = 0; r < R; ++r) st[r] = live ? static_cast<float>(state[(bh * KD + r0 + r) * V + j]) : 0.0f;
  for (int c = 0; c < n; ++c) {
    const int ck = (bh * n + c) * CH;        // row of token 0 of this chunk in the (.., C, K|V) arrays
    for (int r = 0; r < R; ++r) ds[r] = 0.0f;
    for (int t0 = 0; t0 < CH; t0 += TB) {
      const int base = (ck + t0) * KD;
      for (int e = tid; e < TB * KD; e += nthreads) {  // coalesced staging, shared by every column
        sw[e / KD][e % KD] = static_cast<float>(w[base + e]);
        sq[e / KD][e % KD] = static_cast<float>(qdec[base + e]);
        sk[e / KD][e % KD] = static_cast<float>(kdec[base + e]);
      }
      BARRIER();
      for (int tt = 0; tt < TB; ++tt) {
        float pw = 0.0f;
        float pq = 0.0f;
        for (int r = 0; r < R; ++r) {
          pw += sw[tt][r0 + r] * st[r];
          pq += sq[tt][r0 + r] * st[r];
        }
        red[0][warp][tt][lane] = pw;
        red[1][warp][tt][lane] = pq;
      }
      BARRIER();
      for (int e = tid; e < TB * 32; e += nthreads) {
        const int tt = e / 32;
        const int jj = e % 32;
        const int col = bid_x * 32 + jj;
        float sum_w = 0.0f;
        float sum_q = 0.0f;
        for (int q = 0; q < NW; ++q) {
          sum_w += red[0][q][tt][jj];
          sum_q += red[1][q][tt][jj];
        }
        const int vo = (ck + t0 + tt) * V + col;
        const float vv = col < V ? static_cast<float>(u[vo]) - sum_w : 0.0f;
        vn[tt][jj] = vv;
        if (col < V) {
          v_new[vo] = vv;
          o_inter[vo] = sum_q;
        }
      }
      BARRIER();
      for (int tt = 0; tt < TB; ++tt) {
        const float x = vn[tt][lane];
        for (int r = 0; r < R; ++r) ds[r] += sk[tt][r0 + r] * x;
      }
      BARRIER();                              // before the next block overwrites the staging
    }
    const int dbase = bh * n + c;
    for (int r = 0; r < R; ++r)
      st[r] = st[r] * static_cast<float>(PER_CHANNEL ? decay[dbase * KD + r0 + r] : decay[dbase]) + ds[r];
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
    return K % NW == 0 and K <= 256 and C % TB == 0  # <= 42 KB of group-shared memory

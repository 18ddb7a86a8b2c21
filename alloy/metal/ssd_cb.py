"""The SSD's chunk products CB = C Bᵀ on tensor cores, straight from B and C.

Per chunk c of K steps (t0 = c K) and group g, with B, C (b, l, g, n) in a 16-bit dtype:

    CB[b, c, g, l, s] = sum_i C[b, t0 + l, g, i] B[b, t0 + s, g, i]      (b, c, g, K, K) float32

rows and columns past the end of the sequence zero (the chunks of `ssd_chunked` are zero-padded).
The products of 16-bit inputs are exact in float32 and summed in float32, so this is the math of
the float32 batched matmul it replaces (`Cc.astype(f32) @ Bc.astype(f32)ᵀ` on chunked, transposed
copies: two cast copies and a TF32 GEMM on MLX-CUDA); only the summation order differs. The
consumers read CB through the causal mask (s <= l): 16 x 16 tiles strictly above the diagonal are
written as zeros without products (the diagonal tiles hold all their products).
"""
from __future__ import annotations

import mlx.core as mx

from alloy.metal.prelude import Kernel

CB_TC = Kernel(
    name="alloy_ssd_cb_tc",
    inputs=("B", "C"),
    outputs=("CB",),
    body="""
  // One group of RB / 16 x CH warps per (block of RB = min(KC, 64) rows from r0, group g, batch x chunk
  // bc): warp w owns rows wr .. wr + 15 (wr = r0 + 16 (w % (RB / 16))) and the JT 16 x 16 column tiles
  // from j0 = JT (w / (RB / 16)) (KC > 64: CH = 2 warps per row tile, 64 columns each); products for
  // the tiles j <= wr / 16 (touching s <= l), zeros above. Per step of 64 along n: the block's C rows in
  // sm [row][n] and after them the B rows s < ns that its tiles need (sm [RB + s][n]), raw 16-byte
  // copies (zeros past L; each thread issues its loads before its stores); the warp's C tile is its
  // a-operand (lda16, once per 16 n), the B rows the b-operands as given ([s][n]: mma16t_f).
  const int L = B_shape[1];
  const int G = B_shape[2];
  const int N = B_shape[3];
  constexpr int RB = KC < 64 ? KC : 64;       // rows per group
  constexpr int CH = KC > 64 ? 2 : 1;         // warps per row tile
  constexpr int JT = KC > 64 ? 4 : KC / 16;   // column tiles per warp
  constexpr int NTH = 2 * RB * CH;            // threads per group: RB / 16 x CH warps
  constexpr int RL = NTH / 8;                 // rows per load sweep (8 threads per 64-column row)
  constexpr int TP = 64 + 8;                  // padded tile rows: a warp's fragment loads hit 32 banks
  const int nc = (L + KC - 1) / KC;
  const int g = bid_y;
  const long bc = bid_z;
  const long b = bc / nc;
  const long t0 = (bc % nc) * KC;             // first time step of the chunk
  const int r0 = bid_x * RB;
  const int ns = r0 + RB < KC ? r0 + RB : KC; // B rows the block needs
  const int w = static_cast<int>(warp);
  const int wt = w % (RB / 16);               // the warp's row tile in the block
  const int j0 = JT * (w / (RB / 16));        // its first column tile
  const int wr = r0 + 16 * wt;                // its first row
  const int jd = wr / 16;                     // the diagonal tile of its rows
  const bool live = wr < KC && t0 + wr < L && j0 <= jd;   // some product to take
  const int rs = G * N;                       // elements between consecutive steps
  const DEV T* cs = C + ((b * L + t0 + r0) * G + g) * N;  // the block's first C row
  const DEV T* bs = B + ((b * L + t0) * G + g) * N;       // the chunk's first B row
  const int u = 8 * static_cast<int>(tid % 8u);            // the thread's 8 columns of a row
  const int q = static_cast<int>(tid / 8u);                // its first row (then every RL)
  ALIGN16 SHARED T sm[(RB + KC) * TP];        // C rows [row][n], then B rows [RB + s][n]
  Acc16 acc[JT];
  for (int j = 0; j < JT; ++j) acc_zero(acc[j]);
  const float z[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  for (int n0 = 0; n0 < N; n0 += 64) {
    const bool col = n0 + u < N;
    Raw8<T> rc[RB / RL];                      // C rows q + RL v of the block
    Raw8<T> rb[(KC + RL - 1) / RL];           // B rows q + RL v of the chunk
    for (int v = 0; v < RB / RL; ++v) {
      const int l = r0 + q + RL * v;
      if (col && l < KC && t0 + l < L) rc[v] = ldr8(cs + (q + RL * v) * rs + n0 + u);
    }
    for (int v = 0; v < (KC + RL - 1) / RL; ++v) {
      const int s = q + RL * v;
      if (col && s < ns && t0 + s < L) rb[v] = ldr8(bs + s * rs + n0 + u);
    }
    for (int v = 0; v < RB / RL; ++v) {
      const int l = r0 + q + RL * v;
      if (col) {
        if (l < KC && t0 + l < L) {
          str8(rc[v], sm + (q + RL * v) * TP + u);
        } else {
          st8(sm + (q + RL * v) * TP + u, z);
        }
      }
    }
    for (int v = 0; v < (KC + RL - 1) / RL; ++v) {
      const int s = q + RL * v;
      if (col && s < ns) {
        if (t0 + s < L) {
          str8(rb[v], sm + (RB + s) * TP + u);
        } else {
          st8(sm + (RB + s) * TP + u, z);
        }
      }
    }
    BARRIER();
    const int nk = (N - n0) / 16 < 4 ? (N - n0) / 16 : 4;
    if (live)
      for (int kk = 0; kk < nk; ++kk) {
        Frag16<T> fc;                         // the warp's C tile: loaded once for its B tiles
        lda16(fc, sm + 16 * wt * TP + 16 * kk, TP, lane);
        for (int j = 0; j < JT; ++j)
          if (j0 + j <= jd) mma16t_f(acc[j], fc, sm + (RB + 16 * (j0 + j)) * TP + 16 * kk, TP, lane);
      }
    BARRIER();
  }
  if (wr < KC) {
    // 16-byte stores: lanes t, t ^ 1 of a quad swap halves of their column pairs, so that the even lane
    // holds columns 2t .. 2t + 3 (its entries 0, 1 / 2, 3 and its partner's) and the odd one columns
    // 2t + 6 .. 2t + 9 (its partner's entries 4, 5 / 6, 7 and its own), of rows ra and ra + 8
    const bool odd = (lane & 1u) != 0u;
    const int ra = wr + static_cast<int>(lane >> 2);
    const int cq = (odd ? 6 : 0) + 2 * static_cast<int>(lane & 3u);
    DEV float* o0 = CB + ((bc * G + g) * KC + ra) * KC + cq;
    DEV float* o8 = o0 + 8 * KC;
    for (int j = 0; j < JT; ++j) {
      if (j0 + j < KC / 16) {
        const float s0 = shfl_xor(odd ? acc[j].c[0] : acc[j].c[4], 1);
        const float s1 = shfl_xor(odd ? acc[j].c[1] : acc[j].c[5], 1);
        const float s2 = shfl_xor(odd ? acc[j].c[2] : acc[j].c[6], 1);
        const float s3 = shfl_xor(odd ? acc[j].c[3] : acc[j].c[7], 1);
        float lo[4];
        float hi[4];
        lo[0] = odd ? s0 : acc[j].c[0];
        lo[1] = odd ? s1 : acc[j].c[1];
        lo[2] = odd ? acc[j].c[4] : s0;
        lo[3] = odd ? acc[j].c[5] : s1;
        hi[0] = odd ? s2 : acc[j].c[2];
        hi[1] = odd ? s3 : acc[j].c[3];
        hi[2] = odd ? acc[j].c[6] : s2;
        hi[3] = odd ? acc[j].c[7] : s3;
        st4(o0 + 16 * (j0 + j), lo);
        st4(o8 + 16 * (j0 + j), hi);
      }
    }
  }
""",
)


def cb_tc_fits(dtype, K: int, n: int) -> bool:
    """Whether `chunk_cb` takes B / C of this dtype, chunk K and d_state n: 16-bit inputs, K a
    multiple of 16 up to 128, n a multiple of 16 up to 256."""
    return dtype in (mx.bfloat16, mx.float16) and K % 16 == 0 and 16 <= K <= 128 and n % 16 == 0 and 16 <= n <= 256


def chunk_cb(B, C, K: int, kernel: Kernel | None = None):
    """CB = C Bᵀ per chunk of K steps: B, C (b, l, g, n) in one 16-bit dtype (`cb_tc_fits`), any l
    (the last chunk zero-padded) -> (b, c, g, K, K) float32, c = ceil(l / K). kernel: the `CB_TC` to
    launch (a caller module's own reference to it, which `emulate.patch` of that module swaps)."""
    b, l, G, N = B.shape
    if C.shape != B.shape or C.dtype != B.dtype or not cb_tc_fits(B.dtype, K, N):
        raise ValueError(f"chunk_cb: B / C {B.shape} {B.dtype} / {C.shape} {C.dtype} with chunk {K} "
                         "(16-bit, same shape and dtype, K and n multiples of 16, K <= 128, n <= 256)")
    nc = -(-l // K)
    rb = min(K, 64)  # rows per group, 16 per warp; K > 64: two warps per 16 rows (64 columns each)
    (CB,) = (kernel or CB_TC)(
        [B, C],
        template=[("T", B.dtype), ("KC", K)],
        grid=(-(-K // rb), G, b * nc),
        threadgroup=2 * rb * (2 if K > 64 else 1),
        output_shapes=[(b, nc, G, K, K)],
        output_dtypes=[mx.float32],
    )
    return CB

"""The chunked gated delta rule on tensor cores: a chunk-local WY kernel, a state pass, two matmuls.

Per head, with chunks of C = 64 tokens, K = 128 and the log decay cum_i summed from the chunk start
(see `alloy.ops.gated_delta`), the chunked form needs

    L   = strict_lower(beta_i k_i . k_j e^(cum_i - cum_j))      (C, C)
    T   = (I + L)^-1                                             (C, C), unit lower triangular
    w   = T diag(beta e^cum) k          u = T diag(beta) v       (C, K), (C, V)
    kd  = diag(e^(last - cum)) k        qd = diag(e^cum) q        keys to the chunk end, queries
    attn = causal(q_i . k_j e^(cum_i - cum_j))                   (C, C)

and, across chunks, with S the (K, V) state entering the chunk,

    v_new = u - w S        S <- e^last S + kd^T v_new        o = qd S + attn v_new.

Three launches replace the compiled MLX prep and the SIMT sweep of `gated_delta_chunked`:

* `PREP`: one group of 256 threads per (chunk, head, batch row). q and k are L2-normalised rows in
  group-shared memory (bf16); the Gram matrices k k^T and q k^T are warp tile products (`mma16t`,
  tensor cores for 16-bit types); T is solved by forward substitution in fp32 (one thread per
  column, the column in registers); w and u are `mma16` products of T (rounded to the input type,
  as the operands of every product here) with the row-scaled keys and values. Writes w, u, kd, qd,
  attn (the input type) and e^last (fp32).
* `PASS`: one group of 256 threads per (32-column slice of V, head, batch row) sweeps the chunks
  with its (K, 32) slice of the state in fp32 accumulator tiles (a warp per 16 rows of K, kept as
  S^T so that both products are plain tile products): v_new^T = u^T - S^T w^T (`mma16t`), then
  S^T <- e^last S^T + v_new^T kd (`mma16`). The next chunk's w and kd load into registers while the
  current one computes. Writes v_new and the state entering every chunk (S_c, as (V, K) rows, in the
  input type), and the final state (fp32).
* the output o = qd S_c^T^T + attn v_new is two batched matmuls in MLX (cuBLAS on CUDA).

Limits (`applies`): K = 128, V a multiple of 32 up to 128, one decay per head (not per key channel);
group-shared memory is sized for 16-bit types on the GPU (fp32 runs on the CPU emulator only).
"""
from __future__ import annotations

import functools

import mlx.core as mx

from alloy.metal.prelude import Kernel

CH = 64   # chunk length
KD = 128  # key width the tiles are laid out for
NT = 256  # threads per group: 8 warps

PREP = Kernel(
    name="alloy_gated_delta_wy_prep",
    inputs=("q", "k", "v", "g", "beta"),
    outputs=("w", "u", "kd", "qd", "attn", "dlast"),
    body="""
  const int L = q_shape[1];
  const int Hk = q_shape[2];
  const int H = v_shape[2];
  const int VD = v_shape[3];
  const int n = (L + CH - 1) / CH;
  const int c = bid_x;
  const int h = bid_y;
  const int b = bid_z;
  const int hk = h / (H / Hk);
  const int bhc = (b * H + h) * n + c;
  constexpr int KP = KD + 8;                 // padded rows: conflict-free fragment loads
  constexpr int TP = CH + 8;
  constexpr int NWP = NT / 32;
  ALIGN16 SHARED T sk[CH * KP];              // k^ rows; then scaled by beta e^cum; then beta v rows
  ALIGN16 SHARED T sx[CH * KP];              // q^ rows (scaled by K^-1/2); then T as [CH][TP]
  SHARED float sl[CH * (CH - 1) / 2];        // L packed by rows: L[i][j] at i (i - 1) / 2 + j, j < i
  SHARED float scum[CH];
  SHARED float sbeta[CH];
  SHARED float stot[1];
  // 1. rows of k and q, normalised; cumulative log decay and beta
  const float qscale = frsqrt(static_cast<float>(KD));
  for (int r = warp; r < CH; r += NWP) {
    const int t = c * CH + r;
    const bool in = t < L;
    const int base = ((b * L + (in ? t : 0)) * Hk + hk) * KD;
    float kv[KD / 32];
    float qv[KD / 32];
    float kk = 0.0f;
    float qq = 0.0f;
    for (int e = 0; e < KD / 32; ++e) {
      kv[e] = in ? static_cast<float>(k[base + lane + 32 * e]) : 0.0f;
      qv[e] = in ? static_cast<float>(q[base + lane + 32 * e]) : 0.0f;
      kk += kv[e] * kv[e];
      qq += qv[e] * qv[e];
    }
    float kn = 1.0f;
    float qn = qscale;
    if (L2) {
      kn = frsqrt(warp_sum(kk) + 1e-6f);
      qn = qscale * frsqrt(warp_sum(qq) + 1e-6f);
    }
    for (int e = 0; e < KD / 32; ++e) {
      sk[r * KP + lane + 32 * e] = static_cast<T>(kv[e] * kn);
      sx[r * KP + lane + 32 * e] = static_cast<T>(qv[e] * qn);
    }
  }
  if (warp < CH / 32) {                      // inclusive prefix sum of g over the chunk (xor scan)
    const int r = static_cast<int>(tid);
    const int t = c * CH + r;
    const int gi = (b * L + t) * H + h;
    float pre = t < L ? static_cast<float>(g[gi]) : 0.0f;
    float tot = pre;
    for (int m = 1; m < 32; m <<= 1) {
      const float o = shfl_xor(tot, m);
      if (lane & static_cast<unsigned int>(m)) pre += o;
      tot += o;
    }
    scum[r] = pre;
    sbeta[r] = t < L ? static_cast<float>(beta[gi]) : 0.0f;
    if (r == 31) stot[0] = pre;
  }
  BARRIER();
  if (tid >= 32 && tid < CH) scum[tid] += stot[0];
  BARRIER();
  // 2. Gram tiles (lower) of k k^T -> L, of q k^T -> attn; kd, qd, e^last
  const float clast = scum[CH - 1];
  for (int job = warp; job < 20; job += NWP) {
    const int idx = job % 10;
    const int ti = (idx >= 1) + (idx >= 3) + (idx >= 6);
    const int tj = idx - ti * (ti + 1) / 2;
    const bool gram = job < 10;
    Acc16 a;
    acc_zero(a);
    for (int kk = 0; kk < KD / 16; ++kk)
      mma16t(a, (gram ? sk : sx) + 16 * ti * KP + 16 * kk, KP, sk + 16 * tj * KP + 16 * kk, KP, lane);
    for (int i = 0; i < 8; ++i) {
      const int r = 16 * ti + acc_row(i, lane);
      const int cc = 16 * tj + acc_col(i, lane);
      const float dec = cc <= r ? fexp(scum[r] - scum[cc]) : 0.0f;
      if (gram) {
        if (cc < r) sl[r * (r - 1) / 2 + cc] = sbeta[r] * a.c[i] * dec;
      } else {
        attn[(bhc * CH + r) * CH + cc] = static_cast<T>(a.c[i] * dec);
      }
    }
  }
  for (int e = tid; e < CH * CH; e += NT) {  // the causal mask's zero tiles of attn
    const int r = e / CH;
    const int cc = e % CH;
    if (cc / 16 > r / 16) attn[(bhc * CH + r) * CH + cc] = static_cast<T>(0.0f);
  }
  for (int e = tid; e < CH * KD; e += NT) {
    const int r = e / KD;
    const int d = e % KD;
    qd[(bhc * CH + r) * KD + d] = static_cast<T>(static_cast<float>(sx[r * KP + d]) * fexp(scum[r]));
    kd[(bhc * CH + r) * KD + d] = static_cast<T>(static_cast<float>(sk[r * KP + d]) * fexp(clast - scum[r]));
  }
  if (tid == 0) dlast[bhc] = fexp(clast);
  BARRIER();
  // 3. T = (I + L)^-1, column `col` per thread in fp32 registers; meanwhile scale the key rows
  if (tid < CH) {
    const int col = static_cast<int>(tid);
    float x[CH];
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      float s0 = i == col ? 1.0f : 0.0f;
      float s1 = 0.0f;
#pragma unroll
      for (int j = 0; j + 1 < i; j += 2) {
        s0 -= sl[i * (i - 1) / 2 + j] * x[j];
        s1 -= sl[i * (i - 1) / 2 + j + 1] * x[j + 1];
      }
      if (i & 1) s0 -= sl[i * (i - 1) / 2 + i - 1] * x[i - 1];
      x[i] = i < col ? 0.0f : s0 + s1;
    }
#pragma unroll
    for (int i = 0; i < CH; ++i) sx[i * TP + col] = static_cast<T>(x[i]);
  } else {
    for (int e = static_cast<int>(tid) - CH; e < CH * KD; e += NT - CH) {
      const int r = e / KD;
      const int d = e % KD;
      sk[r * KP + d] = static_cast<T>(static_cast<float>(sk[r * KP + d]) * sbeta[r] * fexp(scum[r]));
    }
  }
  BARRIER();
  // 4. w = T (beta e^cum k): T is lower triangular, so row tile ti needs column tiles <= ti
  for (int tn = warp; tn < KD / 16; tn += NWP) {
    for (int ti = 0; ti < CH / 16; ++ti) {
      Acc16 a;
      acc_zero(a);
      for (int kk = 0; kk <= ti; ++kk) mma16(a, sx + 16 * ti * TP + 16 * kk, TP, sk + 16 * kk * KP + 16 * tn, KP, lane);
      acc_store(a, w + (bhc * CH + 16 * ti) * KD + 16 * tn, KD, lane);
    }
  }
  BARRIER();
  // 5. u = T (beta v)
  for (int e = tid; e < CH * VD; e += NT) {
    const int r = e / VD;
    const int d = e % VD;
    const int t = c * CH + r;
    sk[r * KP + d] = static_cast<T>(t < L ? static_cast<float>(v[((b * L + t) * H + h) * VD + d]) * sbeta[r] : 0.0f);
  }
  BARRIER();
  for (int tn = warp; tn < VD / 16; tn += NWP) {
    for (int ti = 0; ti < CH / 16; ++ti) {
      Acc16 a;
      acc_zero(a);
      for (int kk = 0; kk <= ti; ++kk) mma16(a, sx + 16 * ti * TP + 16 * kk, TP, sk + 16 * kk * KP + 16 * tn, KP, lane);
      acc_store(a, u + (bhc * CH + 16 * ti) * VD + 16 * tn, VD, lane);
    }
  }
""",
)

PASS = Kernel(
    name="alloy_gated_delta_wy_pass",
    inputs=("w", "u", "kd", "dlast", "state"),
    outputs=("v_new", "hs", "new_state"),
    body="""
  const int H = w_shape[1];
  const int n = w_shape[2];
  const int VD = u_shape[4];
  const int n0 = bid_x * 32;
  const int h = bid_y;
  const int b = bid_z;
  const int bh = b * H + h;
  constexpr int KP = KD + 8;
  constexpr int VP = CH + 8;
  constexpr int U8 = KD / 8;                 // 8-element units per row of w / kd
  constexpr int PER = CH * U8 / NT;          // units per thread per matrix and chunk
  ALIGN16 SHARED T sw[CH * KP];              // this chunk's w rows
  ALIGN16 SHARED T skd[CH * KP];             // this chunk's kd rows
  ALIGN16 SHARED T sst[32 * KP];             // S^T entering the chunk, [V slice][K], as an operand
  ALIGN16 SHARED T svt[32 * VP];             // v_new^T, [V slice][C]
  const int nt = static_cast<int>(warp) >> 2;      // this warp's v_new^T tile: rows 16 nt, columns 16 jt
  const int jt = static_cast<int>(warp) & 3;
  const int dt = 16 * static_cast<int>(warp);      // this warp's 16 rows of K in the state
  Acc16 s0;                                  // S^T: V rows n0 + [0, 16) and n0 + [16, 32), K columns dt + [0, 16)
  Acc16 s1;
  for (int i = 0; i < 8; ++i) {
    const int sidx = (bh * KD + dt + acc_col(i, lane)) * VD + n0 + acc_row(i, lane);
    s0.c[i] = state[sidx];
    s1.c[i] = state[sidx + 16];
  }
  acc_store(s0, sst + dt, KP, lane);
  acc_store(s1, sst + 16 * KP + dt, KP, lane);
  for (int e = tid; e < CH * U8; e += NT) {
    const int r = e / U8;
    const int d = (e % U8) * 8;
    str8(ldr8(w + (bh * n * CH + r) * KD + d), sw + r * KP + d);
    str8(ldr8(kd + (bh * n * CH + r) * KD + d), skd + r * KP + d);
  }
  BARRIER();
  for (int c = 0; c < n; ++c) {
    const int cn = c + 1 < n ? c + 1 : c;
    Raw8<T> pw[PER];
    Raw8<T> pk[PER];
    for (int e = 0; e < PER; ++e) {          // the next chunk's rows, into registers
      const int idx = static_cast<int>(tid) + e * NT;
      const int off = ((bh * n + cn) * CH + idx / U8) * KD + (idx % U8) * 8;
      pw[e] = ldr8(w + off);
      pk[e] = ldr8(kd + off);
    }
    const int ub = (bh * n + c) * CH;
    Acc16 vt;
    for (int i = 0; i < 8; ++i)
      vt.c[i] = static_cast<float>(u[(ub + 16 * jt + acc_col(i, lane)) * VD + n0 + 16 * nt + acc_row(i, lane)]);
    for (int e = tid; e < 32 * KD; e += NT) {  // S_c -> hs (V, K) rows n0 ..
      const int r = e / KD;
      const int d = e % KD;
      hs[((bh * n + c) * VD + n0 + r) * KD + d] = sst[r * KP + d];
    }
    Acc16 p;
    acc_zero(p);
    for (int kk = 0; kk < KD / 16; ++kk) mma16t(p, sst + 16 * nt * KP + 16 * kk, KP, sw + 16 * jt * KP + 16 * kk, KP, lane);
    for (int i = 0; i < 8; ++i) vt.c[i] -= p.c[i];
    acc_store(vt, svt + 16 * nt * VP + 16 * jt, VP, lane);
    for (int i = 0; i < 8; ++i)
      v_new[(ub + 16 * jt + acc_col(i, lane)) * VD + n0 + 16 * nt + acc_row(i, lane)] = static_cast<T>(vt.c[i]);
    BARRIER();
    const float dec = dlast[bh * n + c];
    for (int i = 0; i < 8; ++i) {
      s0.c[i] *= dec;
      s1.c[i] *= dec;
    }
    for (int kk = 0; kk < CH / 16; ++kk) {
      mma16(s0, svt + 16 * kk, VP, skd + 16 * kk * KP + dt, KP, lane);
      mma16(s1, svt + 16 * VP + 16 * kk, VP, skd + 16 * kk * KP + dt, KP, lane);
    }
    BARRIER();
    acc_store(s0, sst + dt, KP, lane);
    acc_store(s1, sst + 16 * KP + dt, KP, lane);
    for (int e = 0; e < PER; ++e) {
      const int idx = static_cast<int>(tid) + e * NT;
      const int off = (idx / U8) * KP + (idx % U8) * 8;
      str8(pw[e], sw + off);
      str8(pk[e], skd + off);
    }
    BARRIER();
  }
  for (int i = 0; i < 8; ++i) {
    const int sidx = (bh * KD + dt + acc_col(i, lane)) * VD + n0 + acc_row(i, lane);
    new_state[sidx] = s0.c[i];
    new_state[sidx + 16] = s1.c[i];
  }
""",
)


def applies(q, k, v, g) -> bool:
    """Static facts under which the tensor-core path runs (else the chunk-pass path)."""
    K, V = q.shape[-1], v.shape[-1]
    return (K == KD and V % 32 == 0 and V <= KD and g.ndim == 3
            and q.dtype in (mx.bfloat16, mx.float16) and k.dtype == q.dtype and v.dtype == q.dtype)


def prep(q, k, v, g, beta, l2norm: bool):
    """PREP launch: (w, u, kd, qd, attn, dlast), laid out (B, H, n, C, ...)."""
    B, T, _, K = q.shape
    H, V = v.shape[2], v.shape[3]
    n = -(-T // CH)
    dt = q.dtype
    return PREP(
        [q, k, v, g, beta],
        template=[("T", dt), ("KD", K), ("CH", CH), ("NT", NT), ("L2", bool(l2norm))],
        grid=(n, H, B), threadgroup=NT,
        output_shapes=[(B, H, n, CH, K), (B, H, n, CH, V), (B, H, n, CH, K), (B, H, n, CH, K),
                       (B, H, n, CH, CH), (B, H, n)],
        output_dtypes=[dt] * 5 + [mx.float32])


def state_pass(w, u, kd, dlast, state):
    """PASS launch: (v_new (B, H, n, C, V), hs (B, H, n, V, K), final state (B, H, K, V) fp32)."""
    B, H, n, C, K = w.shape
    V = u.shape[-1]
    return PASS(
        [w, u, kd, dlast, state],
        template=[("T", w.dtype), ("KD", K), ("CH", C), ("NT", NT)],
        grid=(V // 32, H, B), threadgroup=NT,
        output_shapes=[(B, H, n, C, V), (B, H, n, V, K), (B, H, K, V)],
        output_dtypes=[w.dtype, w.dtype, mx.float32])


@functools.lru_cache(maxsize=None)
def _finish(T: int):
    def f(qd, hs, attn, v_new):
        B, H, n, C, V = v_new.shape
        o = qd @ hs.swapaxes(-1, -2) + attn @ v_new
        return o.transpose(0, 2, 3, 1, 4).reshape(B, n * C, H, V)[:, :T]
    return mx.compile(f)


def gated_delta_wy(q, k, v, g, beta, state, l2norm: bool = True):
    """The gated delta rule's forward by the three launches (module docstring): (o in v.dtype, final
    state fp32). `state`: (B, H, K, V) fp32."""
    w, u, kd, qd, attn, dlast = prep(q, k, v, g, beta, l2norm)
    v_new, hs, s = state_pass(w, u, kd, dlast, state.astype(mx.float32))
    return _finish(q.shape[1])(qd, hs, attn, v_new).astype(v.dtype), s

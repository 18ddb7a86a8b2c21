"""The chunked gated delta rule on tensor cores: a chunk-local WY kernel, a state pass, an output kernel.

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
  S^T <- e^last S^T + v_new^T kd (`mma16`). w and kd rows load two chunks ahead into registers.
  Writes v_new^T and the state entering every chunk (S_c^T, as (V, K) rows) in the input type, and
  the final state (fp32).
* `OUT`: one group per (chunk x 64-column slice of V, head, batch row): o = qd S_c + attn v_new as
  tile products (S_c^T and v_new^T rows are the transposed operands of `mma16t`), written straight
  into (B, T, H, V).

Limits (`applies`): K = 128, V a multiple of 32 up to 128, one decay per head (not per key channel),
B H T K < 2^31 (32-bit offsets); group-shared memory is sized for 16-bit types on the GPU (fp32
runs on the CPU emulator only). Measured against flash-linear-attention: docs/kernels.md, session 5.
"""
from __future__ import annotations

import mlx.core as mx

from alloy.metal.prelude import Kernel, fits_int32

CH = 64   # chunk length
KD = 128  # key width the tiles are laid out for
NT = 256  # threads per group: 8 warps

PREP = Kernel(
    name="alloy_gated_delta_wy_prep",
    inputs=("q", "k", "v", "g", "beta"),
    outputs=("w", "u", "kd", "qd", "attn", "dlast"),
    launch_bounds=(NT, 3),  # 3 groups per SM (registers; group-shared memory would allow 5)
    body="""
  const int L = q_shape[1];
  const int Hk = q_shape[2];
  const int H = v_shape[2];
  const int n = (L + CH - 1) / CH;
  const int c = bid_x;
  const int h = bid_y;
  const int b = bid_z;
  const int hk = h / (H / Hk);
  const int bhc = (b * H + h) * n + c;
  constexpr int KP = KD + 8;                 // padded rows: conflict-free fragment loads
  constexpr int TP = CH + 8;
  constexpr int NWP = NT / 32;
  constexpr int U8 = KD / 8;                 // 8-element units per row of q / k
  constexpr int VU = VD / 8;
  constexpr int RPI = 32 / U8;               // rows per warp and step in the row loads
  constexpr int IT = CH / (NWP * RPI);
  constexpr int VPER = (CH * VU + NT - 1) / NT;
  ALIGN16 SHARED T sk[CH * KP];              // k^ rows; then scaled by beta e^cum; then beta v rows
  ALIGN16 SHARED T sx[CH * KP];              // q^ rows (scaled by K^-1/2); then T as [CH][TP]
  SHARED float sl[CH * (CH - 1) / 2];        // L packed by rows: L[i][j] at i (i - 1) / 2 + j, j < i
  SHARED float scum[CH];
  SHARED float sbeta[CH];
  SHARED float stot[1];
  // 1. rows of k and q (all loads in flight at once), normalised; cumulative log decay and beta
  const int sub = static_cast<int>(lane) / U8;
  const int d8 = (static_cast<int>(lane) % U8) * 8;
  Raw8<T> kr[IT];
  Raw8<T> qr[IT];
  for (int it = 0; it < IT; ++it) {
    const int t = c * CH + (it * NWP + static_cast<int>(warp)) * RPI + sub;
    const int base = ((b * L + (t < L ? t : L - 1)) * Hk + hk) * KD + d8;  // padded rows: zeroed below
    kr[it] = ldr8(k + base);
    qr[it] = ldr8(q + base);
  }
  if (warp < CH / 32) {                      // inclusive prefix sum of g over the chunk (xor scan)
    const int r = static_cast<int>(tid);
    const int t = c * CH + r;
    const int gi = (b * L + (t < L ? t : L - 1)) * H + h;
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
  const float qscale = frsqrt(static_cast<float>(KD));
  for (int it = 0; it < IT; ++it) {
    const int r = (it * NWP + static_cast<int>(warp)) * RPI + sub;
    float kv[8];
    float qv[8];
    cvt8(kr[it], kv);
    cvt8(qr[it], qv);
    float kk = 0.0f;
    float qq = 0.0f;
    for (int j = 0; j < 8; ++j) {
      kk += kv[j] * kv[j];
      qq += qv[j] * qv[j];
    }
    for (int m = U8 / 2; m > 0; m >>= 1) {   // the row's lanes
      kk += shfl_xor(kk, m);
      qq += shfl_xor(qq, m);
    }
    const bool in = c * CH + r < L;
    float kn = in ? 1.0f : 0.0f;
    float qn = in ? qscale : 0.0f;
    if (L2) {
      kn *= frsqrt(kk + 1e-6f);
      qn *= frsqrt(qq + 1e-6f);
    }
    for (int j = 0; j < 8; ++j) {
      kv[j] *= kn;
      qv[j] *= qn;
    }
    st8(sk + r * KP + d8, kv);
    st8(sx + r * KP + d8, qv);
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
    for (int i = 0; i < 8; i += 2) {         // column pairs (cc, cc + 1)
      const int r = 16 * ti + acc_row(i, lane);
      const int cc = 16 * tj + acc_col(i, lane);
      const float d0 = cc <= r ? fexp(scum[r] - scum[cc]) : 0.0f;
      const float d1 = cc + 1 <= r ? fexp(scum[r] - scum[cc + 1]) : 0.0f;
      if (gram) {
        if (cc < r) sl[r * (r - 1) / 2 + cc] = sbeta[r] * a.c[i] * d0;
        if (cc + 1 < r) sl[r * (r - 1) / 2 + cc + 1] = sbeta[r] * a.c[i + 1] * d1;
      } else {
        st2(attn + (bhc * CH + r) * CH + cc, a.c[i] * d0, a.c[i + 1] * d1);
      }
    }
  }
  float zero8[8];
  for (int j = 0; j < 8; ++j) zero8[j] = 0.0f;
  for (int e = tid; e < CH * CH / 8; e += NT) {  // the causal mask's zero tiles of attn
    const int r = e / (CH / 8);
    const int cu = e % (CH / 8);
    if (cu / 2 > r / 16) st8(attn + (bhc * CH + r) * CH + 8 * cu, zero8);
  }
  for (int e = tid; e < CH * U8; e += NT) {
    const int r = e / U8;
    const int d = (e % U8) * 8;
    float f[8];
    ld8(sx + r * KP + d, f);
    const float eq = fexp(scum[r]);
    for (int j = 0; j < 8; ++j) f[j] *= eq;
    st8(qd + (bhc * CH + r) * KD + d, f);
    ld8(sk + r * KP + d, f);
    const float ek = fexp(clast - scum[r]);
    for (int j = 0; j < 8; ++j) f[j] *= ek;
    st8(kd + (bhc * CH + r) * KD + d, f);
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
    for (int e = static_cast<int>(tid) - CH; e < CH * U8; e += NT - CH) {
      const int r = e / U8;
      const int d = (e % U8) * 8;
      float f[8];
      ld8(sk + r * KP + d, f);
      const float sc = sbeta[r] * fexp(scum[r]);
      for (int j = 0; j < 8; ++j) f[j] *= sc;
      st8(sk + r * KP + d, f);
    }
  }
  BARRIER();
  // 4. w = T (beta e^cum k) (T lower triangular: row tile ti needs column tiles <= ti), with the
  // value rows loading meanwhile
  Raw8<T> vr[VPER];
  for (int e = 0; e < VPER; ++e) {
    const int idx = static_cast<int>(tid) + e * NT;
    const int t = c * CH + idx / VU;
    if (idx < CH * VU) vr[e] = ldr8(v + ((b * L + (t < L ? t : L - 1)) * H + h) * VD + (idx % VU) * 8);
  }
  for (int tn = warp; tn < KD / 16; tn += NWP) {
    for (int ti = 0; ti < CH / 16; ++ti) {
      Acc16 a;
      acc_zero(a);
      for (int kk = 0; kk <= ti; ++kk) mma16(a, sx + 16 * ti * TP + 16 * kk, TP, sk + 16 * kk * KP + 16 * tn, KP, lane);
      for (int i = 0; i < 8; i += 2)
        st2(w + (bhc * CH + 16 * ti + acc_row(i, lane)) * KD + 16 * tn + acc_col(i, lane), a.c[i], a.c[i + 1]);
    }
  }
  BARRIER();
  // 5. u = T (beta v)
  for (int e = 0; e < VPER; ++e) {
    const int idx = static_cast<int>(tid) + e * NT;
    if (idx < CH * VU) {
      const int r = idx / VU;
      float f[8];
      cvt8(vr[e], f);
      for (int j = 0; j < 8; ++j) f[j] *= sbeta[r];  // 0 on padded rows
      st8(sk + r * KP + (idx % VU) * 8, f);
    }
  }
  BARRIER();
  for (int tn = warp; tn < VD / 16; tn += NWP) {
    for (int ti = 0; ti < CH / 16; ++ti) {
      Acc16 a;
      acc_zero(a);
      for (int kk = 0; kk <= ti; ++kk) mma16(a, sx + 16 * ti * TP + 16 * kk, TP, sk + 16 * kk * KP + 16 * tn, KP, lane);
      for (int i = 0; i < 8; i += 2)
        st2(u + (bhc * CH + 16 * ti + acc_row(i, lane)) * VD + 16 * tn + acc_col(i, lane), a.c[i], a.c[i + 1]);
    }
  }
""",
)

PASS = Kernel(
    name="alloy_gated_delta_wy_pass",
    inputs=("w", "u", "kd", "dlast", "state"),
    outputs=("vt", "hs", "new_state"),
    body="""
  const int H = w_shape[1];
  const int n = w_shape[2];
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
  // u in this warp's accumulator layout, and w / kd rows, for the chunk after this one (registers)
  T un[8];
  for (int i = 0; i < 8; ++i) un[i] = u[(bh * n * CH + 16 * jt + acc_col(i, lane)) * VD + n0 + 16 * nt + acc_row(i, lane)];
  Raw8<T> pw[PER];
  Raw8<T> pk[PER];
  for (int e = 0; e < PER; ++e) {
    const int idx = static_cast<int>(tid) + e * NT;
    const int off = ((bh * n + (n > 1 ? 1 : 0)) * CH + idx / U8) * KD + (idx % U8) * 8;
    pw[e] = ldr8(w + off);
    pk[e] = ldr8(kd + off);
  }
  BARRIER();
  for (int c = 0; c < n; ++c) {
    T uc[8];
    for (int i = 0; i < 8; ++i) uc[i] = un[i];
    const int cu = c + 1 < n ? c + 1 : c;
    for (int i = 0; i < 8; ++i)
      un[i] = u[((bh * n + cu) * CH + 16 * jt + acc_col(i, lane)) * VD + n0 + 16 * nt + acc_row(i, lane)];
    const int cn = c + 2 < n ? c + 2 : n - 1;
    Raw8<T> qw[PER];
    Raw8<T> qk[PER];
    for (int e = 0; e < PER; ++e) {          // two chunks ahead, into registers
      const int idx = static_cast<int>(tid) + e * NT;
      const int off = ((bh * n + cn) * CH + idx / U8) * KD + (idx % U8) * 8;
      qw[e] = ldr8(w + off);
      qk[e] = ldr8(kd + off);
    }
    for (int e = tid; e < 32 * U8; e += NT) {  // S_c -> hs (V, K) rows n0 ..
      const int r = e / U8;
      const int d = (e % U8) * 8;
      float f[8];
      ld8(sst + r * KP + d, f);
      st8(hs + ((bh * n + c) * VD + n0 + r) * KD + d, f);
    }
    Acc16 p0;                                // v_new^T = u^T - S^T w^T, two accumulation chains
    Acc16 p1;
    acc_zero(p0);
    acc_zero(p1);
    for (int kk = 0; kk < KD / 16; kk += 2) {
      mma16t(p0, sst + 16 * nt * KP + 16 * kk, KP, sw + 16 * jt * KP + 16 * kk, KP, lane);
      mma16t(p1, sst + 16 * nt * KP + 16 * kk + 16, KP, sw + 16 * jt * KP + 16 * kk + 16, KP, lane);
    }
    Acc16 vv;
    for (int i = 0; i < 8; ++i) vv.c[i] = static_cast<float>(uc[i]) - p0.c[i] - p1.c[i];
    acc_store(vv, svt + 16 * nt * VP + 16 * jt, VP, lane);
    BARRIER();
    for (int e = tid; e < 32 * CH / 8; e += NT) {  // v_new^T rows -> vt (V, C)
      const int r = e / (CH / 8);
      const int d = (e % (CH / 8)) * 8;
      float f[8];
      ld8(svt + r * VP + d, f);
      st8(vt + ((bh * n + c) * VD + n0 + r) * CH + d, f);
    }
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
      pw[e] = qw[e];
      pk[e] = qk[e];
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

OUT = Kernel(
    name="alloy_gated_delta_wy_out",
    inputs=("qd", "hs", "attn", "vt", "g"),
    outputs=("o",),
    body="""
  const int L = g_shape[1];
  const int H = qd_shape[1];
  const int n = qd_shape[2];
  constexpr int NVB = VD / VB;
  const int c = bid_x / NVB;                 // the V slices of one chunk run side by side (L2 reuse of qd, attn)
  const int h = bid_y;
  const int b = bid_z;
  const int n0 = (bid_x % NVB) * VB;
  const int bhc = (b * H + h) * n + c;
  constexpr int KP = KD + 8;
  constexpr int TP = CH + 8;
  constexpr int U8 = KD / 8;
  constexpr int C8 = CH / 8;
  constexpr int NWP = NT / 32;
  constexpr int TN = VB / 16;
  constexpr int TPW = (CH / 16) * TN / NWP;  // output tiles per warp
  constexpr int AP = (CH * C8 + NT - 1) / NT;
  constexpr int VPR = (VB * C8 + NT - 1) / NT;
  ALIGN16 SHARED T s1[CH * KP];              // qd rows; then attn as [CH][TP]
  ALIGN16 SHARED T s2[VB * KP];              // S_c^T rows n0 ..; then v_new^T rows as [VB][TP]
  for (int e = tid; e < CH * U8; e += NT)
    str8(ldr8(qd + (bhc * CH + e / U8) * KD + (e % U8) * 8), s1 + (e / U8) * KP + (e % U8) * 8);
  for (int e = tid; e < VB * U8; e += NT)
    str8(ldr8(hs + (bhc * VD + n0 + e / U8) * KD + (e % U8) * 8), s2 + (e / U8) * KP + (e % U8) * 8);
  Raw8<T> ar[AP];
  Raw8<T> vr[VPR];
  for (int e = 0; e < AP; ++e) {
    const int idx = static_cast<int>(tid) + e * NT;
    if (idx < CH * C8) ar[e] = ldr8(attn + (bhc * CH + idx / C8) * CH + (idx % C8) * 8);
  }
  for (int e = 0; e < VPR; ++e) {
    const int idx = static_cast<int>(tid) + e * NT;
    if (idx < VB * C8) vr[e] = ldr8(vt + (bhc * VD + n0 + idx / C8) * CH + (idx % C8) * 8);
  }
  BARRIER();
  Acc16 acc[TPW];
  for (int p = 0; p < TPW; ++p) {            // qd S_c
    const int tile = static_cast<int>(warp) * TPW + p;
    const int ti = tile / TN;
    const int tn = tile % TN;
    acc_zero(acc[p]);
    for (int kk = 0; kk < KD / 16; ++kk) mma16t(acc[p], s1 + 16 * ti * KP + 16 * kk, KP, s2 + 16 * tn * KP + 16 * kk, KP, lane);
  }
  BARRIER();
  for (int e = 0; e < AP; ++e) {
    const int idx = static_cast<int>(tid) + e * NT;
    if (idx < CH * C8) str8(ar[e], s1 + (idx / C8) * TP + (idx % C8) * 8);
  }
  for (int e = 0; e < VPR; ++e) {
    const int idx = static_cast<int>(tid) + e * NT;
    if (idx < VB * C8) str8(vr[e], s2 + (idx / C8) * TP + (idx % C8) * 8);
  }
  BARRIER();
  for (int p = 0; p < TPW; ++p) {            // + attn v_new (attn lower triangular by tiles)
    const int tile = static_cast<int>(warp) * TPW + p;
    const int ti = tile / TN;
    const int tn = tile % TN;
    for (int kk = 0; kk <= ti; ++kk) mma16t(acc[p], s1 + 16 * ti * TP + 16 * kk, TP, s2 + 16 * tn * TP + 16 * kk, TP, lane);
    for (int i = 0; i < 8; i += 2) {
      const int t = c * CH + 16 * ti + acc_row(i, lane);
      if (t < L) st2(o + ((b * L + t) * H + h) * VD + n0 + 16 * tn + acc_col(i, lane), acc[p].c[i], acc[p].c[i + 1]);
    }
  }
""",
)


def applies(q, k, v, g) -> bool:
    """Static facts under which the tensor-core path runs (else the chunk-pass path)."""
    B, T, _, K = q.shape
    H, V = v.shape[2], v.shape[3]
    padded = -(-T // CH) * CH
    return (K == KD and V % 32 == 0 and V <= KD and g.ndim == 3
            and q.dtype in (mx.bfloat16, mx.float16) and k.dtype == q.dtype and v.dtype == q.dtype
            and fits_int32(B, H, padded, KD))  # the kernels index with 32-bit ints


def prep(q, k, v, g, beta, l2norm: bool):
    """PREP launch: (w, u, kd, qd, attn, dlast), laid out (B, H, n, C, ...)."""
    B, T, _, K = q.shape
    H, V = v.shape[2], v.shape[3]
    n = -(-T // CH)
    dt = q.dtype
    return PREP(
        [q, k, v, g, beta],
        template=[("T", dt), ("KD", K), ("VD", V), ("CH", CH), ("NT", NT), ("L2", bool(l2norm))],
        grid=(n, H, B), threadgroup=NT,
        output_shapes=[(B, H, n, CH, K), (B, H, n, CH, V), (B, H, n, CH, K), (B, H, n, CH, K),
                       (B, H, n, CH, CH), (B, H, n)],
        output_dtypes=[dt] * 5 + [mx.float32])


def state_pass(w, u, kd, dlast, state):
    """PASS launch: (v_new^T (B, H, n, V, C), S_c^T (B, H, n, V, K), final state (B, H, K, V) fp32)."""
    B, H, n, C, K = w.shape
    V = u.shape[-1]
    return PASS(
        [w, u, kd, dlast, state],
        template=[("T", w.dtype), ("KD", K), ("VD", V), ("CH", C), ("NT", NT)],
        grid=(V // 32, H, B), threadgroup=NT,
        output_shapes=[(B, H, n, V, C), (B, H, n, V, K), (B, H, K, V)],
        output_dtypes=[w.dtype, w.dtype, mx.float32])


def output(qd, hs, attn, vt, g):
    """OUT launch: o (B, T, H, V) = qd S_c + attn v_new per chunk; g only gives T."""
    B, H, n, C, K = qd.shape
    V = hs.shape[3]
    VB = 64 if V % 64 == 0 else 32
    return OUT(
        [qd, hs, attn, vt, g],
        template=[("T", qd.dtype), ("KD", K), ("VD", V), ("VB", VB), ("CH", C), ("NT", NT)],
        grid=(n * (V // VB), H, B), threadgroup=NT,
        output_shapes=[(B, g.shape[1], H, V)], output_dtypes=[qd.dtype])[0]


def gated_delta_wy(q, k, v, g, beta, state, l2norm: bool = True):
    """The gated delta rule's forward by the three launches (module docstring): (o in v.dtype, final
    state fp32). `state`: (B, H, K, V) fp32."""
    w, u, kd, qd, attn, dlast = prep(q, k, v, g, beta, l2norm)
    vt, hs, s = state_pass(w, u, kd, dlast, state.astype(mx.float32))
    return output(qd, hs, attn, vt, g), s

"""Mamba-2 SSD chunked forward: three portable kernels around tensor-core matmuls.

With chunks of K steps (K a multiple of 16), a_t = dt_t A_h, acs = cumsum of a inside each chunk:

    0. acs, exp(acs_K - acs_s) dt x, exp(acs_K)        kernel `PREP` (dt = 0 past the end)
    1. CB    = C Bᵀ                                   (b, c, g, K, K)    matmul, fp32
    2. S_c   = Bᵀ (exp(acs_K - acs_s) dt x)            (b, c, g, n, r p)  matmul (chunk states)
    3. H_c   = exp(acs_K) H_{c-1} + S_c, H_0 = h0      kernel `PASS` (state passing: the states
             entering every chunk and the final state (b, h, p, n) float32)
    4. Yoff  = C H_{c-1}                               (b, c, g, K, r p)  matmul
    5. y_l   = sum_{s<=l} CB[l,s] exp(acs_l - acs_s) dt_s x_s + exp(acs_l) Yoff_l + D x_l
                                                      kernel `OUT`: the diagonal block as a
             shared-memory tiled product (64-row blocks, 8 x 4 outputs per thread, float4
             shared tiles) with the decay mask built on the fly (fp32), written straight into
             y (b, l, h, p)

This is `alloy.ops.ssd.ssd_chunked` (the ssd_minimal decomposition) with no (l, s, head) mask
tensor in memory, the state passing as one sequential sweep over chunks instead of a (c+1)²
segsum matmul, and the state matmul operands in x.dtype (bf16 operands, fp32 accumulation, as
the official Triton kernels). Inference kernel; `alloy.ops.ssd` gives it a VJP through
`ssd_chunked`.
"""
from __future__ import annotations

import mlx.core as mx

from alloy.metal.prelude import Kernel, groups

GROUP = 256
_F32 = mx.float32

PREP = Kernel(
    name="alloy_ssd_prep",
    inputs=("x", "dt", "A"),
    outputs=("acs", "xs", "decay"),
    body="""
  // one group per (batch * chunk, head); thread p owns column p of the head's (K, P) block
  const int L = x_shape[1];
  const int H = x_shape[2];
  const int P = x_shape[3];
  const int h = bid_y;
  const long bc = bid_z;
  const int nc = (L + KC - 1) / KC;
  const long b = bc / nc;
  const int c = bc % nc;
  const int p = tid;
  const bool okp = p < P;
  const float Ah = static_cast<float>(A[h]);
  SHARED float sacs[KC];
  float run = 0.0f;  // cumsum of dt A inside the chunk (every thread holds the same value)
  for (int l0 = 0; l0 < KC; l0 += TB) {   // pass 1: acs (past the end of x: dt = 0)
    float dts[TB];
    for (int u = 0; u < TB; ++u) {
      const long t = (long)c * KC + l0 + u;
      dts[u] = (l0 + u < KC && t < L) ? static_cast<float>(dt[(b * L + t) * H + h]) : 0.0f;
    }
    for (int u = 0; u < TB; ++u) {
      if (l0 + u < KC) {
        run += dts[u] * Ah;
        if (tid == 0) sacs[l0 + u] = run;
      }
    }
  }
  BARRIER();
  for (int l0 = 0; l0 < KC; l0 += TB) {   // pass 2: dt x decayed to the chunk end, time-major
    float dts[TB];
    float xv[TB];
    for (int u = 0; u < TB; ++u) {
      const long t = (long)c * KC + l0 + u;
      const bool v = l0 + u < KC && t < L;
      dts[u] = v ? static_cast<float>(dt[(b * L + t) * H + h]) : 0.0f;
      xv[u] = (v && okp) ? static_cast<float>(x[((b * L + t) * H + h) * P + p]) : 0.0f;
    }
    for (int u = 0; u < TB; ++u) {
      if (l0 + u < KC && okp) {
        xs[((bc * KC + l0 + u) * H + h) * P + p] = static_cast<T>(xv[u] * dts[u] * fexp(run - sacs[l0 + u]));
      }
    }
  }
  for (int l = tid; l < KC; l += nthreads) acs[(bc * H + h) * KC + l] = sacs[l];
  if (tid == 0) decay[bc * H + h] = fexp(run);
""",
)

OUT = Kernel(
    name="alloy_ssd_chunk_out",
    inputs=("CB", "acs", "x", "dt", "Yo", "D"),
    outputs=("y",),
    helpers="""
#define FMA4(a, o, m, v) a[o] += (m) * (v).x; a[o + 1] += (m) * (v).y; a[o + 2] += (m) * (v).z; a[o + 3] += (m) * (v).w;
""",
    body="""
  // one group of 128 threads per (block of 64 rows, head, batch * chunk):
  //   y[l] = sum_{s <= l} CB[l, s] exp(acs_l - acs_s) dt_s x_s + exp(acs_l) Yo[l] + D x_l
  // thread (ty, tx) = (tid / 16, tid % 16) owns rows r0 + 4 ty + {0..3} and r0 + 32 + 4 ty + {0..3},
  // columns 64 j + 4 tx + {0..3} (j < CG): 32 CG accumulators, 3 float4 shared reads per step
  const int L = x_shape[1];
  const int H = x_shape[2];
  const int G = CB_shape[2];
  const int R = H / G;
  const int nc = CB_shape[1];
  const int h = bid_y;
  const int g = h / R;
  const long bc = bid_z;
  const long b = bc / nc;
  const long t0 = (bc % nc) * KC;             // first time step of the chunk
  const int r0 = bid_x * 64;
  const int tx = tid % 16;
  const int ty = tid / 16;
  SHARED float sacs[KC];
  SHARED float4 Xs[SB][16 * CG];              // dt_s x_s, 4 columns per entry
  SHARED float4 Ms[SB][17];                   // mask tile, 4 rows per entry (padded: no bank conflicts)
  for (int l = tid; l < KC; l += 128) sacs[l] = static_cast<float>(acs[(bc * H + h) * KC + l]);
  float acc[8][4 * CG];
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 4 * CG; ++j) acc[i][j] = 0.0f;
  BARRIER();
  const int s_end = r0 + 64 < KC ? r0 + 64 : KC;   // causal: no s beyond the block's last row
  for (int s0 = 0; s0 < s_end; s0 += SB) {
    for (int idx = tid; idx < SB * 16 * CG; idx += 128) {   // X tile
      const int s = idx / (16 * CG);
      const int p = 4 * (idx % (16 * CG));
      const long t = t0 + s0 + s;
      float v[4];
      const bool ok = s0 + s < KC && t < L;
      const float dv = ok ? static_cast<float>(dt[(b * L + t) * H + h]) : 0.0f;
      for (int q = 0; q < 4; ++q)
        v[q] = (ok && p + q < PC) ? dv * static_cast<float>(x[((b * L + t) * H + h) * PC + p + q]) : 0.0f;
      Xs[s][idx % (16 * CG)] = f4(v[0], v[1], v[2], v[3]);
    }
    for (int idx = tid; idx < SB * 16; idx += 128) {        // mask tile, read along s (coalesced)
      const int s = idx % SB;
      const int rq = idx / SB;
      const int ss = s0 + s;
      float v[4];
      for (int q = 0; q < 4; ++q) {
        const int l = r0 + 4 * rq + q;
        v[q] = (ss <= l && l < KC)
            ? static_cast<float>(CB[((bc * G + g) * KC + l) * KC + ss]) * fexp(sacs[l] - sacs[ss])
            : 0.0f;
      }
      Ms[s][rq] = f4(v[0], v[1], v[2], v[3]);
    }
    BARRIER();
    for (int s = 0; s < SB; ++s) {
      const float4 m0 = Ms[s][ty];
      const float4 m1 = Ms[s][8 + ty];
      for (int j = 0; j < CG; ++j) {
        const float4 xv = Xs[s][16 * j + tx];
        FMA4(acc[0], 4 * j, m0.x, xv)
        FMA4(acc[1], 4 * j, m0.y, xv)
        FMA4(acc[2], 4 * j, m0.z, xv)
        FMA4(acc[3], 4 * j, m0.w, xv)
        FMA4(acc[4], 4 * j, m1.x, xv)
        FMA4(acc[5], 4 * j, m1.y, xv)
        FMA4(acc[6], 4 * j, m1.z, xv)
        FMA4(acc[7], 4 * j, m1.w, xv)
      }
    }
    BARRIER();
  }
  const float dh = static_cast<float>(D[h]);
  for (int i = 0; i < 8; ++i) {
    const int l = r0 + (i < 4 ? 4 * ty + i : 32 + 4 * ty + i - 4);
    const long t = t0 + l;
    if (l < KC && t < L) {
      const float el = fexp(sacs[l]);
      for (int j = 0; j < 4 * CG; ++j) {
        const int p = 64 * (j / 4) + 4 * tx + j % 4;
        if (p < PC) {
          const long e = ((b * L + t) * H + h) * PC + p;
          const float yo = static_cast<float>(Yo[((bc * G + g) * KC + l) * (R * PC) + (h - g * R) * PC + p]);
          y[e] = static_cast<T>(acc[i][j] + el * yo + dh * static_cast<float>(x[e]));
        }
      }
    }
  }
""",
)


PASS = Kernel(
    name="alloy_ssd_state_pass",
    inputs=("states", "decay", "init"),
    outputs=("starts", "final_state"),
    body="""
  const int nc = states_shape[1];
  const int H = decay_shape[2];
  const int G = states_shape[2];
  const int N = states_shape[3];
  const int P = init_shape[2];
  const int R = H / G;
  const long per = (long)G * N * R * P;        // elements of one chunk state, layout (g, n, r, p)
  const long e = (long)bid_x * nthreads + tid;
  if (e < states_shape[0] * per) {
    const long b = e / per;
    const long r0 = e % per;
    const int p = r0 % P;
    const int ri = (r0 / P) % R;
    const int n = (r0 / (P * R)) % N;
    const int g = r0 / ((long)P * R * N);
    const int h = g * R + ri;
    const long fi = ((b * H + h) * P + p) * N + n;
    float s = static_cast<float>(init[fi]);
    for (int c0 = 0; c0 < nc; c0 += CBLK) {  // load CBLK chunks ahead of the sweep
      float st[CBLK];
      float dc[CBLK];
      for (int u = 0; u < CBLK; ++u) {
        const bool v = c0 + u < nc;
        st[u] = v ? static_cast<float>(states[(b * nc + c0 + u) * per + r0]) : 0.0f;
        dc[u] = v ? static_cast<float>(decay[(b * nc + c0 + u) * H + h]) : 1.0f;
      }
      for (int u = 0; u < CBLK; ++u) {
        if (c0 + u < nc) starts[(b * nc + c0 + u) * per + r0] = static_cast<T>(s);
        s = dc[u] * s + st[u];
      }
    }
    final_state[fi] = s;
  }
""",
)

def ssd_chunked(x, dt, A, B, C, D, initial_state, chunk_size: int):
    """Chunked SSD forward on the GPU. x (b, l, h, p), dt (b, l, h), A (h,), B/C (b, l, g, n),
    D (h,), initial_state (b, h, p, n) -> y (b, l, h, p) in x.dtype, final state (b, h, p, n) f32.
    Any length: T is padded to whole chunks with dt = 0 (decay 1, no input)."""
    b, l, H, P = x.shape
    G, N = B.shape[-2:]
    K = chunk_size
    pad = -l % K
    nc = (l + pad) // K

    def chunks(v):
        if pad:
            v = mx.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))
        return v.reshape(b, nc, K, *v.shape[2:])

    dtype = x.dtype
    acs, xs, decay = PREP(
        [x, dt, A],
        template=[("T", dtype), ("KC", K), ("TB", 8)],
        grid=(1, H, b * nc),
        threadgroup=groups(P, 32) * 32,
        output_shapes=[(b, nc, H, K), (b, nc, K, H, P), (b, nc, H)],
        output_dtypes=[_F32, dtype, _F32],
    )
    xs = xs.reshape(b, nc, K, G, (H // G) * P).transpose(0, 1, 3, 2, 4)  # (b, c, g, K, r p)
    Bc, Cc = chunks(B).transpose(0, 1, 3, 2, 4), chunks(C).transpose(0, 1, 3, 2, 4)  # (b, c, g, K, n)
    CB = Cc.astype(_F32) @ Bc.astype(_F32).swapaxes(-1, -2)  # (b, c, g, K, K) f32
    states = Bc.swapaxes(-1, -2).astype(dtype) @ xs  # (b, c, g, n, r p)
    per = G * N * (H // G) * P
    starts, final_state = PASS(
        [states, decay, initial_state],
        template=[("T", dtype), ("CBLK", 8)],
        grid=(groups(b * per, GROUP), 1, 1),
        threadgroup=GROUP,
        output_shapes=[states.shape, (b, H, P, N)],
        output_dtypes=[dtype, _F32],
    )
    Yo = Cc.astype(dtype) @ starts  # (b, c, g, K, r p)
    (y,) = OUT(
        [CB, acs, x, dt, Yo, D],
        template=[("T", dtype), ("KC", K), ("PC", P), ("CG", groups(P, 64)), ("SB", 32)],
        grid=(groups(K, 64), H, b * nc),
        threadgroup=128,
        output_shapes=[(b, l, H, P)],
        output_dtypes=[dtype],
    )
    return y, final_state

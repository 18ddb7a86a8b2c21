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
             y (b, l, h, p); `CHUNK_OUT_TC` the same on warp tile products (tensor cores for
             bf16 / fp16: mask and dt x rounded to x.dtype, fp32 accumulation; switch `OUT_TC`;
             16-byte epilogue, or `CHUNK_OUT_TC_ACC` with switch `OUT_TC_VEC_EPILOGUE` off);
             `CHUNK_OUT_YO_TC` also computes step 4 in the kernel (C rows and the head's entering
             state staged in shared memory, products into y's accumulators before the exp(acs_l)
             row scaling), so no Yoff array exists (switch `OUT_FUSED_YO`)

This is `alloy.ops.ssd.ssd_chunked` (the ssd_minimal decomposition) with no (l, s, head) mask
tensor in memory, the state passing as one sequential sweep over chunks instead of a (c+1)²
segsum matmul, and the state matmul operands in x.dtype (bf16 operands, fp32 accumulation, as
the official Triton kernels). Inference kernel; `alloy.ops.ssd` gives it a VJP through
`ssd_chunked`.
"""
from __future__ import annotations

import dataclasses

import mlx.core as mx

from alloy.metal.prelude import VEC_IO, Kernel, groups
from alloy.metal.ssd_cb import CB_TC as CB_TC_KERNEL, cb_tc_fits, chunk_cb

GROUP = 256
_F32 = mx.float32

PREP = Kernel(
    name="alloy_ssd_prep",
    inputs=("x", "dt", "A"),
    outputs=("acs", "xs", "decay"),
    body="""
  // one group per (batch * chunk, head): the chunk's dt A, its running sum acs (one warp's scan),
  // then xs = dt x decayed to the chunk end, written time-major. Threads take 8-column units of a
  // row (one 16-byte load / store for 16-bit x) where P % 8 == 0, else single columns; each thread
  // issues the loads of TB rows before using any (the rows of a chunk in flight together).
  const int L = x_shape[1];
  const int H = x_shape[2];
  const int P = x_shape[3];
  const int h = bid_y;
  const long bc = bid_z;
  const int nc = (L + KC - 1) / KC;
  const long b = bc / nc;
  const int c = bc % nc;
  const float Ah = static_cast<float>(A[h]);
  SHARED float sacs[KC];
  SHARED float sdt[KC];
  for (int l = tid; l < KC; l += nthreads) {   // past the end of x: dt = 0
    const long t = (long)c * KC + l;
    const float d = t < L ? static_cast<float>(dt[(b * L + t) * H + h]) : 0.0f;
    sdt[l] = d;
    sacs[l] = d * Ah;
  }
  BARRIER();
  if (warp == 0) {                            // inclusive scan: lane j sums PER consecutive steps,
    constexpr int PER = (KC + 31) / 32;       // the lanes' exclusive prefix by a butterfly
    float v[PER];
    float tot = 0.0f;
    for (int j = 0; j < PER; ++j) {
      const int l = static_cast<int>(lane) * PER + j;
      v[j] = l < KC ? sacs[l] : 0.0f;
      tot += v[j];
    }
    float pre = 0.0f;
    for (int o = 1; o < 32; o <<= 1) {
      const float other = shfl_xor(tot, o);
      if (lane & static_cast<unsigned int>(o)) pre += other;
      tot += other;
    }
    for (int j = 0; j < PER; ++j) {
      const int l = static_cast<int>(lane) * PER + j;
      pre += v[j];
      if (l < KC) sacs[l] = pre;
    }
  }
  BARRIER();
  const float run = sacs[KC - 1];
  const bool vec = P % 8 == 0;
  const int upr = vec ? P / 8 : P;            // units per row
  const int rpi = static_cast<int>(nthreads) / upr;   // rows per sweep of the group
  const int r = static_cast<int>(tid) / upr;
  const int u = static_cast<int>(tid) % upr;
  if (r < rpi) {
    for (int l0 = r; l0 < KC; l0 += rpi * TB) {
      Raw8<T> xr[TB];                         // raw 16-bit units until used (vec)
      float x1[TB];                           // single columns (not vec)
      for (int j = 0; j < TB; ++j) {          // all TB rows' loads first
        const int l = l0 + rpi * j;
        const long t = (long)c * KC + l;
        const bool ok = l < KC && t < L;
        const long e = ((b * L + (ok ? t : 0)) * H + h) * P;
        if (vec) {
          xr[j] = ldr8(x + e + 8 * u);
        } else {
          x1[j] = static_cast<float>(x[e + u]);
        }
      }
      for (int j = 0; j < TB; ++j) {
        const int l = l0 + rpi * j;
        const long t = (long)c * KC + l;
        if (l < KC) {
          const bool ok = t < L;              // padding steps: 0
          const float f = ok ? sdt[l] * fexp(run - sacs[l]) : 0.0f;
          const long o = ((bc * KC + l) * H + h) * P;
          if (vec) {
            float w[8];
            cvt8(xr[j], w);
            for (int q = 0; q < 8; ++q) w[q] = ok ? w[q] * f : 0.0f;
            st8(xs + o + 8 * u, w);
          } else {
            xs[o + u] = static_cast<T>(ok ? x1[j] * f : 0.0f);
          }
        }
      }
    }
  }
  for (int l = tid; l < KC; l += nthreads) acs[(bc * H + h) * KC + l] = sacs[l];
  if (tid == 0) decay[bc * H + h] = fexp(run);
""",
)

# a[o..o+4) += m * v (v a float4): the 4-column step of the shared-tile products below; ROWS8_STEP:
# one reduction step of OUT / BWD_DX, acc[0..8)[0..4 CG) += this thread's 8 rows of the mask tile
# (float4s M[k][ty], M[k][8 + ty]) times its CG float4 columns V[k][16 j + tx]
_FMA4 = r"""
#define FMA4(a, o, m, v) a[o] += (m) * (v).x; a[o + 1] += (m) * (v).y; a[o + 2] += (m) * (v).z; a[o + 3] += (m) * (v).w;
#define ROWS8_STEP(M, V, k) {                   \
    const float4 m0 = M[k][ty];                 \
    const float4 m1 = M[k][8 + ty];             \
    for (int j = 0; j < CG; ++j) {              \
      const float4 vv = V[k][16 * j + tx];      \
      FMA4(acc[0], 4 * j, m0.x, vv)             \
      FMA4(acc[1], 4 * j, m0.y, vv)             \
      FMA4(acc[2], 4 * j, m0.z, vv)             \
      FMA4(acc[3], 4 * j, m0.w, vv)             \
      FMA4(acc[4], 4 * j, m1.x, vv)             \
      FMA4(acc[5], 4 * j, m1.y, vv)             \
      FMA4(acc[6], 4 * j, m1.z, vv)             \
      FMA4(acc[7], 4 * j, m1.w, vv)             \
    }                                           \
  }
"""

def _chunk_block(src: str) -> str:
    """The indices OUT, BWD_DX and their tensor-core versions share: the group's block of 64 rows from
    r0, head h (of group g), batch x chunk bc, the chunk's first step t0. `src`: the (b, L, h, p)
    input that gives L and H."""
    return f"""\
  const int L = {src}_shape[1];
  const int H = {src}_shape[2];
  const int G = CB_shape[2];
  const int R = H / G;
  const int nc = CB_shape[1];
  const int h = bid_y;
  const int g = h / R;
  const long bc = bid_z;
  const long b = bc / nc;
  const long t0 = (bc % nc) * KC;             // first time step of the chunk
  const int r0 = bid_x * 64;
"""


def _rows_item(src: str, tiles: str) -> str:
    """The opening OUT and BWD_DX share: one group of 128 threads per (block of 64 rows from r0, head
    h, batch x chunk bc), thread (ty, tx) = (tid / 16, tid % 16); the head's acs for the chunk in
    shared memory, the 8 x 4 CG accumulators zeroed. `src`: the (b, L, h, p) input that gives L and
    H; `tiles`: the kernel's own shared tile declarations."""
    return _chunk_block(src) + f"""\
  const int tx = tid % 16;
  const int ty = tid / 16;
  SHARED float sacs[KC];
{tiles}
  for (int l = tid; l < KC; l += 128) sacs[l] = static_cast<float>(acs[(bc * H + h) * KC + l]);
  float acc[8][4 * CG];
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 4 * CG; ++j) acc[i][j] = 0.0f;
  BARRIER();"""


OUT = Kernel(
    name="alloy_ssd_chunk_out",
    inputs=("CB", "acs", "x", "dt", "Yo", "D"),
    outputs=("y",),
    helpers=_FMA4,
    body="""
  // one group of 128 threads per (block of 64 rows, head, batch * chunk):
  //   y[l] = sum_{s <= l} CB[l, s] exp(acs_l - acs_s) dt_s x_s + exp(acs_l) Yo[l] + D x_l
  // thread (ty, tx) = (tid / 16, tid % 16) owns rows r0 + 4 ty + {0..3} and r0 + 32 + 4 ty + {0..3},
  // columns 64 j + 4 tx + {0..3} (j < CG): 32 CG accumulators, 3 float4 shared reads per step
""" + _rows_item("x", """\
  SHARED float4 Xs[SB][16 * CG];              // dt_s x_s, 4 columns per entry
  SHARED float4 Ms[SB][17];                   // mask tile, 4 rows per entry (padded: no bank conflicts)""") + """
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
    for (int s = 0; s < SB; ++s) ROWS8_STEP(Ms, Xs, s)
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


_T_TILE_DECL = "  ALIGN16 SHARED T sdt[PC * TP];              // data tile transposed [p][k]\n"
_ROW_TILE_DECL = ("  constexpr int XP = PC + 8;                  // padded data-tile rows\n"
                  "  ALIGN16 SHARED T sdx[64 * XP];              // data tile row-major [k][p]\n")


def _tc_item(src: str, rows: bool = False) -> str:
    """The opening CHUNK_OUT_TC and BWD_DX_TC share: one group of 4 warps per (block of 64 output rows
    from r0, head h, batch x chunk bc); warp w owns rows r0 + 16 w .. + 15 and all PC columns (PC / 16
    accumulator tiles). Per step of 64 along the reduction index k: the mask tile in smk [row][k] and
    the data tile transposed in sdt [p][k] (mma16t's operands), or with `rows` row-major in sdx [k][p]
    (mma16_f's: the row-tile kernels), both in T, rows padded by 8 (the fragment loads of a warp hit 32
    different banks, as in BWD_SCORES_TC); the head's acs for the chunk in shared memory. `src`: the
    (b, L, h, p) input that gives L and H."""
    return _chunk_block(src) + f"""\
  const int w = static_cast<int>(warp);
  const int wr = r0 + 16 * w;                 // the warp's first output row
  constexpr int TP = 64 + 8;                  // padded tile rows
  constexpr int U8 = PC / 8;                  // 8-element units of a data row
  ALIGN16 SHARED T smk[64 * TP];              // mask tile [output row][k]
{_ROW_TILE_DECL if rows else _T_TILE_DECL}  SHARED float sacs[KC];
  for (int l = tid; l < KC; l += 128) sacs[l] = static_cast<float>(acs[(bc * H + h) * KC + l]);
  Acc16 acc[PC / 16];
  for (int j = 0; j < PC / 16; ++j) acc_zero(acc[j]);
  BARRIER();"""


# the data tile's loads, one 8-element unit u of row k0 + kk per item; zero past the chunk and past L.
# scale: times dt_s before the rounding to T (OUT's X = dt x). Transposed (sdt [p][k], the kernels with
# `_tc_item(rows=False)`): lanes along k, whose 8 stores per item hit consecutive 16-bit words of one
# sdt row (no bank conflicts). rows (sdx [k][p]): lanes along u, one 16-byte store per item; with dys
# also dys = v exp(acs) rounded to T in the gradient's chunk-major layout (b, c, g, K, r p), on the
# group's first step (k0 == r0: each row of the chunk is loaded first by exactly one group).
def _tc_data_tile(src: str, k0: str, scale: bool, rows: bool = False, dys: bool = False) -> str:
    mul = """
        const float d = static_cast<float>(dt[(b * L + t) * H + h]);
        for (int q = 0; q < 8; ++q) v[q] *= d;""" if scale else ""
    index = ("""const int kk = idx / U8;
      const int u = 8 * (idx % U8);""" if rows else """const int kk = idx % 64;
      const int u = 8 * (idx / 64);""")
    store = f"""
      if ({k0} == r0 && {k0} + kk < KC) {{        // dys row {k0} + kk (zero past L, as dy's padding)
        const float e = fexp(sacs[{k0} + kk]);
        float w8[8];
        for (int q = 0; q < 8; ++q) w8[q] = v[q] * e;
        st8(dys + ((bc * G + g) * KC + {k0} + kk) * (R * PC) + (h - g * R) * PC + u, w8);
      }}""" if dys else ""
    store += ("""
      st8(sdx + kk * XP + u, v);""" if rows else """
      for (int q = 0; q < 8; ++q) sdt[(u + q) * TP + kk] = static_cast<T>(v[q]);""")
    return f"""\
    for (int idx = tid; idx < 64 * U8; idx += 128) {{
      {index}
      const long t = t0 + {k0} + kk;
      float v[8];
      if ({k0} + kk < KC && t < L) {{
        ld8({src} + ((b * L + t) * H + h) * PC + u, v);{mul}
      }} else {{
        for (int q = 0; q < 8; ++q) v[q] = 0.0f;
      }}{store}
    }}"""


# The row-tile kernels CHUNK_OUT_TC_RM / BWD_DX_TC_RM: CHUNK_OUT_TC / BWD_DX_TC with the data tile
# (dt x, dy) kept row-major in shared memory, sdx [k][p]: each row read from memory by PC / 8
# consecutive lanes (whole 32-byte sectors; the transposed tiles' lanes run along k, each using half of
# every sector it touches) and stored with 16-byte stores (instead of eight 2-byte ones), the
# b-operands then read by ldmatrix.trans (`mma16_f`). BWD_DX_TC_RM also builds its mask tile in CB's
# own layout, rows l and 8 consecutive s from two 16-byte loads (CHUNK_OUT_TC's loads: BWD_DX_TC reads
# CB column-wise, 8 scalar loads per item), its a-operand the transposed tile (`lda16t`). Same
# operands and products as the transposed-tile kernels: bit-identical results. Switch `TC_ROW_TILES`.
# CHUNK_OUT_TC's own mask is `_tc_mask_rows` too.
# Eight consecutive float32 CB entries of row l from column `col` (c[0..8), two 16-byte loads: col a
# multiple of 8 with col + 8 <= KC), at `ind` spaces of indentation
def _cb_row8(col: str, ind: int) -> str:
    p = " " * ind
    return (f"{p}const DEV float4* cb = reinterpret_cast<const DEV float4*>(CB + ((bc * G + g) * KC + l) * KC + {col});\n"
            f"{p}const float4 c0v = cb[0];\n"
            f"{p}const float4 c1v = cb[1];\n"
            f"{p}const float c[8] = {{c0v.x, c0v.y, c0v.z, c0v.w, c1v.x, c1v.y, c1v.z, c1v.w}};\n")


# The factored kernels' data tile: rows k0 + kk of `src` ((b, L, h, p), T) copied as stored into sdx
# [k][p] (raw 16-byte copies), zero past the chunk and past L
def _raw_data_tile(src: str, k0: str, note: str) -> str:
    return f"""\
    for (int idx = tid; idx < 64 * U8; idx += 128) {{   // {note}
      const int kk = idx / U8;
      const int u = 8 * (idx % U8);
      const long t = t0 + {k0} + kk;
      if ({k0} + kk < KC && t < L) {{
        str8(ldr8({src} + ((b * L + t) * H + h) * PC + u), sdx + kk * XP + u);
      }} else {{
        float z[8];
        for (int q = 0; q < 8; ++q) z[q] = 0.0f;
        st8(sdx + kk * XP + u, z);
      }}
    }}
"""


# The factored kernels' rescaling of the accumulator rows wr + (lane >> 2) (+ 8) by f0 (f1), the factors
# `f(row)` of the row index expression, at `ind` spaces of indentation
def _scale_acc_rows(f, ind: int) -> str:
    p = " " * ind
    return (f"{p}const int q8 = static_cast<int>(lane >> 2);\n"
            f"{p}const float f0 = {f('wr + q8')}, f1 = {f('wr + q8 + 8')};\n"
            f"{p}for (int j = 0; j < PC / 16; ++j)\n"
            f"{p}  for (int i = 0; i < 8; ++i) acc[j].c[i] *= ((i >> 1) & 1) ? f1 : f0;\n")


# the mask tile in CB's layout: rows l = l0 + r, columns s = c0 + u .. + 7 (two 16-byte CB loads per item),
# M[l, s] = CB[l, s] exp(acs_l - acs_s) for c0 + u + q <= l < KC, else 0; smk [r][u]
def _tc_mask_rows(l0: str, c0: str) -> str:
    return f"""\
    for (int idx = tid; idx < 64 * 8; idx += 128) {{
      const int r = idx / 8;
      const int u = 8 * (idx % 8);
      const int l = {l0} + r;
      float v[8];
      if ({c0} + u <= l && l < KC) {{            // two 16-byte loads: {c0} + u + 8 <= KC (KC % 16 == 0)
{_cb_row8(c0 + " + u", 8)}        const float al = sacs[l];
        for (int q = 0; q < 8; ++q) v[q] = {c0} + u + q <= l ? c[q] * fexp(al - sacs[{c0} + u + q]) : 0.0f;
      }} else {{
        for (int q = 0; q < 8; ++q) v[q] = 0.0f;
      }}
      st8(smk + r * TP + u, v);
    }}"""


# CHUNK_OUT_TC's diagonal-block products, which CHUNK_OUT_YO_TC runs after its Yo phase: steps of 64 s
# up to the block's last row, the dt x tile and the mask tile M[l, s] = CB[l, s] exp(acs_l - acs_s) in
# shared memory, each warp's products over the 16-blocks of s <= its last row; rows: the data tile
# row-major (CHUNK_OUT_TC_RM, `mma16_f`), else transposed (`mma16t_f`)
def _out_tc_loop(rows: bool) -> str:
    product = ("mma16_f(acc[j], fm, sdx + 16 * kk * XP + 16 * j, XP, lane)" if rows
               else "mma16t_f(acc[j], fm, sdt + 16 * j * TP + 16 * kk, TP, lane)")
    return """\
  const int s_end = r0 + 64 < KC ? r0 + 64 : KC;
  for (int s0 = 0; s0 < s_end; s0 += 64) {
""" + _tc_data_tile("x", "s0", True, rows) + """
""" + _tc_mask_rows("r0", "s0") + """
    BARRIER();
    int nk = wr < KC ? (wr + 16 - s0) / 16 : 0;   // 16-blocks of s <= the warp's last row
    nk = nk < 4 ? nk : 4;
    for (int kk = 0; kk < nk; ++kk) {
      Frag16<T> fm;                           // the warp's mask tile: loaded once for the PC / 16 tiles
      lda16(fm, smk + 16 * w * TP + 16 * kk, TP, lane);
      for (int j = 0; j < PC / 16; ++j) """ + product + """;
    }
    BARRIER();
  }
"""


_OUT_TC_LOOP = _out_tc_loop(False)


# CHUNK_OUT_TC's epilogues: y = acc + exp(acs_l) Yo + D x in float32, rounded once, rows past the
# chunk / past L skipped. _OUT_TC_EPI_ACC: in the accumulator layout (entry pairs: 2-byte loads of Yo
# and x, 4-byte stores of y; per instruction a warp touches half of each 32-byte sector);
# _OUT_TC_EPI_VEC: the same values with 16-byte accesses (switch OUT_TC_VEC_EPILOGUE).
_OUT_TC_EPI_VEC = """\
  const float dh = static_cast<float>(D[h]);
  // 16-byte accesses: per tile j a quad of lanes holds 4 runs of 8 consecutive columns (run m =
  // entries 2m, 2m + 1: row + 8 (m & 1), columns 16 j + 8 (m >> 1) ..), each lane a column pair
  // (pair k = lane & 3) of every run. A 4 x 4 transpose of pairs in the quad (shfl_xor 2, then 1)
  // leaves lane k run k whole: one 16-byte load of Yo and of x, one 16-byte store of y.
  const int k = static_cast<int>(lane & 3u);
  const int hi = k >> 1, lo = k & 1;
  const int l = wr + static_cast<int>(lane >> 2) + 8 * lo;   // run k's row
  const long t = t0 + l;
  const bool live = l < KC && t < L;
  const float el = live ? fexp(sacs[l]) : 0.0f;
  const long e0 = ((b * L + (live ? t : 0)) * H + h) * PC + 8 * hi;   // run k's first column in tile 0
  const DEV T* yo0 = Yo + ((bc * G + g) * KC + (live ? l : 0)) * (R * PC) + (h - g * R) * PC + 8 * hi;
  for (int j = 0; j < PC / 16; ++j) {
    float c[8];
    for (int q = 0; q < 8; ++q) c[q] = acc[j].c[q];
    // stage 1 (lanes k, k ^ 2): keep the pairs of runs 2 hi + e, trade those of the other two runs;
    // u0[e]: pair k of run 2 hi + e, u1[e]: pair k ^ 2 of it
    float u0[4], u1[4];
    for (int e = 0; e < 2; ++e) {
      const float s0 = hi ? c[2 * e] : c[4 + 2 * e];           // runs 2 (1 - hi) + e: to lane k ^ 2
      const float s1 = hi ? c[2 * e + 1] : c[4 + 2 * e + 1];
      u0[2 * e] = hi ? c[4 + 2 * e] : c[2 * e];
      u0[2 * e + 1] = hi ? c[4 + 2 * e + 1] : c[2 * e + 1];
      u1[2 * e] = shfl_xor(s0, 2);
      u1[2 * e + 1] = shfl_xor(s1, 2);
    }
    // stage 2 (lanes k, k ^ 1): keep run 2 hi + lo = k, trade run 2 hi + 1 - lo (pairs k, k ^ 2)
    const float a0 = lo ? u0[0] : u0[2], a1 = lo ? u0[1] : u0[3];
    const float b0 = lo ? u1[0] : u1[2], b1 = lo ? u1[1] : u1[3];
    const float r0x = shfl_xor(a0, 1), r0y = shfl_xor(a1, 1);  // pair k ^ 1 of run k
    const float r1x = shfl_xor(b0, 1), r1y = shfl_xor(b1, 1);  // pair k ^ 3 of run k
    const float k0x = lo ? u0[2] : u0[0], k0y = lo ? u0[3] : u0[1];   // pair k
    const float k1x = lo ? u1[2] : u1[0], k1y = lo ? u1[3] : u1[1];   // pair k ^ 2
    if (live) {
      float v[8];
      for (int q = 0; q < 4; ++q) {         // pair q is pair k ^ (q ^ k)
        const int d = q ^ k;
        v[2 * q] = d == 0 ? k0x : d == 1 ? r0x : d == 2 ? k1x : r1x;
        v[2 * q + 1] = d == 0 ? k0y : d == 1 ? r0y : d == 2 ? k1y : r1y;
      }
      float yo[8], xv[8];
      ld8(yo0 + 16 * j, yo);
      ld8(x + e0 + 16 * j, xv);
      for (int q = 0; q < 8; ++q) v[q] = v[q] + el * yo[q] + dh * xv[q];
      st8(y + e0 + 16 * j, v);
    }
  }
"""
_OUT_TC_EPI_ACC = """\
  const float dh = static_cast<float>(D[h]);
  for (int i = 0; i < 8; i += 2) {            // entries i, i + 1: a column pair of one row
    const int l = wr + acc_row(i, lane);
    const long t = t0 + l;
    if (l < KC && t < L) {
      const float el = fexp(sacs[l]);
      for (int j = 0; j < PC / 16; ++j) {
        const int p = 16 * j + acc_col(i, lane);
        const long e = ((b * L + t) * H + h) * PC + p;
        const long o = ((bc * G + g) * KC + l) * (R * PC) + (h - g * R) * PC + p;
        st2(y + e, acc[j].c[i] + el * static_cast<float>(Yo[o]) + dh * static_cast<float>(x[e]),
            acc[j].c[i + 1] + el * static_cast<float>(Yo[o + 1]) + dh * static_cast<float>(x[e + 1]));
      }
    }
  }
"""


CHUNK_OUT_TC = Kernel(
    name="alloy_ssd_chunk_out_tc",
    inputs=("CB", "acs", "x", "dt", "Yo", "D"),
    outputs=("y",),
    body="""
  // `OUT` with the chunk product as warp tile products (`mma16t`: tensor cores for bf16 / fp16):
  //   y[l] = sum_{s <= l} M[l, s] X_s + exp(acs_l) Yo[l] + D x_l,  M[l, s] = CB[l, s] exp(acs_l - acs_s)
  // with M and X = dt x rounded to T, float32 accumulation, y rounded once. Steps of 64 s up to the
  // block's last row; a warp skips the 16-blocks of s above its rows (and past the chunk). CB rows are
  // read as float4 pairs (CB a whole float32 array: 16-byte aligned, KC % 16 == 0); each warp loads its
  // mask fragment once per 16-block of s for all PC / 16 tiles (lda16 / mma16t_f).
""" + _tc_item("x") + """
""" + _OUT_TC_LOOP + _OUT_TC_EPI_VEC,
)

# CHUNK_OUT_TC with the accumulator-layout epilogue (OUT_TC_VEC_EPILOGUE off, for A/B runs)
CHUNK_OUT_TC_ACC = Kernel(
    name="alloy_ssd_chunk_out_tc_acc",
    inputs=CHUNK_OUT_TC.inputs,
    outputs=CHUNK_OUT_TC.outputs,
    body=CHUNK_OUT_TC.body[:-len(_OUT_TC_EPI_VEC)] + _OUT_TC_EPI_ACC,
)

# CHUNK_OUT_TC with the off-diagonal term computed in the kernel instead of read from a Yo array:
# Yo = C_l H_c is a second warp tile product of the block's rows, taken first into the same
# accumulators, which are then scaled by exp(acs_l) per row in float32 before the mask product adds
# to them. Yo is never rounded (the batched matmul it replaces rounded it to x.dtype before the
# scaling); the operands are those of that matmul: C in x.dtype, the states in x.dtype.
CHUNK_OUT_YO_TC = Kernel(
    name="alloy_ssd_chunk_out_yo_tc",
    inputs=("CB", "acs", "x", "dt", "C", "starts", "D"),
    outputs=("y",),
    body="""
  // `CHUNK_OUT_TC` with Yo = C H (the states entering the chunk) as warp tile products (`mma16t`):
  //   y[l] = exp(acs_l) sum_n C[t0 + l, n] starts[n, p] + sum_{s <= l} M[l, s] X_s + D x_l
  // C (b, L, g, n) in T (rows past L and past the chunk: zero), starts (b, c, g, n, r p) in T; n a
  // multiple of 16. Phase 1, steps of 64 along n: the C rows of the block (raw 16-byte copies) in smk
  // [row][n] and the head's (n, p) slice of starts transposed in sdt [p][n], the tiles of phase 2;
  // a warp whose rows are all past the chunk or past L skips its products. The accumulators, times
  // exp(acs_l) per row (float32), then take phase 2: CHUNK_OUT_TC's steps of 64 along s.
""" + _tc_item("x") + """
  const int N = C_shape[3];
  const long hs = (bc * G + g) * (long)N * (R * PC) + (h - g * R) * PC;   // starts[.., n = 0, p = 0]
  const bool live = wr < KC && t0 + wr < L;
  for (int n0 = 0; n0 < N; n0 += 64) {
    for (int idx = tid; idx < 64 * 8; idx += 128) {   // C: 8 consecutive n of row l (coalesced)
      const int r = idx / 8;
      const int u = 8 * (idx % 8);
      const long t = t0 + r0 + r;
      if (n0 + u < N) {
        if (r0 + r < KC && t < L) {
          str8(ldr8(C + ((b * L + t) * G + g) * N + n0 + u), smk + r * TP + u);
        } else {
          const float z[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
          st8(smk + r * TP + u, z);
        }
      }
    }
    for (int idx = tid; idx < 64 * U8; idx += 128) {  // starts: one 8-element unit of row n, lanes along n
      const int kk = idx % 64;
      const int u = 8 * (idx / 64);
      if (n0 + kk < N) {
        float v[8];
        cvt8(ldr8(starts + hs + (long)(n0 + kk) * (R * PC) + u), v);
        for (int q = 0; q < 8; ++q) sdt[(u + q) * TP + kk] = static_cast<T>(v[q]);
      }
    }
    BARRIER();
    const int nk = (N - n0) / 16 < 4 ? (N - n0) / 16 : 4;
    if (live)
      for (int kk = 0; kk < nk; ++kk) {
        Frag16<T> fc;                         // the warp's C tile: loaded once for the PC / 16 tiles
        lda16(fc, smk + 16 * w * TP + 16 * kk, TP, lane);
        for (int j = 0; j < PC / 16; ++j) mma16t_f(acc[j], fc, sdt + 16 * j * TP + 16 * kk, TP, lane);
      }
    BARRIER();
  }
  for (int i = 0; i < 8; ++i) {               // Yo times exp(acs_l), float32
    const int l = wr + acc_row(i, lane);
    const float el = l < KC ? fexp(sacs[l]) : 0.0f;
    for (int j = 0; j < PC / 16; ++j) acc[j].c[i] *= el;
  }
""" + _OUT_TC_LOOP + """\
  const float dh = static_cast<float>(D[h]);
  for (int i = 0; i < 8; i += 2) {            // entries i, i + 1: a column pair of one row
    const int l = wr + acc_row(i, lane);
    const long t = t0 + l;
    if (l < KC && t < L) {
      for (int j = 0; j < PC / 16; ++j) {
        const long e = ((b * L + t) * H + h) * PC + 16 * j + acc_col(i, lane);
        st2(y + e, acc[j].c[i] + dh * static_cast<float>(x[e]), acc[j].c[i + 1] + dh * static_cast<float>(x[e + 1]));
      }
    }
  }
""",
)


# PASS's chunks per block (loads of a block issued together before its stores and sweep) where VW = 8.
# H100, session 9, toy layer (`python bench/pass_tune.py`, kernel alone, forward / reverse with the
# dot): CBLK 2 124 / 144 us, 4 136 / 156, 8 154 / 167. A double-buffered sweep (the next block's raw
# loads issued before the current block's stores) measured no faster (2: 127 / 163, 4: 133 / 150,
# 8: 129 / 154, same job) and was removed.
PASS_CBLK = 2  # chunks per block where VW = 8 (VW = 1: 8)

PASS = Kernel(
    name="alloy_ssd_state_pass",
    inputs=("states", "decay", "init", "hs"),
    outputs=("starts", "final_state", "dots"),
    body="""
  // Each thread carries VW consecutive elements of the chunk state (one head: P % VW == 0) through
  // the chunks, loading CBLK chunks ahead (VW = 8: 16-byte loads and stores of 16-bit states).
  // REV: the sweep runs from the last chunk to the first, reading and writing chunks in place (the
  // gradient's adjoint pass, without reversed copies). DOT: also sum_p starts * hs per (chunk, n,
  // head, 32-wide slice of p) into dots (P a multiple of 32; 32 / VW lanes hold one slice).
  const int nc = states_shape[1];
  const int H = decay_shape[2];
  const int G = states_shape[2];
  const int N = states_shape[3];
  const int P = init_shape[3];                 // init (b, h, n, p)
  const int R = H / G;
  const long per = (long)G * N * R * P;        // elements of one chunk state, layout (g, n, r, p)
  const long e = ((long)bid_x * nthreads + tid) * VW;
  if (e < states_shape[0] * per) {
    const long b = e / per;
    const long r0 = e % per;
    const int p = r0 % P;
    const int ri = (r0 / P) % R;
    const int n = (r0 / (P * R)) % N;
    const int g = r0 / ((long)P * R * N);
    const int h = g * R + ri;
    const long fi = ((b * H + h) * N + n) * P + p;   // init / final_state (b, h, n, p): VW consecutive
    float s[VW];
    for (int k = 0; k < VW; ++k) s[k] = static_cast<float>(init[fi + k]);
    for (int c0 = 0; c0 < nc; c0 += CBLK) {
      float st[CBLK][VW];
      float hv[CBLK][VW];
      float dc[CBLK];
      for (int u = 0; u < CBLK; ++u) {
        const bool v = c0 + u < nc;
        const long cc = b * nc + (REV ? nc - 1 - (c0 + u) : c0 + u);
        if (v) { LDV(states, cc * per + r0, st[u]); } else { for (int k = 0; k < VW; ++k) st[u][k] = 0.0f; }
        if (DOT && v) { LDV(hs, cc * per + r0, hv[u]); } else { for (int k = 0; k < VW; ++k) hv[u][k] = 0.0f; }
        dc[u] = v ? static_cast<float>(decay[cc * H + h]) : 1.0f;
      }
      for (int u = 0; u < CBLK; ++u) {
        const long cc = b * nc + (REV ? nc - 1 - (c0 + u) : c0 + u);
        if (c0 + u < nc) STV(starts, cc * per + r0, s);
        if (DOT) {
          float d = 0.0f;
          for (int k = 0; k < VW; ++k) d += static_cast<float>(static_cast<T>(s[k])) * hv[u][k];
          for (int m = 1; m < 32 / VW; m *= 2) d += shfl_xor(d, m);
          if (lane % (32 / VW) == 0 && c0 + u < nc) dots[cc * (per / 32) + r0 / 32] = d;
        }
        for (int k = 0; k < VW; ++k) s[k] = dc[u] * s[k] + st[u][k];
      }
    }
    for (int k = 0; k < VW; ++k) final_state[fi + k] = s[k];
  }
""",
    helpers=VEC_IO,
)

# ---------------------------------------------------------------------------------------------
# The gradient of the diagonal blocks, y_l = sum_{s <= l} CB[l, s] E[l, s] X_s with
# E[l, s] = exp(acs_l - acs_s) and X = dt x, for a cotangent dy (per chunk, per head):
#     dX_s   = sum_{l >= s} CB[l, s] E[l, s] dy_l                     kernel `BWD_DX` (`BWD_DX_TC`)
#     EG     = E o (dy X^T),  W = CB o EG                               kernel `BWD_SCORES`
#     dCB    = sum over the group's heads of EG                         (b, c, g, K, K)
#     dacs_l += sum_s W[l, s],  dacs_s -= sum_l W[l, s]                 row / column sums
# without the (b, c, h, K, K) tensors (E, dy X^T, EG, W) that the MLX form writes and reads.

_SCORE_HEADS = 8  # heads per BWD_SCORES group at most (the group's heads split into slices of this many)
_SCORE_PB = 32    # head-dim columns per shared tile load in BWD_SCORES
# BWD_SCORES_TC (dy X^T on tensor cores) instead of BWD_SCORES where the head dim allows (a multiple
# of 16, at most 128 for 16-bit inputs, 64 for float32). H100, toy layer (b 16, T 2048, 24 heads of
# 64, 1 group, chunk 128; bench/ssd_bwd_tune.py): diagonal-block gradient 1.217 ms with TC and 8 heads
# per slice, 1.259 with 4; BWD_SCORES 1.868 ms with 8 heads, 1.993 with 4. Whole toy train step:
# 137.5 ms with TC vs 148.8 / 146.2 without (docs/benchmarks.md, session 7).
SCORES_TC = True
# BWD_SCORES_TC's groups above the diagonal write their tile's zeros (dCB, and the row / column sums of
# their heads) instead of returning, so its three outputs need no zero-fill pass before the launch (MLX's
# init_value; per toy layer 63 MB of fills by the shapes: dCB in 3 head slices 50 MB, the row / column
# sums 6.3 MB each; in the H100 profile 27 of the toy step's 30 `copy_s` launches, 1.4 ms of kernel
# time, nearly all beside other kernels; the fill before the launch sits on the gradient's chain).
# Emulator-tested (bit for bit equal with the fill, outputs poisoned), nvcc 128 registers, no spills.
# H100, session 12, toy step: 68.8 ms on vs 69.4 / 69.9 off (40 pipelined steps, separate runs, same
# job); in one process (bench/train_ab.py, 4 rounds of 20 steps) B - A = -0.32 ms on (per round -0.61 ..
# +0.28); GPU gradient tests passed with it on (docs/benchmarks.md).
SCORES_ZERO_TILES = True
# BWD_DX_TC instead of BWD_DX, CHUNK_OUT_TC instead of OUT (the forward's diagonal blocks), where the
# inputs are bf16 / fp16 and the head dim and chunk are multiples of 16 (head dim at most 128): the
# chunk products on tensor cores, the mask tile rounded to the input dtype (as the Triton kernels).
# H100, session 8 (bench/ssd_bwd_tune.py --tc, b 16, T 2048, 24 heads of 64, bf16, chunk 128 as in
# training): OUT 0.466 -> 0.360 ms, BWD_DX 0.407 -> 0.259 ms; the toy train step (pipelined) 78.2 /
# 78.3 ms on against 80.3 / 80.6 off, same job (docs/benchmarks.md).
DX_TC = True
OUT_TC = True
# CHUNK_OUT_YO_TC instead of the batched matmul Yo = C H (b, c, g, K, r p) and CHUNK_OUT_TC, where
# CHUNK_OUT_TC applies and d_state is a multiple of 16: the off-diagonal term computed inside the
# chunk-output kernel (warp tile products of C and the states entering the chunk), so Yo (100 MB per
# toy layer in bf16: a 72 us GEMM writing it and CHUNK_OUT_TC reading it back) never reaches memory.
# Off: H100, session 9 (toy step, CUPTI): 410 us per layer against 318 + 72 for CHUNK_OUT_TC and the
# GEMM (its Yo phase and the mask phase run one after the other in each group, at 72 registers);
# train step 73.8 ms off vs 74.5 / 74.7 on (pipelined, same job), docs/benchmarks.md.
OUT_FUSED_YO = False
# BWD_DX_FIN_TC (`bwd_dx_finish`) instead of BWD_DX_TC, the batched products C Hs and B dS and
# BWD_FIN in the gradient (`alloy.ops.ssd.ssd_chunked_vjp_gpu`), where BWD_DX_TC applies (DX_TC on),
# the gradient's products take 16-bit operands and d_state is a multiple of 16: dXd (float32, 200 MB
# per toy layer), CH and dXw (100 MB each in bf16) never reach memory.
# Off: H100, session 9 (toy step, CUPTI): 807 us per layer against 253 + 2 x 72 + 330 for BWD_DX_TC,
# the two products and BWD_FIN (three phases in series per group, 128 registers: 4 groups per SM);
# train step 74.1 ms off vs 74.5 / 74.7 on (pipelined, same job), docs/benchmarks.md.
DX_FINISH_FUSED = False
# CHUNK_OUT_TC's epilogue with 16-byte accesses: the accumulators transposed within each quad of
# lanes (shfl_xor) so that a lane owns 8 consecutive columns of a row, then one 16-byte load of Yo
# and of x and one 16-byte store of y per such run, instead of 2-byte loads and 4-byte stores in the
# accumulator layout (a warp touching half of each 32-byte sector). Bit-identical results.
# Off: CHUNK_OUT_TC_ACC, the accumulator-layout epilogue (A/B switch).
OUT_TC_VEC_EPILOGUE = True
# CHUNK_OUT_TC_RM / BWD_DX_TC_RM instead of CHUNK_OUT_TC / BWD_DX_TC (with OUT_TC_VEC_EPILOGUE on for the
# forward): the data tiles row-major in shared memory (whole-sector loads, 16-byte stores, b-operands by
# ldmatrix.trans on CUDA) and BWD_DX's mask tile in CB's layout; bit-identical results. H100, session 11
# (bench/gpu_kernel_profile.py --what ssd, toy layer, same job): OUT 377 -> 310 us, BWD_DX 238 -> 217 us;
# in the train step's profile BWD_DX 232 -> 210 us per layer, OUT unchanged (253 us against 244 in session
# 10's); toy step 70.3 / 70.3 on vs 70.5 / 71.3 off (docs/benchmarks.md).
TC_ROW_TILES = True
# With TC_ROW_TILES (and the gradient's products in the input dtype): the dX kernel also writes the state
# term's cotangent dys = dy exp(acs) (BWD_DX_TC_DYS, from the dy rows it loads anyway) in place of the
# gradient's separate elementwise pass over dy (read 100 MB, write 100 MB per toy layer). Off: H100,
# session 11: kernel sum -52 us per layer, but the dX kernel then runs on the dH -> state-pass chain and
# dys lives longer (+0.27 GB): toy step 70.4 (40 steps) on vs 70.6 / 71.1 / 70.2 off, within noise.
DX_DYS = False
# CHUNK_OUT_TC_RM under launch bounds (128, 8) (64 registers, 8 groups per SM) instead of unbounded
# (CHUNK_OUT_TC_RM_FREE: 80 registers in MLX's build, 6 groups per SM). H100, session 12: CUPTI, one
# toy-shape SSD forward + backward (bench/gpu_kernel_profile.py --what ssd): 0.293 / 0.290 ms vs 0.313;
# toy step in one process (bench/train_ab.py, 6 x 20 steps): +0.29 ms with it off (per round -0.28 ..
# +1.27); tests/metal/test_ssd_tc_rows_gpu.py passed with it on.
OUT_RM_BOUNDS = True
# CHUNK_OUT_TC_FX / BWD_DX_TC_FX (the decay factored below each warp's diagonal block, the rows of later
# steps and the epilogue's Yo pulled into L2 at the start, OUT's D x term from the data tile in shared
# memory: see their comments) instead of CHUNK_OUT_TC_RM / BWD_DX_TC_RM, where the row-tile kernels
# apply (BWD_DX_TC_FX: and DX_DYS off). Not bit-identical to them: the mask entries carry dt and are
# rounded to T once (the RM kernels round M and dt x separately). H100, session 13 (CUPTI, one toy-shape
# SSD forward + backward, `bench/gpu_kernel_profile.py --what ssd`, same job): OUT 0.290 -> 0.246 ms, DX
# 0.210 -> 0.196 ms per layer; toy step in one process (bench/train_ab.py, 6 x 20 steps): -1.06 ms
# median (per round -2.99 .. +1.04). The factoring alone, without the prefetches (first job): 0.289 ->
# 0.285 / 0.212 -> 0.202 ms: the kernels wait on loads more than they issue the mask's arithmetic.
OUT_FACTORED = True
DX_FACTORED = True
# With OUT_FACTORED: CHUNK_OUT_YO_FX, CHUNK_OUT_TC_FX computing the state term Yo = C H itself (raw copies
# of C's rows and the states entering the chunk, two more steps of warp tile products) instead of the
# batched matmul writing Yo (100 MB per toy layer in bf16, 72-76 us on the forward's chain) for it to
# read back. Built after the session's last GPU job, emulator-tested, off until measured on a GPU
# (OUT_FUSED_YO, the same idea on CHUNK_OUT_TC, measured slower in session 9).
OUT_FX_YO = False
# With DX_FACTORED: BWD_DX_TC_FX writes the diagonal blocks' dX in x's dtype instead of float32 (half the
# bytes written by it and read back by BWD_FIN, 100 MB each per toy layer in bf16); dX is rounded once
# more before BWD_FIN adds the state term (the gradient dx leaves in x's dtype either way). Built after
# the session's last GPU job, emulator-tested, off until measured on a GPU.
DX_HALF_OUT = False
# BWD_SCORES_TC pulls the next head's dy / x rows into L2 (`prefetch_l2`) while it issues the current
# head's register loads (template PF); off: no prefetch (A/B switch). Same results either way. H100,
# session 13: CUPTI (toy-shape SSD, same job) 0.276 -> 0.270 ms per layer; toy step in one process
# (bench/train_ab.py, 6 x 20 steps) +0.09 ms median with it off, every round positive (+0.03 .. +0.55).
SCORES_PREFETCH = True
# CB = C B^T of each chunk (forward and, where the forward's is not handed over, the gradient) by
# `alloy.metal.ssd_cb.CB_TC` (`chunk_cb`: warp tile products of 16-bit B / C read in place, float32
# accumulation; tiles above the diagonal written as zeros) instead of casting chunked transposed copies
# of B and C to float32 for a float32 batched matmul (H100 profile, toy step: two cast copies of 15 + 12
# us and a TF32 GEMM of 30-38 us per layer). The same products (exact in float32), summed in another
# order. H100, session 12 (bench/ssd_cb_tune.py, toy shape): 35.5 us against 69.0 for the casts + matmul,
# max |difference| 1.9e-7; toy step in one process (bench/train_ab.py, 4 rounds of 20 steps): B - A =
# +0.17 ms with it off (per round -0.34 .. +0.61), i.e. within the noise of a ~0.3 ms saving.
CB_TC = True


def _tc_fits(dtype, P: int, K: int) -> bool:
    """Whether CHUNK_OUT_TC / BWD_DX_TC take these inputs (16-bit, head dim and chunk multiples of 16)."""
    return dtype in (mx.bfloat16, mx.float16) and P % 16 == 0 and P <= 128 and K % 16 == 0


BWD_SCORES = Kernel(
    name="alloy_ssd_bwd_scores",
    inputs=("CB", "acs", "x", "dt", "dy"),
    outputs=("dCB", "rsum", "csum"),
    helpers=_FMA4,
    body="""
  // one group of 256 threads per (64 x 64 tile (ti, tj) of a chunk's K x K scores, slice of RS of
  // group g's heads, batch * chunk), looping over the slice's heads. Thread (ty, tx) = (tid / 16,
  // tid % 16) owns rows l0 + 4 ty + {0..3} and columns s0 + 4 tx + {0..3}.
  // Outputs (pre-zeroed): dCB (NS, b, c, g, K, K) [k] = sum over slice k's heads of E o (dy X^T);
  // rsum (b, c, h, NT, K) [.., tj, l] = sum over the tile's columns of W[l, s]; csum [.., ti, s] =
  // sum over its rows.
  const int L = x_shape[1];
  const int H = x_shape[2];
  const int P = x_shape[3];
  const int G = CB_shape[2];
  const int R = H / G;
  const int nc = CB_shape[1];
  const long nbc = CB_shape[0] * nc;
  const int NT = (KC + 63) / 64;
  const int ti = bid_x / NT;
  const int tj = bid_x % NT;
  if (tj > ti) return;                        // above the diagonal: every score is masked
  const int NS = R / RS;                      // head slices per group
  const int g = bid_y / NS;
  const int ks = bid_y % NS;
  const long bc = bid_z;
  const long b = bc / nc;
  const long t0 = (bc % nc) * KC;
  const int l0 = ti * 64 + 4 * (tid / 16);   // this thread's first row
  const int c0 = tj * 64 + 4 * (tid % 16);   // and first column
  const int tx = tid % 16;
  const int ty = tid / 16;
  SHARED float4 Dq[PB][17];                   // dy rows: Dq[p][rq] = dy[ti * 64 + 4 rq + {0..3}][p]
  SHARED float4 Xq[PB][17];                   // X columns: Xq[p][cq] = X[tj * 64 + 4 cq + {0..3}][p]
  SHARED float csh[16][64];
  float cb[4][4];
  float dcb[4][4];
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 4; ++j) {
      cb[i][j] = (l0 + i < KC && c0 + j < KC) ? CB[((bc * G + g) * KC + l0 + i) * KC + c0 + j] : 0.0f;
      dcb[i][j] = 0.0f;
    }
  }
  for (int hr = 0; hr < RS; ++hr) {
    const int h = g * R + ks * RS + hr;
    float al[4];
    float ac[4];
    for (int i = 0; i < 4; ++i) {
      al[i] = l0 + i < KC ? acs[(bc * H + h) * KC + l0 + i] : 0.0f;
      ac[i] = c0 + i < KC ? acs[(bc * H + h) * KC + c0 + i] : 0.0f;
    }
    float acc[4][4];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
    for (int p0 = 0; p0 < P; p0 += PB) {
      for (int idx = tid; idx < PB * 16; idx += 256) {   // along p: coalesced reads of dy and x rows
        const int p = idx % PB;
        const int q4 = idx / PB;
        const bool okp = p0 + p < P;
        float dv[4];
        float xv[4];
        for (int q = 0; q < 4; ++q) {
          const int l = ti * 64 + 4 * q4 + q;
          const int s = tj * 64 + 4 * q4 + q;
          const long tl = t0 + l;
          const long ts = t0 + s;
          dv[q] = (okp && l < KC && tl < L) ? static_cast<float>(dy[((b * L + tl) * H + h) * P + p0 + p]) : 0.0f;
          const long xi = ((b * L + ts) * H + h) * P + p0 + p;
          xv[q] = (okp && s < KC && ts < L)
              ? static_cast<float>(dt[(b * L + ts) * H + h]) * static_cast<float>(x[xi]) : 0.0f;
        }
        Dq[p][q4] = f4(dv[0], dv[1], dv[2], dv[3]);
        Xq[p][q4] = f4(xv[0], xv[1], xv[2], xv[3]);
      }
      BARRIER();
      for (int p = 0; p < PB; ++p) {
        const float4 d = Dq[p][ty];
        const float4 xv = Xq[p][tx];
        FMA4(acc[0], 0, d.x, xv)
        FMA4(acc[1], 0, d.y, xv)
        FMA4(acc[2], 0, d.z, xv)
        FMA4(acc[3], 0, d.w, xv)
      }
      BARRIER();
    }
    float rs[4];
    float cs[4];
    for (int j = 0; j < 4; ++j) cs[j] = 0.0f;
    for (int i = 0; i < 4; ++i) {
      rs[i] = 0.0f;
      for (int j = 0; j < 4; ++j) {
        const float e = (c0 + j <= l0 + i && l0 + i < KC) ? fexp(al[i] - ac[j]) : 0.0f;
        const float eg = e * acc[i][j];
        const float w = cb[i][j] * eg;
        dcb[i][j] += eg;
        rs[i] += w;
        cs[j] += w;
      }
    }
    for (int i = 0; i < 4; ++i) {             // row sums over the 16 threads of a row (lanes tx)
      float v = rs[i];
      v += shfl_xor(v, 1);
      v += shfl_xor(v, 2);
      v += shfl_xor(v, 4);
      v += shfl_xor(v, 8);
      if (tx == 0 && l0 + i < KC) rsum[((bc * H + h) * NT + tj) * KC + l0 + i] = v;
    }
    for (int j = 0; j < 4; ++j) csh[ty][4 * tx + j] = cs[j];
    BARRIER();
    if (tid < 64 && tj * 64 + tid < KC) {     // column sums over the 16 row groups
      float v = 0.0f;
      for (int y = 0; y < 16; ++y) v += csh[y][tid];
      csum[((bc * H + h) * NT + ti) * KC + tj * 64 + tid] = v;
    }
    BARRIER();
  }
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j)
      if (l0 + i < KC && c0 + j < KC) dCB[(((ks * nbc + bc) * G + g) * KC + l0 + i) * KC + c0 + j] = dcb[i][j];
""",
)

BWD_SCORES_TC = Kernel(
    name="alloy_ssd_bwd_scores_tc",
    inputs=("CB", "acs", "x", "dt", "dy"),
    outputs=("dCB", "rsum", "csum"),
    launch_bounds=(256, 2),  # two groups per SM (<= 128 registers; 138 uncapped with the prefetch)
    body="""
  // `BWD_SCORES` with dy X^T as warp tile products (`mma16t`: tensor cores for bf16 / fp16, X = dt x
  // rounded to T as the operand). One group of 8 warps per (64 x 64 tile (ti, tj), slice of RS of
  // group g's heads, batch * chunk); warp w owns the 16 x 32 strip of rows 16 (w / 2) and columns
  // 32 (w % 2) of the tile: two accumulator tiles. Same outputs as BWD_SCORES.
  const int L = x_shape[1];
  const int H = x_shape[2];
  const int G = CB_shape[2];
  const int R = H / G;
  const int nc = CB_shape[1];
  const long nbc = CB_shape[0] * nc;
  const int NT = (KC + 63) / 64;
  const int ti = bid_x / NT;
  const int tj = bid_x % NT;
  const int NS = R / RS;
  const int g = bid_y / NS;
  const int ks = bid_y % NS;
  const long bc = bid_z;
  const long b = bc / nc;
  const long t0 = (bc % nc) * KC;
  const int l0 = ti * 64;
  const int s0 = tj * 64;
  if (tj > ti) {                              // above the diagonal: every score is masked
    if (ZT) {                                 // the tile's zeros (the outputs get no zero-fill pass)
      for (int idx = static_cast<int>(tid); idx < 64 * 64; idx += 256) {
        const int l = l0 + idx / 64;
        const int s = s0 + idx % 64;
        if (l < KC && s < KC) dCB[(((ks * nbc + bc) * G + g) * KC + l) * KC + s] = 0.0f;
      }
      for (int idx = static_cast<int>(tid); idx < RS * 64; idx += 256) {
        const int hz = g * R + ks * RS + idx / 64;
        const int q = idx % 64;
        if (l0 + q < KC) rsum[((bc * H + hz) * NT + tj) * KC + l0 + q] = 0.0f;
        if (s0 + q < KC) csum[((bc * H + hz) * NT + ti) * KC + s0 + q] = 0.0f;
      }
    }
    return;
  }
  constexpr int PP = PC + 8;                 // padded rows: conflict-free fragment loads
  constexpr int U8 = PC / 8;                 // 8-element units per row
  ALIGN16 SHARED T sdy[64 * PP];             // dy rows l0 ..
  ALIGN16 SHARED T sxx[64 * PP];             // X = dt x rows s0 ..
  SHARED float sal[64];
  SHARED float sac[64];
  SHARED float rsp[2][64];                   // row sums of the two column halves
  SHARED float csp[4][64];                   // column sums of the four row tiles
  const int rt = static_cast<int>(warp) / 2;
  const int ct0 = 2 * (static_cast<int>(warp) % 2);
  float cbf[2][8];
  float dcb[2][8];
  for (int t = 0; t < 2; ++t) {
    for (int i = 0; i < 8; ++i) {
      const int l = l0 + 16 * rt + acc_row(i, lane);
      const int s = s0 + 16 * (ct0 + t) + acc_col(i, lane);
      cbf[t][i] = (l < KC && s < KC) ? CB[((bc * G + g) * KC + l) * KC + s] : 0.0f;
      dcb[t][i] = 0.0f;
    }
  }
  // the tiles of head it are loaded into registers (raw bits, `ldr8`) during iteration it, while head
  // it - 1 (stored to shared memory first) is computed: each load has a head's work to arrive
  constexpr int NU = (64 * U8 + 255) / 256;  // 8-element units per thread and head
  Raw8<T> pdy[NU];
  Raw8<T> pxx[NU];
  float pdt[NU];
  unsigned int pok = 0u;                     // bit 2v: unit v's dy row is real; bit 2v + 1: its x row
  float pal = 0.0f;
  float pac = 0.0f;
  for (int it = 0; it <= RS; ++it) {
    if (it > 0) {                              // head it - 1: registers -> shared tiles
      for (int v = 0; v < NU; ++v) {
        const int idx = static_cast<int>(tid) + 256 * v;
        if (idx < 64 * U8) {
          const int r = idx / U8;
          const int u = 8 * (idx % U8);
          float dv[8];
          float xv[8];
          cvt8(pdy[v], dv);
          cvt8(pxx[v], xv);
          const bool okl = (pok >> (2 * v)) & 1u;
          const bool oks = (pok >> (2 * v + 1)) & 1u;
          for (int q = 0; q < 8; ++q) {
            dv[q] = okl ? dv[q] : 0.0f;
            xv[q] = oks ? xv[q] * pdt[v] : 0.0f;
          }
          st8(sdy + r * PP + u, dv);
          st8(sxx + r * PP + u, xv);
        }
      }
      if (tid < 64) {
        sal[tid] = pal;
        sac[tid] = pac;
      }
    }
    if (it < RS) {                             // head it: issue the loads
      const int hn = g * R + ks * RS + it;
      pok = 0u;
      for (int v = 0; v < NU; ++v) {
        const int idx = static_cast<int>(tid) + 256 * v;
        const int r = idx / U8;
        const int u = 8 * (idx % U8);
        const long tl = t0 + l0 + r;
        const long ts = t0 + s0 + r;
        const bool okl = idx < 64 * U8 && l0 + r < KC && tl < L;
        const bool oks = idx < 64 * U8 && s0 + r < KC && ts < L;
        pdy[v] = ldr8(dy + ((b * L + (okl ? tl : 0)) * H + hn) * PC + (okl ? u : 0));
        pxx[v] = ldr8(x + ((b * L + (oks ? ts : 0)) * H + hn) * PC + (oks ? u : 0));
        pok |= (okl ? 1u : 0u) << (2 * v);
        pok |= (oks ? 1u : 0u) << (2 * v + 1);
        pdt[v] = oks ? static_cast<float>(dt[(b * L + ts) * H + hn]) : 0.0f;
      }
      if (PF && it + 1 < RS && tid < 128) {   // head it + 1's dy / x rows to L2, a head ahead of their loads
        const int r0f = (tid < 64 ? l0 : s0) + static_cast<int>(tid & 63u);
        if (r0f < KC && t0 + r0f < L) prefetch_l2((tid < 64 ? dy : x) + ((b * L + t0 + r0f) * H + hn + 1) * PC);
      }
      if (tid < 64) {
        pal = l0 + static_cast<int>(tid) < KC ? acs[(bc * H + hn) * KC + l0 + tid] : 0.0f;
        pac = s0 + static_cast<int>(tid) < KC ? acs[(bc * H + hn) * KC + s0 + tid] : 0.0f;
      }
    }
    if (it == 0) continue;
    const int h = g * R + ks * RS + it - 1;
    BARRIER();
    Acc16 acc[2];
    acc_zero(acc[0]);
    acc_zero(acc[1]);
    for (int k0 = 0; k0 < PC; k0 += 16) {
      Frag16<T> fy;                            // the dy tile: loaded once for both accumulator tiles
      lda16(fy, sdy + 16 * rt * PP + k0, PP, lane);
      mma16t_f(acc[0], fy, sxx + 16 * ct0 * PP + k0, PP, lane);
      mma16t_f(acc[1], fy, sxx + 16 * (ct0 + 1) * PP + k0, PP, lane);
    }
    float rs[2] = {0.0f, 0.0f};                // this lane's two rows
    float cs[2][4];                            // its four columns in each accumulator tile
    for (int t = 0; t < 2; ++t) {
      for (int q = 0; q < 4; ++q) cs[t][q] = 0.0f;
      for (int i = 0; i < 8; ++i) {
        const int row = 16 * rt + acc_row(i, lane);
        const int col = 16 * (ct0 + t) + acc_col(i, lane);
        const bool on = s0 + col <= l0 + row && l0 + row < KC;
        const float eg = on ? fexp(sal[row] - sac[col]) * acc[t].c[i] : 0.0f;
        const float w = cbf[t][i] * eg;
        dcb[t][i] += eg;
        rs[(i >> 1) & 1] += w;
        cs[t][2 * (i >> 2) + (i & 1)] += w;
      }
    }
    for (int a = 0; a < 2; ++a) {              // lanes of one row: lane & 3
      rs[a] += shfl_xor(rs[a], 1);
      rs[a] += shfl_xor(rs[a], 2);
    }
    for (int t = 0; t < 2; ++t) {              // lanes of one column: lane >> 2
      for (int q = 0; q < 4; ++q) {
        cs[t][q] += shfl_xor(cs[t][q], 4);
        cs[t][q] += shfl_xor(cs[t][q], 8);
        cs[t][q] += shfl_xor(cs[t][q], 16);
      }
    }
    if ((lane & 3u) == 0u) {
      rsp[warp % 2][16 * rt + static_cast<int>(lane >> 2)] = rs[0];
      rsp[warp % 2][16 * rt + static_cast<int>(lane >> 2) + 8] = rs[1];
    }
    if (lane < 4u) {
      for (int t = 0; t < 2; ++t)
        for (int q = 0; q < 4; ++q)
          csp[rt][16 * (ct0 + t) + 8 * (q >> 1) + 2 * static_cast<int>(lane) + (q & 1)] = cs[t][q];
    }
    BARRIER();
    if (tid < 64 && l0 + static_cast<int>(tid) < KC)
      rsum[((bc * H + h) * NT + tj) * KC + l0 + tid] = rsp[0][tid] + rsp[1][tid];
    if (tid >= 64 && tid < 128 && s0 + static_cast<int>(tid) - 64 < KC)
      csum[((bc * H + h) * NT + ti) * KC + s0 + tid - 64] =
          csp[0][tid - 64] + csp[1][tid - 64] + csp[2][tid - 64] + csp[3][tid - 64];
    BARRIER();
  }
  for (int t = 0; t < 2; ++t) {
    for (int i = 0; i < 8; ++i) {
      const int l = l0 + 16 * rt + acc_row(i, lane);
      const int s = s0 + 16 * (ct0 + t) + acc_col(i, lane);
      if (l < KC && s < KC) dCB[(((ks * nbc + bc) * G + g) * KC + l) * KC + s] = dcb[t][i];
    }
  }
""",
)

BWD_DX = Kernel(
    name="alloy_ssd_bwd_dx",
    inputs=("CB", "acs", "dy"),
    outputs=("dX",),
    helpers=_FMA4,
    body="""
  // one group of 128 threads per (block of 64 rows s, head, batch * chunk):
  //   dX[s] = sum_{l >= s} CB[l, s] exp(acs_l - acs_s) dy_l      (float32, (b, c K, h, p))
  // thread (ty, tx) owns rows r0 + 4 ty + {0..3}, r0 + 32 + 4 ty + {0..3} and columns 64 j + 4 tx
  // + {0..3} (j < CG), as in OUT with the roles of l and s exchanged
""" + _rows_item("dy", """\
  SHARED float4 Ys[SB][16 * CG];              // dy_l, 4 columns per entry
  SHARED float4 Ms[SB][17];                   // Ms[l][rq]: rows s = r0 + 4 rq + {0..3}""") + """
  for (int l0 = r0; l0 < KC; l0 += SB) {      // causal: l >= s >= r0
    for (int idx = tid; idx < SB * 16 * CG; idx += 128) {
      const int li = idx / (16 * CG);
      const int p = 4 * (idx % (16 * CG));
      const long t = t0 + l0 + li;
      const bool ok = l0 + li < KC && t < L;
      float v[4];
      for (int q = 0; q < 4; ++q)
        v[q] = (ok && p + q < PC) ? static_cast<float>(dy[((b * L + t) * H + h) * PC + p + q]) : 0.0f;
      Ys[li][idx % (16 * CG)] = f4(v[0], v[1], v[2], v[3]);
    }
    for (int idx = tid; idx < SB * 16; idx += 128) {   // along s: coalesced reads of CB rows
      const int rq = idx % 16;
      const int li = idx / 16;
      const int l = l0 + li;
      float v[4];
      for (int q = 0; q < 4; ++q) {
        const int s = r0 + 4 * rq + q;
        v[q] = (s <= l && l < KC)
            ? static_cast<float>(CB[((bc * G + g) * KC + l) * KC + s]) * fexp(sacs[l] - sacs[s])
            : 0.0f;
      }
      Ms[li][rq] = f4(v[0], v[1], v[2], v[3]);
    }
    BARRIER();
    for (int li = 0; li < SB; ++li) ROWS8_STEP(Ms, Ys, li)
    BARRIER();
  }
  for (int i = 0; i < 8; ++i) {
    const int s = r0 + (i < 4 ? 4 * ty + i : 32 + 4 * ty + i - 4);
    if (s < KC) {
      for (int j = 0; j < 4 * CG; ++j) {
        const int p = 64 * (j / 4) + 4 * tx + j % 4;
        if (p < PC) dX[((b * nc * KC + t0 + s) * H + h) * PC + p] = acc[i][j];
      }
    }
  }
""",
)


# BWD_DX_TC's (and the row-tile kernels') product loop: steps of 64 along l from r0, the dy tile and the
# mask tile M^T[s, l] in shared memory; rows: the dy tile row-major and the mask in CB's layout
# (`_tc_mask_rows`, the warp's a-operand by lda16t; with dys the dy rows' dys written too), else the dy
# tile transposed and the mask built [s][l] from column-wise CB loads (lanes along s)
def _dx_tc_loop(rows: bool, dys: bool = False) -> str:
    if rows:
        tile, mask = _tc_data_tile("dy", "l0", False, True, dys), _tc_mask_rows("l0", "r0")
        frag = "lda16t(fm, smk + 16 * kk * TP + 16 * w, TP, lane);"
        product = "mma16_f(acc[j], fm, sdx + 16 * kk * XP + 16 * j, XP, lane)"
    else:
        tile = _tc_data_tile("dy", "l0", False)
        mask = """\
    for (int idx = tid; idx < 64 * 8; idx += 128) {   // mask: 8 consecutive l of row s, lanes along s
      const int r = idx % 64;
      const int u = 8 * (idx / 64);
      const int s = r0 + r;
      float v[8];
      for (int q = 0; q < 8; ++q) {
        const int l = l0 + u + q;
        v[q] = (s <= l && l < KC) ? CB[((bc * G + g) * KC + l) * KC + s] * fexp(sacs[l] - sacs[s]) : 0.0f;
      }
      st8(smk + r * TP + u, v);
    }"""
        frag = "lda16(fm, smk + 16 * w * TP + 16 * kk, TP, lane);"
        product = "mma16t_f(acc[j], fm, sdt + 16 * j * TP + 16 * kk, TP, lane)"
    return """\
  for (int l0 = r0; l0 < KC; l0 += 64) {
""" + tile + """
""" + mask + """
    BARRIER();
    const int k_lo = wr > l0 ? (wr - l0) / 16 : 0;           // 16-blocks of l >= the warp's first row
    const int k_end = (KC - l0) / 16 < 4 ? (KC - l0) / 16 : 4;
    if (wr < KC)
      for (int kk = k_lo; kk < k_end; ++kk) {
        Frag16<T> fm;                         // the warp's mask tile: loaded once for the PC / 16 tiles
        """ + frag + """
        for (int j = 0; j < PC / 16; ++j) """ + product + """;
      }
    BARRIER();
  }
"""


# BWD_DX_TC's epilogue: dX float32, a column pair per 8-byte store
_DX_TC_EPI = """\
  for (int i = 0; i < 8; i += 2) {             // a column pair as one 8-byte store (dX float32, even column)
    const int s = wr + acc_row(i, lane);
    if (s < KC)
      for (int j = 0; j < PC / 16; ++j) {
        float2 v;
        v.x = acc[j].c[i];
        v.y = acc[j].c[i + 1];
        *reinterpret_cast<DEV float2*>(dX + ((b * nc * KC + t0 + s) * H + h) * PC + 16 * j + acc_col(i, lane)) = v;
      }
  }
"""


# BWD_DX_TC_FX's epilogue: dX float32 as above, or in a 16-bit dtype (DX_HALF_OUT) a column pair per
# 4-byte store
_DX_TC_EPI_ANY = """\
  for (int i = 0; i < 8; i += 2) {
    const int s = wr + acc_row(i, lane);
    if (s < KC)
      for (int j = 0; j < PC / 16; ++j) {
        const long o = ((b * nc * KC + t0 + s) * H + h) * PC + 16 * j + acc_col(i, lane);
        if (sizeof(dX[0]) == 4) {
          float2 v;
          v.x = acc[j].c[i];
          v.y = acc[j].c[i + 1];
          *reinterpret_cast<DEV float2*>(dX + o) = v;
        } else {
          st2(dX + o, acc[j].c[i], acc[j].c[i + 1]);
        }
      }
  }
"""


BWD_DX_TC = Kernel(
    name="alloy_ssd_bwd_dx_tc",
    inputs=("CB", "acs", "dy"),
    outputs=("dX",),
    body="""
  // `BWD_DX` as warp tile products (`mma16t`: tensor cores for bf16 / fp16), the roles of l and s
  // exchanged from CHUNK_OUT_TC: output rows s, reduction over l >= s in steps of 64 from r0,
  //   dX[s] = sum_{l >= s} M^T[s, l] dy_l,  M^T[s, l] = CB[l, s] exp(acs_l - acs_s)
  // with M^T rounded to T (dy is T already), float32 accumulation and output; a warp skips the
  // 16-blocks of l below its rows (and past the chunk), and loads its mask fragment once per 16-block
  // of l for all PC / 16 tiles (lda16 / mma16t_f).
""" + _tc_item("dy") + "\n" + _dx_tc_loop(False) + _DX_TC_EPI,
)


CHUNK_OUT_TC_RM = Kernel(
    name="alloy_ssd_chunk_out_tc_rm",
    inputs=CHUNK_OUT_TC.inputs,
    outputs=CHUNK_OUT_TC.outputs,
    body="""
  // CHUNK_OUT_TC with the dt x tile row-major (sdx [s][p], ldmatrix.trans b-operands: mma16_f)
""" + _tc_item("x", rows=True) + """
""" + _out_tc_loop(True) + _OUT_TC_EPI_VEC,
    launch_bounds=(128, 8),
)
# CHUNK_OUT_TC_RM without launch bounds (switch OUT_RM_BOUNDS off). Nsight Compute, session 12 (toy
# SSD, docs/kernels.md): 80 registers -> 6 groups per SM (37.5% occupancy), issue-bound on integer work
# with L1TEX stalls (0.97 eligible warps per scheduler); under (128, 8): 64 registers, no spills (nvcc
# sm_90, KC 128 / PC 64), 8 groups per SM (18.9 KB of shared memory each).
CHUNK_OUT_TC_RM_FREE = dataclasses.replace(CHUNK_OUT_TC_RM, name="alloy_ssd_chunk_out_tc_rm_free", launch_bounds=())

# CHUNK_OUT_TC_RM with the decay factored (switch OUT_FACTORED): below a warp's diagonal 16-block, with
# m = the warp's first row wr (s < m <= l), M[l, s] X_s = CB[l, s] dt_s exp(acs_l - acs_s) x_s is
#   exp(acs_l - acs_m) * (CB[l, s] f_s) x_s,   f_s = dt_s exp(acs_m - acs_s),
# so the warp's mask rows there are CB times one column factor per s (64 exps per warp and step, not
# one exp, compare and select per element), the accumulator rows are scaled by exp(acs_l - acs_m) once,
# before the diagonal block (the warp's last), whose 16 x 16 entries are computed exactly; dt rides in
# the mask (x is the data tile as stored: raw 16-byte copies, no conversion or product), and each warp
# builds only the 16 mask rows it reads. acs is non-increasing along the chunk (dt >= 0, A < 0), so
# both factors lie in [0, 1]: neither overflows, and one that underflows bounds an entry that does
# (the two kernels agree to the rounding of M to T; tests/metal/test_ssd_out_factored.py).
def _out_fx_body(yo: bool) -> str:
    """CHUNK_OUT_TC_FX's body; yo: Yo = C H computed in the kernel (CHUNK_OUT_YO_FX) before the steps
    along s, from the C rows of the block and the head's (n, p) slice of the states entering the chunk,
    both raw 16-byte copies into the two tiles (C rows [l][n] as the a-operand, the states row-major
    [n][p] as the b-operand), the sum times exp(acs_m) so that the rows' scaling before the diagonal
    block makes it exp(acs_l) C H (acs <= 0 inside a chunk: no overflow); the epilogue then reads no Yo."""
    head = """
  // CHUNK_OUT_TC_RM with the decay factored below each warp's diagonal block (see OUT_FACTORED)""" + (
        """, and Yo = C H
  // computed in the kernel (CHUNK_OUT_YO_FX)""" if yo else "") + """
""" + _tc_item("x", rows=True) + """
  SHARED float sdv[KC];                       // the head's dt over the chunk (zero past L)
  SHARED float scol[4 * 64];                  // per warp: the step's column factors f_s
  for (int s = tid; s < KC; s += 128) sdv[s] = t0 + s < L ? static_cast<float>(dt[(b * L + t0 + s) * H + h]) : 0.0f;
  const int s_end = r0 + 64 < KC ? r0 + 64 : KC;
""" + ("""  for (int r = tid; r < s_end; r += 128)     // the x rows of the steps, to L2 while Yo's products run
    if (r < KC && t0 + r < L) prefetch_l2(x + ((b * L + t0 + r) * H + h) * PC);
""" if yo else """  for (int r = tid; r < s_end + 64; r += 128) {   // to L2 while the products run: x rows 0 .. s_end - 1,
    const int l = r < s_end ? r : r0 + r - s_end;   // then the epilogue's Yo rows r0 ..
    if (l < KC && t0 + l < L)
      prefetch_l2(r < s_end ? x + ((b * L + t0 + l) * H + h) * PC
                            : Yo + ((bc * G + g) * KC + l) * (R * PC) + (h - g * R) * PC);
  }
""") + """  BARRIER();
  const float am = wr < KC ? sacs[wr] : 0.0f;
  const int cw = 64 * w;                      // the warp's column factors: scol[cw ..]
""" + (_OUT_FX_YO if yo else "") + """""" + _OUT_FX_LOOP + (_OUT_TC_EPI_VEC_NOYO if yo else _OUT_TC_EPI_VEC).replace(
        "ld8(x + e0 + 16 * j, xv);", "ld8(sdx + (l - r0) * XP + 8 * hi + 16 * j, xv);   // the last tile: rows r0 ..")
    return head


# CHUNK_OUT_YO_FX's Yo phase: steps of 64 along n (N a multiple of 16), C rows r0 .. in smk [row][n],
# the states' rows n in sdx [n][p]; a warp whose rows are all past the chunk or past L skips its products
_OUT_FX_YO = """\
  {                                           // (its indices live only here)
  const int N = C_shape[3];
  const long hs = (bc * G + g) * (long)N * (R * PC) + (h - g * R) * PC;   // starts[.., n = 0, p = 0]
  const bool yo_live = wr < KC && t0 + wr < L;
  for (int n0 = 0; n0 < N; n0 += 64) {
    for (int idx = tid; idx < 64 * 8; idx += 128) {   // C: 8 consecutive n of row r0 + r
      const int r = idx / 8;
      const int u = 8 * (idx % 8);
      const long t = t0 + r0 + r;
      if (n0 + u < N) {
        if (r0 + r < KC && t < L) {
          str8(ldr8(C + ((b * L + t) * G + g) * N + n0 + u), smk + r * TP + u);
        } else {
          float z[8];
          for (int q = 0; q < 8; ++q) z[q] = 0.0f;
          st8(smk + r * TP + u, z);
        }
      }
    }
    for (int idx = tid; idx < 64 * U8; idx += 128) {  // the states: row n0 + kk, 8 consecutive p
      const int kk = idx / U8;
      const int u = 8 * (idx % U8);
      if (n0 + kk < N) str8(ldr8(starts + hs + (long)(n0 + kk) * (R * PC) + u), sdx + kk * XP + u);
    }
    BARRIER();
    const int nk = (N - n0) / 16 < 4 ? (N - n0) / 16 : 4;
    if (yo_live)
      for (int kk = 0; kk < nk; ++kk) {
        Frag16<T> fc;
        lda16(fc, smk + 16 * w * TP + 16 * kk, TP, lane);
        for (int j = 0; j < PC / 16; ++j) mma16_f(acc[j], fc, sdx + 16 * kk * XP + 16 * j, XP, lane);
      }
    BARRIER();
  }
  const float em = fexp(am);                  // exp(acs_m): the rows' scaling makes it exp(acs_l)
  for (int j = 0; j < PC / 16; ++j)
    for (int i = 0; i < 8; ++i) acc[j].c[i] *= em;
  }
"""

_OUT_FX_LOOP = """  for (int s0 = 0; s0 < s_end; s0 += 64) {
""" + _raw_data_tile("x", "s0", "the data tile: x rows s0 .., as stored") + """    int nk = wr < KC ? (wr + 16 - s0) / 16 : 0;   // 16-blocks of s <= the warp's last row
    nk = nk < 4 ? nk : 4;
    for (int k = static_cast<int>(lane); k < 64; k += 32) {
      const int s = s0 + k;
      scol[cw + k] = s < wr ? sdv[s] * fexp(am - sacs[s]) : 0.0f;
    }
    warp_sync();
    for (int it = static_cast<int>(lane); it < 16 * 8; it += 32) {   // the warp's mask rows wr + r
      const int r = it / 8;
      const int u = 8 * (it % 8);
      if (u / 16 >= nk) continue;
      const int l = wr + r;
""" + _cb_row8("s0 + u", 6) + """      float v[8];
      if (s0 + u + 8 <= wr) {                 // below the diagonal block: CB f_s
        for (int q = 0; q < 8; ++q) v[q] = c[q] * scol[cw + u + q];
      } else {                                // the diagonal block: exact, zero above the diagonal
        const float al = sacs[l];
        for (int q = 0; q < 8; ++q) {
          const int s = s0 + u + q;
          v[q] = s <= l ? c[q] * sdv[s] * fexp(al - sacs[s]) : 0.0f;
        }
      }
      st8(smk + (16 * w + r) * TP + u, v);
    }
    BARRIER();
    for (int kk = 0; kk < nk; ++kk) {
      if (s0 + 16 * kk == wr) {               // the diagonal block, last: the rows so far times exp(acs_l - acs_m)
""" + _scale_acc_rows(lambda r: f"fexp(sacs[{r}] - am)", 8) + """      }
      Frag16<T> fm;
      lda16(fm, smk + 16 * w * TP + 16 * kk, TP, lane);
      for (int j = 0; j < PC / 16; ++j) mma16_f(acc[j], fm, sdx + 16 * kk * XP + 16 * j, XP, lane);
    }
    BARRIER();
  }
"""

# CHUNK_OUT_TC's 16-byte epilogue without the Yo term (Yo already in the accumulators)
_OUT_TC_EPI_VEC_NOYO = (_OUT_TC_EPI_VEC
                        .replace("""      float yo[8], xv[8];
      ld8(yo0 + 16 * j, yo);
""", """      float xv[8];
""")
                        .replace("v[q] = v[q] + el * yo[q] + dh * xv[q];", "v[q] = v[q] + dh * xv[q];")
                        .replace("""  const float el = live ? fexp(sacs[l]) : 0.0f;
""", "")
                        .replace("""  const DEV T* yo0 = Yo + ((bc * G + g) * KC + (live ? l : 0)) * (R * PC) + (h - g * R) * PC + 8 * hi;
""", "")
                        .replace("one 16-byte load of Yo and of x, one 16-byte store of y.",
                                 "one 16-byte load of x, one 16-byte store of y."))

CHUNK_OUT_TC_FX = Kernel(
    name="alloy_ssd_chunk_out_tc_fx",
    inputs=CHUNK_OUT_TC.inputs,
    outputs=CHUNK_OUT_TC.outputs,
    body=_out_fx_body(False),
    launch_bounds=(128, 7),  # 72 registers, no spills (nvcc sm_90, KC 128 / PC 64); (128, 8) spills
)
# CHUNK_OUT_TC_FX with Yo = C H in the kernel (switch OUT_FX_YO): no Yo product, no Yo in memory
CHUNK_OUT_YO_FX = Kernel(
    name="alloy_ssd_chunk_out_yo_fx",
    inputs=("CB", "acs", "x", "dt", "C", "starts", "D"),
    outputs=("y",),
    body=_out_fx_body(True),
    launch_bounds=(),  # 96 registers (5 groups per SM), no spills; (128, 6) spills 28 bytes, (128, 7) 96
)


def _dx_rm_body(dys: bool) -> str:
    """BWD_DX_TC_RM's body; dys: also write dys = dy exp(acs_l) (BWD_DX_TC_DYS, see `_tc_data_tile`)."""
    return ("""
  // BWD_DX_TC with the dy tile row-major (sdx [l][p], mma16_f) and the mask tile in CB's layout
  // (smk [l][s], rows from 16-byte loads; the warp's a-operand M^T[s, l] by lda16t)""" + (
        """; BWD_DX_TC_DYS also writes
  // dys = dy exp(acs_l) (the state term's cotangent, for the gradient's products dH, dC)""" if dys else "") + """
""" + _tc_item("dy", rows=True) + "\n" + _dx_tc_loop(True, dys) + _DX_TC_EPI)


# BWD_DX_TC_RM with the decay factored (switch DX_FACTORED), CHUNK_OUT_TC_FX's transpose: for a warp's
# output rows s < m = wr + 16 (its block's end) and l >= m, M[l, s] = exp(acs_m - acs_s) * CB[l, s]
# exp(acs_l - acs_m): the warp's slice of the mask tile (its 16 columns s, 64 rows l) is CB times one
# row factor per l there, the blocks run from the last l down so that the diagonal block (exact) comes
# last, after the accumulator rows are scaled by exp(acs_m - acs_s). Both factors in [0, 1] (acs
# non-increasing).
BWD_DX_TC_FX = Kernel(
    name="alloy_ssd_bwd_dx_tc_fx",
    inputs=("CB", "acs", "dy"),
    outputs=("dX",),
    body="""
  // BWD_DX_TC_RM with the decay factored below each warp's diagonal block (see DX_FACTORED)
""" + _tc_item("dy", rows=True) + """
  SHARED float scol[4 * 64];                  // per warp: the step's factors exp(acs_l - acs_m)
  const int cw = 64 * w;
  const int m = wr + 16;                      // the first row past the warp's block
  const float am = m < KC ? sacs[m] : 0.0f;
  const int l_last = r0 + 64 * ((KC - 1 - r0) / 64);
  for (int l = r0 + tid; l < KC; l += 128)    // the dy rows of every step, to L2 ahead of their turn
    if (t0 + l < L) prefetch_l2(dy + ((b * L + t0 + l) * H + h) * PC);
  for (int l0 = l_last; l0 >= r0; l0 -= 64) {   // from the chunk's end: the diagonal block last
""" + _raw_data_tile("dy", "l0", "the dy tile, as stored") + """    const int k_lo = wr > l0 ? (wr - l0) / 16 : 0;           // 16-blocks of l >= the warp's first row
    const int k_end = (KC - l0) / 16 < 4 ? (KC - l0) / 16 : 4;
    for (int r = static_cast<int>(lane); r < 64; r += 32) {
      const int l = l0 + r;
      scol[cw + r] = l >= m && l < KC ? fexp(sacs[l] - am) : 0.0f;
    }
    warp_sync();
    if (wr < KC)
      for (int it = static_cast<int>(lane); it < 64 * 2; it += 32) {   // the warp's columns: rows l0 + r
        const int r = it / 2;
        const int u = 8 * (it % 2);
        if (r / 16 < k_lo || r / 16 >= k_end) continue;
        const int l = l0 + r;
""" + _cb_row8("wr + u", 8) + """        float v[8];
        if (l >= m) {                         // below the diagonal block: CB exp(acs_l - acs_m)
          const float f = scol[cw + r];
          for (int q = 0; q < 8; ++q) v[q] = c[q] * f;
        } else {                              // the diagonal block: exact, zero for s > l
          const float al = sacs[l];
          for (int q = 0; q < 8; ++q) {
            const int s = wr + u + q;
            v[q] = s <= l ? c[q] * fexp(al - sacs[s]) : 0.0f;
          }
        }
        st8(smk + r * TP + 16 * w + u, v);
      }
    BARRIER();
    if (wr < KC)
      for (int kk = k_end - 1; kk >= k_lo; --kk) {
        if (l0 + 16 * kk == wr && m < KC) {   // the diagonal block, last: the rows so far times exp(acs_m - acs_s)
""" + _scale_acc_rows(lambda r: f"fexp(am - sacs[{r}])", 10) + """        }
        Frag16<T> fm;
        lda16t(fm, smk + 16 * kk * TP + 16 * w, TP, lane);
        for (int j = 0; j < PC / 16; ++j) mma16_f(acc[j], fm, sdx + 16 * kk * XP + 16 * j, XP, lane);
      }
    BARRIER();
  }
""" + _DX_TC_EPI_ANY,
    launch_bounds=(128, 7),  # 70 registers, no spills (nvcc sm_90, KC 128 / PC 64); 80 unbounded
)


BWD_DX_TC_RM = Kernel(name="alloy_ssd_bwd_dx_tc_rm", inputs=("CB", "acs", "dy"), outputs=("dX",),
                      body=_dx_rm_body(False))
BWD_DX_TC_DYS = Kernel(name="alloy_ssd_bwd_dx_tc_dys", inputs=("CB", "acs", "dy"), outputs=("dX", "dys"),
                       body=_dx_rm_body(True))


def dx_dys_fits(dtype, op, P: int, K: int) -> bool:
    """Whether the gradient takes dX and dys from BWD_DX_TC_DYS (`bwd_dx_dys`): switches DX_DYS,
    TC_ROW_TILES and DX_TC on, 16-bit inputs that BWD_DX_TC takes, products in the input dtype."""
    return DX_DYS and TC_ROW_TILES and DX_TC and _tc_fits(dtype, P, K) and op == dtype


def bwd_dx_dys(CB, acs, dy, G: int):
    """`BWD_DX_TC_DYS`: CB (b, c, g, K, K) float32, acs (b, c, h, K) float32, dy (b, l, h, p) 16-bit ->
    dX (b, c, K, h, p) float32 (as `ssd_chunked_diag_bwd`'s) and dys = dy exp(acs) (b, c, g, K, h/g p)
    in dy's dtype, zero past l."""
    b, l, H, P = dy.shape
    _, nc, _, K, _ = CB.shape
    dX, dys = BWD_DX_TC_DYS(
        [CB, acs, dy],
        template=[("T", dy.dtype), ("KC", K), ("PC", P)],
        grid=(groups(K, 64), H, b * nc),
        threadgroup=128,
        output_shapes=[(b, nc * K, H, P), (b, nc, G, K, H // G * P)],
        output_dtypes=[_F32, dy.dtype],
    )
    return dX.reshape(b, nc, K, H, P), dys


# BWD_FIN's lanes: with FIN_VEC on and P a multiple of 8, each lane takes 8 consecutive p (16-byte loads of
# the 16-bit arrays, float4 pairs of the float32 ones, one 8-element store of dx), a row (batch, chunk
# step, head) spread over the largest power of two lanes (at most 32) dividing P / 8; off (or other P):
# 8 lanes per row, lane j taking p = j, j + 8, ... (the first version, kept for A/B runs on the GPU).
# H100, session 9 (toy step, CUPTI): 248 us per layer against 330 for the first version.
FIN_VEC = True

# FIN_LD8(p, o, v): v[0..8) = float(p[o..o+8)): two float4 loads where p holds float32 (16-byte aligned
# there: o a multiple of 4), else `ld8` (one 16-byte load for bf16 / fp16 on CUDA)
_FIN_HELPERS = """
#define FIN_LD8(p, o, v) if (sizeof(p[0]) == 4) { \\
    const float4 a_ = *reinterpret_cast<const DEV float4*>(p + (o)); \\
    const float4 b_ = *reinterpret_cast<const DEV float4*>(p + (o) + 4); \\
    v[0] = a_.x; v[1] = a_.y; v[2] = a_.z; v[3] = a_.w; v[4] = b_.x; v[5] = b_.y; v[6] = b_.z; v[7] = b_.w; \\
  } else { ld8(p + (o), v); }
"""

BWD_FIN = Kernel(
    name="alloy_ssd_bwd_finish",
    inputs=("x", "dy", "dt", "acs", "CH", "dXw", "dXd", "D"),
    outputs=("dx", "ra", "rw", "rx", "rd"),
    helpers=_FIN_HELPERS,
    body="""
  // the gradient's elementwise end and its sums over p, one pass: LR lanes per (batch, chunk step,
  // head) row. VEC (P % 8 == 0): lane j takes the 8-element runs p = 8 q .. 8 q + 7 for q = j, j + LR,
  // ... < P / 8, all of a run's loads issued before its arithmetic; else (LR 8) p = j, j + 8, ...
  // With wS = exp(acs_end - acs_l), X = dt x, Xw = X wS:
  //   dX = dXw wS + dXd;  dx = dX dt + D dy  (written for steps < L, in x's dtype)
  //   ra = sum_p dy e^acs_l CH - sum_p dXw Xw,  rw = sum_p dXw Xw,  rx = sum_p dX x,  rd = sum_p dy x
  // (b, c, K, h) float32. CH = C_l H_c and dXw = B_l dS_c are chunk-major (b, c, g, K, r p), float32 or
  // T; dXd (b, c K, h, p) float32; x, dy (b, L, h, p), dt (b, L, h) unpadded.
  const int L = x_shape[1];
  const int H = x_shape[2];
  const int P = x_shape[3];
  const int nc = acs_shape[1];
  const int G = CH_shape[2];
  const int R = H / G;
  const long total = (long)acs_shape[0] * nc * KC * H;
  const long item = ((long)bid_x * nthreads + tid) / LR;
  const int j = tid % LR;
  const bool live = item < total;
  const long it = live ? item : 0;
  const int h = it % H;
  const long bt = it / H;                      // b * (nc K) + padded step
  const long b = bt / (nc * KC);
  const long t = bt % (nc * KC);
  const long c = t / KC;
  const int l = t % KC;
  const bool real = live && t < L;
  const float al = acs[it];
  const float ws = fexp(acs[((b * nc + c) * KC + KC - 1) * H + h] - al);
  const float eo = fexp(al);
  const float dtv = real ? static_cast<float>(dt[(b * L + t) * H + h]) : 0.0f;
  const float dh = static_cast<float>(D[h]);
  const long cm = (((b * nc + c) * G + h / R) * KC + l) * (long)(R * P) + (h % R) * P;
  const long xm = ((b * L + (real ? t : 0)) * H + h) * P;
  const long dm = (bt * H + h) * P;
  float sa = 0.0f;
  float sw = 0.0f;
  float sx = 0.0f;
  float sd = 0.0f;
  if (VEC) {
    for (int p0 = 8 * j; p0 < P; p0 += 8 * LR) {
      float xv[8], dyv[8], ch[8], dxw[8], dxd[8];  // all loads first, unconditional: idle lanes read
      FIN_LD8(x, xm + p0, xv);                      // item 0's row, steps past L step 0's x / dy (zeroed
      FIN_LD8(dy, xm + p0, dyv);                    // below); their sums stay inside their own row
      FIN_LD8(CH, cm + p0, ch);
      FIN_LD8(dXw, cm + p0, dxw);
      FIN_LD8(dXd, dm + p0, dxd);
      float o[8];
      for (int k = 0; k < 8; ++k) {
        if (!real) xv[k] = dyv[k] = 0.0f;
        const float xw = dtv * xv[k] * ws;
        sa += dyv[k] * eo * ch[k];
        sw += dxw[k] * xw;
        const float dX = dxw[k] * ws + dxd[k];
        sx += dX * xv[k];
        sd += dyv[k] * xv[k];
        o[k] = dX * dtv + dyv[k] * dh;
      }
      if (real) st8(dx + xm + p0, o);
    }
  } else {
    for (int p = j; p < P; p += LR) {
      const float xv = real ? static_cast<float>(x[xm + p]) : 0.0f;
      const float dyv = real ? static_cast<float>(dy[xm + p]) : 0.0f;
      const float dxw = live ? static_cast<float>(dXw[cm + p]) : 0.0f;
      const float xw = dtv * xv * ws;
      sa += dyv * eo * (live ? static_cast<float>(CH[cm + p]) : 0.0f);
      sw += dxw * xw;
      const float dX = dxw * ws + (live ? static_cast<float>(dXd[dm + p]) : 0.0f);
      sx += dX * xv;
      sd += dyv * xv;
      if (real) dx[xm + p] = static_cast<T>(dX * dtv + dyv * dh);
    }
  }
  for (int m = 1; m < LR; m *= 2) {
    sa += shfl_xor(sa, m);
    sw += shfl_xor(sw, m);
    sx += shfl_xor(sx, m);
    sd += shfl_xor(sd, m);
  }
  if (live && j == 0) {
    ra[item] = sa - sw;
    rw[item] = sw;
    rx[item] = sx;
    rd[item] = sd;
  }
""",
)


def fin_lanes(P: int) -> tuple[bool, int]:
    """BWD_FIN's (VEC, LR) for head dim P: 8-element runs over the largest power of two lanes (at most
    32) dividing P / 8 where FIN_VEC is on and 8 divides P, else 8 lanes of single elements."""
    if not (FIN_VEC and P % 8 == 0):
        return False, 8
    lr = 1
    while lr < 32 and (P // 8) % (2 * lr) == 0:
        lr *= 2
    return True, lr


def bwd_finish(x, dy, dt, acs, CH, dXw, dXd, D):
    """`BWD_FIN`: acs (b, c, K, h) float32; CH, dXw (b, c, g, K, r p) float32 or x's dtype; dXd (b, c, K, h, p)
    float32 or x's dtype; D (h,) -> dx (x's shape and dtype), and ra, rw, rx, rd (b, c, K, h) float32."""
    b, nc, K, H = acs.shape
    n = b * nc * K * H
    vec, lr = fin_lanes(x.shape[-1])
    return BWD_FIN(
        [x, dy.astype(x.dtype), dt, acs, CH, dXw, dXd, D],
        template=[("T", x.dtype), ("KC", K), ("VEC", vec), ("LR", lr)],
        grid=(groups(lr * n, 256), 1, 1),
        threadgroup=256,
        output_shapes=[x.shape] + [(b, nc, K, H)] * 4,
        output_dtypes=[x.dtype] + [_F32] * 4,
    )


def ssd_chunked_diag_bwd(CB, acs, x, dt, dy, with_dx: bool = True):
    """The diagonal blocks' gradient on the GPU (see `BWD_SCORES` / `BWD_DX`). CB (b, c, g, K, K)
    float32 = C B^T per chunk; acs (b, c, h, K) float32 (cumsum of dt A inside each chunk); x, dy
    (b, l, h, p) and dt (b, l, h) unchunked (l <= c K; steps past l count as zero). Returns
    dX (b, c, K, h, p), dacs (b, c, K, h) and dCB (b, c, g, K, K), all float32 (dX in x's dtype from
    BWD_DX_TC_FX under DX_HALF_OUT); dX is the gradient with respect to X = dt x. with_dx=False: no dX launch, None in its place (`bwd_dx_finish` takes it)."""
    b, l, H, P = x.shape
    _, nc, G, K, _ = CB.shape
    nt = groups(K, 64)
    rs = max(d for d in range(1, min(H // G, _SCORE_HEADS) + 1) if (H // G) % d == 0)
    ns = H // G // rs
    dy = dy.astype(x.dtype)
    tc = SCORES_TC and P % 16 == 0 and P <= (128 if x.dtype in (mx.bfloat16, mx.float16) else 64)
    zt = tc and SCORES_ZERO_TILES
    dCB, rsum, csum = (BWD_SCORES_TC if tc else BWD_SCORES)(
        [CB, acs, x, dt, dy],
        template=([("T", x.dtype), ("KC", K), ("PC", P), ("RS", rs), ("ZT", zt), ("PF", SCORES_PREFETCH)] if tc
                  else [("T", x.dtype), ("KC", K), ("PB", _SCORE_PB), ("RS", rs)]),
        grid=(nt * nt, G * ns, b * nc),
        threadgroup=256,
        output_shapes=[(ns, b, nc, G, K, K), (b, nc, H, nt, K), (b, nc, H, nt, K)],
        output_dtypes=[_F32, _F32, _F32],
        init_value=None if zt else 0.0,
    )
    dCB = dCB[0] if ns == 1 else dCB.sum(axis=0)
    dacs = (rsum.sum(axis=3) - csum.sum(axis=3)).transpose(0, 1, 3, 2)
    if not with_dx:
        return None, dacs, dCB
    dtc = DX_TC and _tc_fits(x.dtype, P, K)
    rm = BWD_DX_TC_FX if DX_FACTORED else BWD_DX_TC_RM
    (dX,) = ((rm if TC_ROW_TILES else BWD_DX_TC) if dtc else BWD_DX)(
        [CB, acs, dy],
        template=([("T", x.dtype), ("KC", K), ("PC", P)] if dtc
                  else [("T", x.dtype), ("KC", K), ("PC", P), ("CG", groups(P, 64)), ("SB", 32)]),
        grid=(nt, H, b * nc),
        threadgroup=128,
        output_shapes=[(b, nc * K, H, P)],
        output_dtypes=[x.dtype if dtc and TC_ROW_TILES and DX_FACTORED and DX_HALF_OUT else _F32],
    )
    return dX.reshape(b, nc, K, H, P), dacs, dCB


def state_pass(states, decay, init, dtype, reverse: bool = False, dot_with=None):
    """`PASS`: states (b, c, g, n, r p) each chunk's own end state, decay (b, c, h) its total decay,
    init (b, h, p, n) float32 -> (the states entering each chunk (b, c, g, n, r p) in dtype, the
    final state (b, h, p, n) float32). reverse: the sweep runs from the last chunk to the first
    (passing adjoints backwards), results in chunk order. dot_with (the shape of states; head dim a
    multiple of 32): a third result (b, c, h), sum over n and p of the entering states (as
    returned, in dtype) times dot_with. The kernel reads init and writes the final state as (b, h, n, p),
    p fastest like the chunk states (each thread's elements consecutive: coalesced; in (b, h, p, n) they
    were N apart), transposed here: a copy of init, a transposed view of the final state."""
    b, nc, G, N, RP = states.shape
    H, P = decay.shape[-1], init.shape[2]
    dot = dot_with is not None
    if dot and (P % 32 or dot_with.shape != states.shape):
        raise ValueError(f"state_pass: dot_with needs the states' shape {states.shape} and a head dim "
                         f"multiple of 32, got {dot_with.shape} and {P}")
    per = G * N * RP
    # eight elements per thread where they share a head and whole warps cover whole chunk states
    vw = 8 if P % 8 == 0 and per % 256 == 0 else 1
    outs = PASS(
        [states, decay, init.swapaxes(-1, -2), dot_with if dot else mx.zeros((1,), dtype)],
        template=[("T", dtype), ("CBLK", PASS_CBLK if vw == 8 else 8), ("REV", bool(reverse)), ("DOT", dot),
                  ("VW", vw)],
        grid=(groups(b * per // vw, GROUP), 1, 1),
        threadgroup=GROUP,
        output_shapes=[states.shape, (b, H, N, P), (b, nc, per // 32) if dot else (1,)],
        output_dtypes=[dtype, _F32, _F32],
    )
    final = outs[1].swapaxes(-1, -2)
    if not dot:
        return outs[0], final
    # over n first (a column reduction of the (n, h/g * p/32) rows), then the few p/32 partials of the
    # small result: on an H100 MLX-CUDA's one reduction over axes (3, 5) was a strided row reduction
    # of 0.11-0.19 ms per layer for 3 MB, and a sum over the size-2 last axis first a 0.25 ms row
    # reduction with one 32-thread block per pair (docs/benchmarks.md, session 8)
    dots = outs[2].reshape(b, nc, G, N, (H // G) * (P // 32)).sum(axis=3).reshape(b, nc, H, P // 32).sum(axis=-1)
    return outs[0], final, dots


def chunk_products_cb(B, C, Bc, Cc, K: int):
    """CB = C Bᵀ per chunk, (b, c, g, K, K) float32, for the forward and the gradient alike: B, C
    (b, l, g, n) by `chunk_cb` where `CB_TC` is on and it fits, else the float32 batched matmul of
    their chunks Bc, Cc (b, c, g, K, n)."""
    if CB_TC and C.dtype == B.dtype and cb_tc_fits(B.dtype, K, B.shape[-1]):
        return chunk_cb(B, C, K, CB_TC_KERNEL)
    return Cc.astype(_F32) @ Bc.astype(_F32).swapaxes(-1, -2)


def ssd_chunked(x, dt, A, B, C, D, initial_state, chunk_size: int, with_starts: bool = False,
                with_saved: bool = False):
    """Chunked SSD forward on the GPU. x (b, l, h, p), dt (b, l, h), A (h,), B/C (b, l, g, n),
    D (h,), initial_state (b, h, p, n) -> y (b, l, h, p) in x.dtype, final state (b, h, p, n) f32
    (and with_starts: the states entering each chunk, (b, c, g, n, r p) in x.dtype, for the
    gradient; with_saved: also CB (b, c, g, K, K) float32 and PREP's dt x decayed to the chunk end
    (b, c, g, K, r p) in x.dtype, which the gradient computes too). Any length: T is padded to whole
    chunks with dt = 0 (decay 1, no input)."""
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
    CB = chunk_products_cb(B, C, Bc, Cc, K)  # (b, c, g, K, K) f32
    states = Bc.swapaxes(-1, -2).astype(dtype) @ xs  # (b, c, g, n, r p)
    starts, final_state = state_pass(states, decay, initial_state, dtype)

    def out(y):
        if with_saved:
            return y, final_state, starts, CB, xs
        return (y, final_state, starts) if with_starts else (y, final_state)

    tc = OUT_TC and _tc_fits(dtype, P, K)
    if tc and TC_ROW_TILES and OUT_FACTORED and OUT_FX_YO and OUT_TC_VEC_EPILOGUE and N % 16 == 0:
        # CHUNK_OUT_TC_FX with Yo = C H inside (it copies `starts`, in dtype from state_pass, as stored)
        (y,) = CHUNK_OUT_YO_FX(
            [CB, acs, x, dt, C.astype(dtype), starts, D],
            template=[("T", dtype), ("KC", K), ("PC", P)],
            grid=(groups(K, 64), H, b * nc),
            threadgroup=128,
            output_shapes=[(b, l, H, P)],
            output_dtypes=[dtype],
        )
        return out(y)
    if tc and OUT_FUSED_YO and N % 16 == 0:  # Yo = C H inside the chunk-output kernel
        (y,) = CHUNK_OUT_YO_TC(
            [CB, acs, x, dt, C.astype(dtype), starts, D],
            template=[("T", dtype), ("KC", K), ("PC", P)],
            grid=(groups(K, 64), H, b * nc),
            threadgroup=128,
            output_shapes=[(b, l, H, P)],
            output_dtypes=[dtype],
        )
        return out(y)
    Yo = Cc.astype(dtype) @ starts  # (b, c, g, K, r p)
    rm = CHUNK_OUT_TC_FX if OUT_FACTORED else CHUNK_OUT_TC_RM if OUT_RM_BOUNDS else CHUNK_OUT_TC_RM_FREE
    (y,) = (((rm if TC_ROW_TILES else CHUNK_OUT_TC) if OUT_TC_VEC_EPILOGUE else CHUNK_OUT_TC_ACC)
            if tc else OUT)(
        [CB, acs, x, dt, Yo, D],
        template=([("T", dtype), ("KC", K), ("PC", P)] if tc
                  else [("T", dtype), ("KC", K), ("PC", P), ("CG", groups(P, 64)), ("SB", 32)]),
        grid=(groups(K, 64), H, b * nc),
        threadgroup=128,
        output_shapes=[(b, l, H, P)],
        output_dtypes=[dtype],
    )
    return out(y)


# ---------------------------------------------------------------- dX and the gradient's end, fused
# BWD_DX_TC's product loop (the fused kernel below runs it into accumulators that already
# hold dXw wS): steps of 64 along l from r0, the dy tile transposed in sdt, the mask tile in smk
_DX_TC_LOOP = _dx_tc_loop(False)


def _fin_tiles(rows: str, states: str) -> str:
    """One step of 64 along n (from n0) of the fused kernel's state products: the block's rows of
    `rows` ((b, L, g, n) in T: B or C; rows past the chunk or past L zero) raw-copied into smk
    [row][n], the head's (n, p) slice of `states` ((b, c, g, n, r p) in T: dS or Hs) transposed into
    sdt [p][n] (lanes along n, as BWD_DX_TC's data tile); then the warp's products over n (mma16t:
    acc[j] += rows . states), skipped by a warp whose rows are all past L. Each thread issues all its
    16-byte loads of the step (4 row units, PC / 16 state units) before storing any."""
    return f"""\
  for (int n0 = 0; n0 < N; n0 += 64) {{
    {{
      Raw8<T> rv[4];                          // row units idx = tid + 128 v: row idx / 8, n0 + 8 (idx % 8)
      Raw8<T> sv[PC / 16];                    // state units idx = tid + 128 v: row n0 + idx % 64, p 8 (idx / 64)
      for (int v = 0; v < 4; ++v) {{
        const int idx = static_cast<int>(tid) + 128 * v;
        const long t = t0 + r0 + idx / 8;
        const bool ok = r0 + idx / 8 < KC && t < L && n0 + 8 * (idx % 8) < N;
        rv[v] = ldr8({rows} + (ok ? ((b * L + t) * G + g) * N + n0 + 8 * (idx % 8) : 0));
      }}
      for (int v = 0; v < PC / 16; ++v) {{
        const int idx = static_cast<int>(tid) + 128 * v;
        const int kk = n0 + idx % 64 < N ? idx % 64 : 0;
        sv[v] = ldr8({states} + hs + (long)(n0 + kk) * (R * PC) + 8 * (idx / 64));
      }}
      for (int v = 0; v < 4; ++v) {{
        const int idx = static_cast<int>(tid) + 128 * v;
        const bool ok = r0 + idx / 8 < KC && t0 + r0 + idx / 8 < L && n0 + 8 * (idx % 8) < N;
        if (ok) {{
          str8(rv[v], smk + (idx / 8) * TP + 8 * (idx % 8));
        }} else {{
          const float z[8] = {{0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f}};
          st8(smk + (idx / 8) * TP + 8 * (idx % 8), z);
        }}
      }}
      for (int v = 0; v < PC / 16; ++v) {{     // transposed: the lanes' stores hit consecutive words of a row
        const int idx = static_cast<int>(tid) + 128 * v;
        float f[8];
        cvt8(sv[v], f);
        for (int q = 0; q < 8; ++q) sdt[(8 * (idx / 64) + q) * TP + idx % 64] = static_cast<T>(f[q]);
      }}
    }}
    BARRIER();
    const int nk = (N - n0) / 16 < 4 ? (N - n0) / 16 : 4;
    if (live)
      for (int kk = 0; kk < nk; ++kk) {{
        Frag16<T> fr;                         // the warp's row tile: loaded once for the PC / 16 tiles
        lda16(fr, smk + 16 * w * TP + 16 * kk, TP, lane);
        for (int j = 0; j < PC / 16; ++j) mma16t_f(acc[j], fr, sdt + 16 * j * TP + 16 * kk, TP, lane);
      }}
    BARRIER();
  }}
"""

# the lane's two rows s = wr + acc_row(i, lane), a = (i >> 1) & 1 (entries 2a, 2a + 1, 2a + 4, 2a + 5 of
# each tile): acs, dt, whether a real step, the x / dy offset (row 0 where not); recomputed in each
# phase's scope rather than held in registers across the products
_FIN_ROWS = """\
    float al[2];
    float dtv[2];
    bool real[2];
    long xrow[2];
    for (int a = 0; a < 2; ++a) {
      const int s = wr + static_cast<int>(lane >> 2) + 8 * a;
      const long t = t0 + s;
      real[a] = s < KC && t < L;
      al[a] = s < KC ? sacs[s] : 0.0f;
      dtv[a] = real[a] ? static_cast<float>(dt[(b * L + t) * H + h]) : 0.0f;
      xrow[a] = ((b * L + (real[a] ? t : 0)) * H + h) * PC;
    }
"""


def _fin_row_sum(dst: str, val: str) -> str:
    """The sum of `val` over the quad of lanes holding row a, stored to the block's row array `dst`."""
    return f"""\
      float v4 = {val};
      v4 += shfl_xor(v4, 1);
      v4 += shfl_xor(v4, 2);
      if ((lane & 3u) == 0u) {dst}[16 * w + static_cast<int>(lane >> 2) + 8 * a] = v4;
"""


BWD_DX_FIN_TC = Kernel(
    name="alloy_ssd_bwd_dx_finish_tc",
    inputs=("CB", "acs", "x", "dt", "dy", "B", "C", "dS", "Hs", "D"),
    outputs=("dx", "ra", "rw", "rx", "rd"),
    body="""
  // BWD_DX_TC and BWD_FIN in one kernel, with the two state products BWD_FIN read from memory
  // (CH = C_s Hs and dXw = B_s dS, (b, c, g, K, r p) arrays) taken as warp tile products here. One
  // group of 4 warps per (block of 64 chunk steps s from r0, head h, batch x chunk bc); warp w owns
  // rows r0 + 16 w .. + 15 and all PC columns (PC / 16 accumulator tiles), lane the two rows
  // wr + acc_row(i, lane) (a = (i >> 1) & 1). Three phases through the same accumulators and the
  // same shared tiles (smk 64 x 64 operand rows, sdt PC x 64 transposed operand columns):
  //   1. CH[s, p] = sum_n C[s, n] Hs[n, p], consumed at once: sa = e^acs_s sum_p dy CH
  //   2. dXw[s, p] = sum_n B[s, n] dS[n, p]:  sw = wS dt sum_p dXw x, then acc = dXw wS
  //   3. BWD_DX_TC's loop adds dXd[s] = sum_{l >= s} CB[l, s] e^(acs_l - acs_s) dy_l: acc = dX
  // and BWD_FIN's epilogue: dx = dX dt + D dy (steps < L, in T), and per (step, head), sums over p
  // by quad shuffles (the lanes lane & ~3 .. | 3 hold one row): ra = sa - sw, rw = sw,
  // rx = sum_p dX x, rd = sum_p dy x ((b, c, K, h) float32; padded steps t >= L: 0).
  // x, dy, B, C, dS, Hs in T (B, C (b, L, g, n) unchunked; dS, Hs (b, c, g, n, r p)), n a multiple
  // of 16; acs (b, c, K, h) float32 as BWD_FIN's; D (h,) float32.
  // Shared memory: (64 + PC) x 72 x 2 bytes + KC x 4: 19 KB at PC 64, KC 128 (28 KB at PC 128).
""" + _chunk_block("x") + """
  const int N = B_shape[3];
  const int w = static_cast<int>(warp);
  const int wr = r0 + 16 * w;                 // the warp's first row
  const bool live = wr < KC && t0 + wr < L;   // a warp whose rows are all padding skips the products
  const long hs = (bc * G + g) * (long)N * (R * PC) + (h - g * R) * PC;   // dS / Hs [.., n = 0, p = 0]
  constexpr int TP = 64 + 8;                  // padded tile rows
  constexpr int U8 = PC / 8;                  // 8-element units of a data row
  ALIGN16 SHARED T smk[64 * TP];              // operand rows [row][k]: C / B rows, then the mask
  ALIGN16 SHARED T sdt[PC * TP];              // operand columns [p][k]: Hs / dS, then dy, transposed
  SHARED float sacs[KC];
  SHARED float ssa[64];                       // per row of the block (quad sums): sa
  SHARED float ssw[64];                       // and sw
  for (int l = tid; l < KC; l += 128) sacs[l] = acs[(bc * KC + l) * H + h];
  BARRIER();
  Acc16 acc[PC / 16];
  for (int j = 0; j < PC / 16; ++j) acc_zero(acc[j]);
""" + _fin_tiles("C", "Hs") + """\
  {                                           // sa = e^acs_s sum_p dy CH, per row into ssa
""" + _FIN_ROWS + """\
    for (int a = 0; a < 2; ++a) {
      float v = 0.0f;
      if (real[a])
        for (int j = 0; j < PC / 16; ++j)
          for (int i = 2 * a; i < 8; i += (i & 1) ? 3 : 1)   // entries 2a, 2a + 1, 2a + 4, 2a + 5
            v += acc[j].c[i] * static_cast<float>(dy[xrow[a] + 16 * j + acc_col(i, lane)]);
""" + _fin_row_sum("ssa", "v * fexp(al[a])") + """\
    }
  }
  for (int j = 0; j < PC / 16; ++j) acc_zero(acc[j]);
""" + _fin_tiles("B", "dS") + """\
  {                                           // sw = wS dt sum_p dXw x per row into ssw; acc = dXw wS
""" + _FIN_ROWS + """\
    for (int a = 0; a < 2; ++a) {
      const float ws = fexp(sacs[KC - 1] - al[a]);
      float v = 0.0f;
      for (int j = 0; j < PC / 16; ++j)
        for (int i = 2 * a; i < 8; i += (i & 1) ? 3 : 1) {
          if (real[a]) v += acc[j].c[i] * static_cast<float>(x[xrow[a] + 16 * j + acc_col(i, lane)]);
          acc[j].c[i] *= ws;
        }
""" + _fin_row_sum("ssw", "v * dtv[a] * ws") + """\
    }
  }
""" + _DX_TC_LOOP + """\
  const float dh = static_cast<float>(D[h]);
  {                                           // BWD_FIN's epilogue: acc = dX
""" + _FIN_ROWS + """\
    for (int a = 0; a < 2; ++a) {
      float sx = 0.0f;
      float sd = 0.0f;
      if (real[a])
        for (int j = 0; j < PC / 16; ++j)
          for (int i = 2 * a; i < 8; i += 4) {  // entries i, i + 1: a column pair of row a
            const long e = xrow[a] + 16 * j + acc_col(i, lane);
            const float x0 = static_cast<float>(x[e]);
            const float x1 = static_cast<float>(x[e + 1]);
            const float d0 = static_cast<float>(dy[e]);
            const float d1 = static_cast<float>(dy[e + 1]);
            const float g0 = acc[j].c[i];
            const float g1 = acc[j].c[i + 1];
            sx += g0 * x0 + g1 * x1;
            sd += d0 * x0 + d1 * x1;
            st2(dx + e, g0 * dtv[a] + d0 * dh, g1 * dtv[a] + d1 * dh);
          }
      for (int m = 1; m < 4; m <<= 1) {       // over the quad of lanes that share the row
        sx += shfl_xor(sx, m);
        sd += shfl_xor(sd, m);
      }
      const int s = wr + static_cast<int>(lane >> 2) + 8 * a;
      if ((lane & 3u) == 0u && s < KC) {      // the lane that wrote the row's ssa / ssw
        const int r = s - r0;
        const long o = (bc * KC + s) * H + h;
        ra[o] = ssa[r] - ssw[r];
        rw[o] = ssw[r];
        rx[o] = sx;
        rd[o] = sd;
      }
    }
  }
""",
    # CUDA: 4 groups per SM, registers capped at 128 (nvcc -Xptxas -v, sm_90, bf16, chunk 128: head
    # dim 64 needs 141 uncapped, 128 capped without spills; head dim 128 spills 136 bytes capped)
    launch_bounds=(128, 4),
)


def dx_finish_fits(dtype, op, P: int, K: int, N: int) -> bool:
    """Whether `bwd_dx_finish` takes a gradient with inputs of `dtype`, batched-product operands in
    `op`, head dim P, chunk K and d_state N (switches DX_FINISH_FUSED and DX_TC on; BWD_DX_TC's
    shapes; the state operands in the input dtype; N a multiple of 16)."""
    return DX_FINISH_FUSED and DX_TC and _tc_fits(dtype, P, K) and op == dtype and N % 16 == 0


def bwd_dx_finish(CB, acs, x, dt, dy, B, C, dS, Hs, D):
    """`BWD_DX_FIN_TC`: `ssd_chunked_diag_bwd`'s dX and `bwd_finish` in one launch, CH = C Hs and
    dXw = B dS taken inside. CB (b, c, g, K, K) float32; acs (b, c, K, h) float32; x, dy (b, l, h, p)
    and dt (b, l, h) unchunked; B, C (b, l, g, n) and dS, Hs (b, c, g, n, r p) in x's dtype (see
    `dx_finish_fits`); D (h,) float32 -> dx (x's shape and dtype), ra, rw, rx, rd (b, c, K, h)
    float32, as `bwd_finish` with dXd from `ssd_chunked_diag_bwd`, CH = C_l Hs, dXw = B_l dS."""
    b, nc, K, H = acs.shape
    P = x.shape[-1]
    return BWD_DX_FIN_TC(
        [CB, acs, x, dt, dy.astype(x.dtype), B, C, dS, Hs, D],
        template=[("T", x.dtype), ("KC", K), ("PC", P)],
        grid=(groups(K, 64), H, b * nc),
        threadgroup=128,
        output_shapes=[x.shape] + [(b, nc, K, H)] * 4,
        output_dtypes=[x.dtype] + [_F32] * 4,
    )

"""One kernel body, two dialects: the portable layer under every GPU kernel in `alloy.metal`.

A kernel body is written once in the common subset of CUDA C++ and the Metal Shading Language
(both are C++: `int`, `float`, `static_cast`, loops, arrays) plus a few portable names that this
prelude maps onto each dialect:

    index names (read-only, 1-D thread groups, up to 3-D grids of groups)
        tid        thread index inside its group        threadIdx.x   | thread_position_in_threadgroup.x
        bid_x/y/z  group index in the grid              blockIdx.x/y/z| threadgroup_position_in_grid.x/y/z
        nthreads   threads per group                    blockDim.x    | threads_per_threadgroup.x
        lane       index inside the 32-wide warp/simd   threadIdx.x&31| thread_index_in_simdgroup
        warp       warp/simdgroup index in the group    threadIdx.x>>5| simdgroup_index_in_threadgroup
    qualifiers and calls
        SHARED float buf[N];    group-shared memory     __shared__    | threadgroup
        BARRIER();              group barrier           __syncthreads | threadgroup_barrier
        DEVICE_FN               helper qualifier        __device__ __forceinline__ | inline
        ALIGN16 SHARED T a[N];  a 16-byte aligned group-shared array (for `ld8` from shared memory)
        DEV                     address space of a      (nothing)     | device
                                pointer variable into an input / output buffer: `const DEV float* p`
        warp_sum(v)             sum over the 32 lanes   __shfl_xor_sync butterfly | simd_sum
        shfl_xor(v, m)          value of lane ^ m       __shfl_xor_sync | simd_shuffle_xor
        warp_sync()             barrier of the warp's lanes (shared memory)  __syncwarp | simdgroup_barrier
        fexp(v), fsilu(v)       float exp, x*sigmoid(x)
        frsqrt, fsoftplus       1/sqrt, log(1 + e^v) (stable)
        f4(a, b, c, d)          a float4 (members .x .y .z .w in both dialects)
        ld8(p, o)               o[0..8) = float(p[0..8)) from a buffer or group-shared array; one
                                16-byte load for bf16/fp16 on CUDA (p must be 16-byte aligned
                                there: 8-element offsets of a buffer or of an ALIGN16 array)
        Raw8<U> r = ldr8(p)     eight elements' raw bits from a buffer (one 16-byte load for bf16/fp16 on
        cvt8(r, o)              CUDA, 16-byte aligned as for ld8), kept unconverted in registers until
                                cvt8 turns them into o[0..8) floats: loads issued long before use
        ld_cg(p)                a float load that sees other groups' writes of this launch
                                (CUDA: L2, bypassing the non-coherent L1 — `__ldcg`)
        grid_sync(c, n, tid)    grid-wide barrier for persistent kernels: the k-th barrier of a
                                G-group grid passes n = k * G; c: zeroed uint32 scratch of >= 1024
                                words (CUDA: 16 sub-counters + top counter + release word, each on
                                its own line; Metal: one counter); all groups must be resident at
                                once (grid <= what the GPU holds), writes before it are visible after
        Acc16 a; acc_zero(a)    a warp's 16 x 16 fp32 accumulator tile (8 entries per lane at
        mma16(a, A, lda, B, ldb, lane)   acc_row(i, lane), acc_col(i, lane)); mma16 adds A B for 16 x 16
        acc_store(a, C, ldc, lane)       tiles in group-shared memory (CUDA bf16 / fp16: tensor-core
                                mma.sync; other types and Metal: loops with the same layout)
        mma16t(a, A, lda, Bt, ldb, lane) the same with B given transposed (Bt: 16 x 16 row-major [n][k]):
                                A Bt^T, e.g. q k^T from two row-major tiles. lda / ldb even, the
                                tiles 4-byte aligned (CUDA loads element pairs as 32-bit words)
        Frag16<U> f; lda16(f, A, lda, lane)   a 16 x 16 row-major A tile (group-shared, U its element
        mma16_f(a, f, B, ldb, lane)     type) loaded once as the a-operand of the warp's mma (CUDA
        mma16t_f(a, f, Bt, ldb, lane)   bf16 / fp16: the mma.sync fragment registers; other types and
                                Metal: a pointer to the tile), then multiplied by several B / Bt tiles:
                                mma16_f(a, f, B, ...) == mma16(a, A, lda, B, ...), mma16t_f likewise,
                                without reloading A per column tile. A must stay in place while f is used.
                                mma16_f's B (row-major [k][n]) needs rows 16-byte aligned (ldb a
                                multiple of 8, B 16-byte aligned: CUDA reads it by ldmatrix.trans)
        lda16t(f, At, lda, lane)  the same a-operand from the tile stored transposed, At [k][m]
                                (group-shared, rows 16-byte aligned: CUDA ldmatrix.trans)
        str8(r, p)              store a Raw8's eight elements to group-shared p (one 16-byte store
                                for bf16/fp16 on CUDA: p 16-byte aligned)
        st8(p, o)               p[0..8) = o[0..8) converted, p a buffer or group-shared array (one
                                16-byte store for bf16/fp16 on CUDA: p 16-byte aligned)
        st2(p, a, b)            p[0] = a, p[1] = b converted (one 32-bit store for bf16/fp16 on
                                CUDA: p 4-byte aligned), e.g. an Acc16's column pair (entries i, i+1)
        Raw4<U> r = ldr4(p)     ldr8 / cvt8 / st8 for four elements of a buffer: one 8-byte load /
        cvt4(r, o), st4(p, o)   store for bf16/fp16 on CUDA (p 8-byte aligned); st4 to a float buffer
                                is one 16-byte store there (p 16-byte aligned)
        grid_arrive(c, n, tid)  grid_sync in two halves: writes before grid_arrive are visible after
        grid_wait(c, n, tid)    grid_wait; in between, only loads that need no other group's writes
                                (weights): they overlap the wait
        prefetch_l2(p)          start pulling p's cache line into L2 (CUDA; a no-op on Metal)

Inputs arrive as `const <T>*` pointers named after `input_names`, outputs as `<T>*` (MLX writes the
signatures); template arguments are compile-time constants (`int`/`bool`) or type aliases in both
dialects. Convert with `static_cast<float>(v)` and `static_cast<T>(f)`, which work for `bfloat16`
in both. Index with `int` / `unsigned int` (CUDA has no `uint`).

MLX launches `grid` *threads* (not groups) in both backends; CUDA rounds the grid up to whole
groups, Metal may launch a partial last group, so `launch` always passes a grid that is a whole
number of groups and bodies bounds-check their own work items.

`Kernel.source(dialect)` returns the (header, body) pair handed to `mx.fast.cuda_kernel` or
`mx.fast.metal_kernel`; `Kernel.__call__` picks the dialect of the running backend, builds the
MLX kernel once and launches it.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Sequence

import mlx.core as mx

DIALECTS = ("cuda", "metal")

# portable index name -> (CUDA expression, Metal expression); emitted only when a body uses it,
# because MLX adds a Metal attribute to the signature whenever its name appears in the source.
_INDEX = {
    "tid": ("threadIdx.x", "thread_position_in_threadgroup.x"),
    "bid_x": ("blockIdx.x", "threadgroup_position_in_grid.x"),
    "bid_y": ("blockIdx.y", "threadgroup_position_in_grid.y"),
    "bid_z": ("blockIdx.z", "threadgroup_position_in_grid.z"),
    "nthreads": ("blockDim.x", "threads_per_threadgroup.x"),
    "lane": ("(threadIdx.x & 31u)", "thread_index_in_simdgroup"),
    "warp": ("(threadIdx.x >> 5)", "simdgroup_index_in_threadgroup"),
}

# the warp tile product in plain loops: the CUDA dialect's (its 16-bit overloads add tensor cores)
# and the CPU emulator's, one text
ACC16_LOOPS = """\
// 16x16 fp32 accumulator tile of a warp (`Acc16`): lane l holds 8 entries, entry i at row
// acc_row(i, l) = (l >> 2) + 8 * ((i >> 1) & 1), column acc_col(i, l) = 8 * (i >> 2) + 2 * (l & 3) +
// (i & 1) (the m16n8 accumulator layout of the tensor-core mma). mma16 adds A (16 x 16, row-major,
// lda) times B (16 x 16, row-major [k][n], ldb), both in group-shared memory, called by all 32 lanes
// of a warp; bf16 / fp16 run two mma.sync.m16n8k16 (sm_80+), other types plain loops, same layout.
struct Acc16 { float c[8]; };
DEVICE_FN void acc_zero(Acc16& a) {
  for (int i = 0; i < 8; ++i) a.c[i] = 0.0f;
}
DEVICE_FN int acc_row(int i, unsigned int lane) { return static_cast<int>(lane >> 2) + 8 * ((i >> 1) & 1); }
DEVICE_FN int acc_col(int i, unsigned int lane) { return 8 * (i >> 2) + 2 * static_cast<int>(lane & 3u) + (i & 1); }
template <typename U> DEVICE_FN void mma16(Acc16& acc, const U* A, int lda, const U* B, int ldb, unsigned int lane) {
  for (int i = 0; i < 8; ++i) {
    const int r = acc_row(i, lane), c = acc_col(i, lane);
    float s = 0.0f;
    for (int k = 0; k < 16; ++k) s += static_cast<float>(A[r * lda + k]) * static_cast<float>(B[k * ldb + c]);
    acc.c[i] += s;
  }
}
template <typename U> DEVICE_FN void mma16t(Acc16& acc, const U* A, int lda, const U* Bt, int ldb, unsigned int lane) {
  for (int i = 0; i < 8; ++i) {
    const int r = acc_row(i, lane), c = acc_col(i, lane);
    float s = 0.0f;
    for (int k = 0; k < 16; ++k) s += static_cast<float>(A[r * lda + k]) * static_cast<float>(Bt[c * ldb + k]);
    acc.c[i] += s;
  }
}
template <typename V> DEVICE_FN void acc_store(const Acc16& acc, V* C, int ldc, unsigned int lane) {
  for (int i = 0; i < 8; ++i) C[acc_row(i, lane) * ldc + acc_col(i, lane)] = static_cast<V>(acc.c[i]);
}
// a preloaded A tile (`Frag16`): here the tile's place (tr: stored transposed, [k][m], by lda16t), the
// products those of mma16 / mma16t (the CUDA dialect specializes bf16 / fp16 to the mma.sync
// a-fragment registers)
template <typename U> struct Frag16 { const U* p; int ld; bool tr; };
template <typename U> DEVICE_FN void lda16(Frag16<U>& f, const U* A, int lda, unsigned int lane) {
  f.p = A;
  f.ld = lda;
  f.tr = false;
}
template <typename U> DEVICE_FN void lda16t(Frag16<U>& f, const U* At, int lda, unsigned int lane) {
  f.p = At;
  f.ld = lda;
  f.tr = true;
}
template <typename U> DEVICE_FN float frag_at(const Frag16<U>& f, int r, int k) {
  return static_cast<float>(f.tr ? f.p[k * f.ld + r] : f.p[r * f.ld + k]);
}
template <typename U> DEVICE_FN void mma16_f(Acc16& acc, const Frag16<U>& f, const U* B, int ldb, unsigned int lane) {
  for (int i = 0; i < 8; ++i) {
    const int r = acc_row(i, lane), c = acc_col(i, lane);
    float s = 0.0f;
    for (int k = 0; k < 16; ++k) s += frag_at(f, r, k) * static_cast<float>(B[k * ldb + c]);
    acc.c[i] += s;
  }
}
template <typename U> DEVICE_FN void mma16t_f(Acc16& acc, const Frag16<U>& f, const U* Bt, int ldb, unsigned int lane) {
  for (int i = 0; i < 8; ++i) {
    const int r = acc_row(i, lane), c = acc_col(i, lane);
    float s = 0.0f;
    for (int k = 0; k < 16; ++k) s += frag_at(f, r, k) * static_cast<float>(Bt[c * ldb + k]);
    acc.c[i] += s;
  }
}
"""

_CUDA_HEADER = """\
#define SHARED __shared__
#define BARRIER() __syncthreads()
#define DEVICE_FN __device__ __forceinline__
#define DEV
#define ALIGN16 __align__(16)
DEVICE_FN float fexp(float v) { return expf(v); }
DEVICE_FN float fsilu(float v) { return v / (1.0f + expf(-v)); }
DEVICE_FN float frsqrt(float v) { return rsqrtf(v); }
DEVICE_FN float fsoftplus(float v) { return fmaxf(v, 0.0f) + log1pf(expf(-fabsf(v))); }
DEVICE_FN float shfl_xor(float v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }
DEVICE_FN void warp_sync() { __syncwarp(); }
DEVICE_FN float warp_sum(float v) {
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}
DEVICE_FN float4 f4(float a, float b, float c, float d) { return make_float4(a, b, c, d); }
template <typename U> DEVICE_FN void ld8(const U* p, float* o) {
  for (int j = 0; j < 8; ++j) o[j] = static_cast<float>(p[j]);
}
DEVICE_FN void ld8(const __nv_bfloat16* p, float* o) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  const unsigned int w[4] = {v.x, v.y, v.z, v.w};
  for (int j = 0; j < 4; ++j) {
    o[2 * j] = __uint_as_float(w[j] << 16);
    o[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
  }
}
DEVICE_FN void ld8(const __half* p, float* o) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&v);
  for (int j = 0; j < 4; ++j) {
    const float2 f = __half22float2(h[j]);
    o[2 * j] = f.x;
    o[2 * j + 1] = f.y;
  }
}
template <typename U> struct Raw8 { U v[8]; };
template <> struct Raw8<__nv_bfloat16> { uint4 q; };
template <> struct Raw8<__half> { uint4 q; };
template <typename U> DEVICE_FN Raw8<U> ldr8(const U* p) {
  Raw8<U> r;
  for (int j = 0; j < 8; ++j) r.v[j] = p[j];
  return r;
}
DEVICE_FN Raw8<__nv_bfloat16> ldr8(const __nv_bfloat16* p) {
  Raw8<__nv_bfloat16> r;
  r.q = __ldg(reinterpret_cast<const uint4*>(p));
  return r;
}
DEVICE_FN Raw8<__half> ldr8(const __half* p) {
  Raw8<__half> r;
  r.q = __ldg(reinterpret_cast<const uint4*>(p));
  return r;
}
template <typename U> DEVICE_FN void cvt8(const Raw8<U>& r, float* o) {
  for (int j = 0; j < 8; ++j) o[j] = static_cast<float>(r.v[j]);
}
DEVICE_FN void cvt8(const Raw8<__nv_bfloat16>& r, float* o) {
  const unsigned int w[4] = {r.q.x, r.q.y, r.q.z, r.q.w};
  for (int j = 0; j < 4; ++j) {
    o[2 * j] = __uint_as_float(w[j] << 16);
    o[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
  }
}
DEVICE_FN void cvt8(const Raw8<__half>& r, float* o) {
  const __half2* h = reinterpret_cast<const __half2*>(&r.q);
  for (int j = 0; j < 4; ++j) {
    const float2 f = __half22float2(h[j]);
    o[2 * j] = f.x;
    o[2 * j + 1] = f.y;
  }
}
template <typename U> DEVICE_FN void str8(const Raw8<U>& r, U* p) {
  for (int j = 0; j < 8; ++j) p[j] = r.v[j];
}
DEVICE_FN void str8(const Raw8<__nv_bfloat16>& r, __nv_bfloat16* p) { *reinterpret_cast<uint4*>(p) = r.q; }
DEVICE_FN void str8(const Raw8<__half>& r, __half* p) { *reinterpret_cast<uint4*>(p) = r.q; }
template <typename U> DEVICE_FN void st8(U* p, const float* o) {
  for (int j = 0; j < 8; ++j) p[j] = static_cast<U>(o[j]);
}
DEVICE_FN void st8(__nv_bfloat16* p, const float* o) {
  uint4 v;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
  for (int j = 0; j < 4; ++j) h[j] = __floats2bfloat162_rn(o[2 * j], o[2 * j + 1]);
  *reinterpret_cast<uint4*>(p) = v;
}
DEVICE_FN void st8(__half* p, const float* o) {
  uint4 v;
  __half2* h = reinterpret_cast<__half2*>(&v);
  for (int j = 0; j < 4; ++j) h[j] = __floats2half2_rn(o[2 * j], o[2 * j + 1]);
  *reinterpret_cast<uint4*>(p) = v;
}
template <typename U> DEVICE_FN void st2(U* p, float a, float b) {
  p[0] = static_cast<U>(a);
  p[1] = static_cast<U>(b);
}
DEVICE_FN void st2(__nv_bfloat16* p, float a, float b) { *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b); }
DEVICE_FN void st2(__half* p, float a, float b) { *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b); }
template <typename U> struct Raw4 { U v[4]; };
template <> struct Raw4<__nv_bfloat16> { uint2 q; };
template <> struct Raw4<__half> { uint2 q; };
template <typename U> DEVICE_FN Raw4<U> ldr4(const U* p) {
  Raw4<U> r;
  for (int j = 0; j < 4; ++j) r.v[j] = p[j];
  return r;
}
DEVICE_FN Raw4<__nv_bfloat16> ldr4(const __nv_bfloat16* p) {
  Raw4<__nv_bfloat16> r;
  r.q = __ldg(reinterpret_cast<const uint2*>(p));
  return r;
}
DEVICE_FN Raw4<__half> ldr4(const __half* p) {
  Raw4<__half> r;
  r.q = __ldg(reinterpret_cast<const uint2*>(p));
  return r;
}
template <typename U> DEVICE_FN void cvt4(const Raw4<U>& r, float* o) {
  for (int j = 0; j < 4; ++j) o[j] = static_cast<float>(r.v[j]);
}
DEVICE_FN void cvt4(const Raw4<__nv_bfloat16>& r, float* o) {
  const unsigned int w[2] = {r.q.x, r.q.y};
  for (int j = 0; j < 2; ++j) {
    o[2 * j] = __uint_as_float(w[j] << 16);
    o[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
  }
}
DEVICE_FN void cvt4(const Raw4<__half>& r, float* o) {
  const __half2* h = reinterpret_cast<const __half2*>(&r.q);
  for (int j = 0; j < 2; ++j) {
    const float2 f = __half22float2(h[j]);
    o[2 * j] = f.x;
    o[2 * j + 1] = f.y;
  }
}
template <typename U> DEVICE_FN void st4(U* p, const float* o) {
  for (int j = 0; j < 4; ++j) p[j] = static_cast<U>(o[j]);
}
DEVICE_FN void st4(__nv_bfloat16* p, const float* o) {
  uint2 v;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
  for (int j = 0; j < 2; ++j) h[j] = __floats2bfloat162_rn(o[2 * j], o[2 * j + 1]);
  *reinterpret_cast<uint2*>(p) = v;
}
DEVICE_FN void st4(__half* p, const float* o) {
  uint2 v;
  __half2* h = reinterpret_cast<__half2*>(&v);
  for (int j = 0; j < 2; ++j) h[j] = __floats2half2_rn(o[2 * j], o[2 * j + 1]);
  *reinterpret_cast<uint2*>(p) = v;
}
DEVICE_FN void st4(float* p, const float* o) { *reinterpret_cast<float4*>(p) = make_float4(o[0], o[1], o[2], o[3]); }
DEVICE_FN float ld_cg(const float* p) { return __ldcg(p); }
ALLOY_ACC16_LOOPStemplate <typename U> DEVICE_FN unsigned int alloy_pack2(U lo, U hi) {
  return static_cast<unsigned int>(*reinterpret_cast<const unsigned short*>(&lo))
       | (static_cast<unsigned int>(*reinterpret_cast<const unsigned short*>(&hi)) << 16);
}
DEVICE_FN void alloy_mma_m16n8k16(float* c, const unsigned int* a, unsigned int b0, unsigned int b1, const __nv_bfloat16*) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
DEVICE_FN void alloy_mma_m16n8k16(float* c, const unsigned int* a, unsigned int b0, unsigned int b1, const __half*) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <typename U> DEVICE_FN unsigned int alloy_ld2(const U* p) { return *reinterpret_cast<const unsigned int*>(p); }
template <typename U> DEVICE_FN void alloy_frag_a(unsigned int* a, const U* A, int lda, unsigned int lane) {
  const int g = static_cast<int>(lane >> 2), t = static_cast<int>(lane & 3u);
  a[0] = alloy_ld2(A + g * lda + 2 * t);
  a[1] = alloy_ld2(A + (g + 8) * lda + 2 * t);
  a[2] = alloy_ld2(A + g * lda + 2 * t + 8);
  a[3] = alloy_ld2(A + (g + 8) * lda + 2 * t + 8);
}
template <typename U> DEVICE_FN void alloy_mma16_tc(Acc16& acc, const U* A, int lda, const U* B, int ldb, unsigned int lane) {
  const int g = static_cast<int>(lane >> 2), t = static_cast<int>(lane & 3u);
  unsigned int a[4];
  alloy_frag_a(a, A, lda, lane);
  for (int h = 0; h < 2; ++h) {
    const int n = 8 * h + g;
    alloy_mma_m16n8k16(acc.c + 4 * h, a, alloy_pack2(B[(2 * t) * ldb + n], B[(2 * t + 1) * ldb + n]),
                       alloy_pack2(B[(2 * t + 8) * ldb + n], B[(2 * t + 9) * ldb + n]), A);
  }
}
template <typename U> DEVICE_FN void alloy_mma16t_tc(Acc16& acc, const U* A, int lda, const U* Bt, int ldb, unsigned int lane) {
  const int g = static_cast<int>(lane >> 2), t = static_cast<int>(lane & 3u);
  unsigned int a[4];
  alloy_frag_a(a, A, lda, lane);
  for (int h = 0; h < 2; ++h) {
    const U* row = Bt + (8 * h + g) * ldb + 2 * t;
    alloy_mma_m16n8k16(acc.c + 4 * h, a, alloy_ld2(row), alloy_ld2(row + 8), A);
  }
}
DEVICE_FN void mma16(Acc16& acc, const __nv_bfloat16* A, int lda, const __nv_bfloat16* B, int ldb, unsigned int lane) {
  alloy_mma16_tc(acc, A, lda, B, ldb, lane);
}
DEVICE_FN void mma16(Acc16& acc, const __half* A, int lda, const __half* B, int ldb, unsigned int lane) {
  alloy_mma16_tc(acc, A, lda, B, ldb, lane);
}
DEVICE_FN void mma16t(Acc16& acc, const __nv_bfloat16* A, int lda, const __nv_bfloat16* Bt, int ldb, unsigned int lane) {
  alloy_mma16t_tc(acc, A, lda, Bt, ldb, lane);
}
DEVICE_FN void mma16t(Acc16& acc, const __half* A, int lda, const __half* Bt, int ldb, unsigned int lane) {
  alloy_mma16t_tc(acc, A, lda, Bt, ldb, lane);
}
// Frag16 of bf16 / fp16: the a-operand registers of mma.sync.m16n8k16 (alloy_frag_a), loaded once
template <> struct Frag16<__nv_bfloat16> { unsigned int a[4]; };
template <> struct Frag16<__half> { unsigned int a[4]; };
// ldmatrix.x4 (.trans): lane l gives the shared-memory address of row l & 7 of 8 x 8 matrix l >> 3;
// register j gets matrix j's element pair (row lane >> 2, columns 2 (lane & 3), + 1), transposed with trans
DEVICE_FN void alloy_ldsm4(unsigned int* r, const void* p, bool trans) {
  const unsigned int a = static_cast<unsigned int>(__cvta_generic_to_shared(p));
  if (trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
// B row-major [k][n] (group-shared, rows 16-byte aligned): b-fragments of both 8-column halves by one
// ldmatrix.x4.trans (matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15))
template <typename U> DEVICE_FN void alloy_mma16_f_tc(Acc16& acc, const unsigned int* a, const U* B, int ldb, unsigned int lane) {
  const int m = static_cast<int>(lane >> 3), r = static_cast<int>(lane & 7u);
  unsigned int b[4];
  alloy_ldsm4(b, B + (8 * (m & 1) + r) * ldb + 8 * (m >> 1), true);
  alloy_mma_m16n8k16(acc.c, a, b[0], b[1], B);
  alloy_mma_m16n8k16(acc.c + 4, a, b[2], b[3], B);
}
template <typename U> DEVICE_FN void alloy_mma16t_f_tc(Acc16& acc, const unsigned int* a, const U* Bt, int ldb, unsigned int lane) {
  const int g = static_cast<int>(lane >> 2), t = static_cast<int>(lane & 3u);
  for (int h = 0; h < 2; ++h) {
    const U* row = Bt + (8 * h + g) * ldb + 2 * t;
    alloy_mma_m16n8k16(acc.c + 4 * h, a, alloy_ld2(row), alloy_ld2(row + 8), Bt);
  }
}
DEVICE_FN void lda16(Frag16<__nv_bfloat16>& f, const __nv_bfloat16* A, int lda, unsigned int lane) { alloy_frag_a(f.a, A, lda, lane); }
DEVICE_FN void lda16(Frag16<__half>& f, const __half* A, int lda, unsigned int lane) { alloy_frag_a(f.a, A, lda, lane); }
// A given transposed, At [k][m] (group-shared, rows 16-byte aligned): a-fragments (m 0-7, k 0-7), (m 8-15,
// k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15) by one ldmatrix.x4.trans
template <typename U> DEVICE_FN void alloy_frag_at(unsigned int* a, const U* At, int lda, unsigned int lane) {
  const int m = static_cast<int>(lane >> 3), r = static_cast<int>(lane & 7u);
  alloy_ldsm4(a, At + (8 * (m >> 1) + r) * lda + 8 * (m & 1), true);
}
DEVICE_FN void lda16t(Frag16<__nv_bfloat16>& f, const __nv_bfloat16* At, int lda, unsigned int lane) { alloy_frag_at(f.a, At, lda, lane); }
DEVICE_FN void lda16t(Frag16<__half>& f, const __half* At, int lda, unsigned int lane) { alloy_frag_at(f.a, At, lda, lane); }
DEVICE_FN void mma16_f(Acc16& acc, const Frag16<__nv_bfloat16>& f, const __nv_bfloat16* B, int ldb, unsigned int lane) {
  alloy_mma16_f_tc(acc, f.a, B, ldb, lane);
}
DEVICE_FN void mma16_f(Acc16& acc, const Frag16<__half>& f, const __half* B, int ldb, unsigned int lane) {
  alloy_mma16_f_tc(acc, f.a, B, ldb, lane);
}
DEVICE_FN void mma16t_f(Acc16& acc, const Frag16<__nv_bfloat16>& f, const __nv_bfloat16* Bt, int ldb, unsigned int lane) {
  alloy_mma16t_f_tc(acc, f.a, Bt, ldb, lane);
}
DEVICE_FN void mma16t_f(Acc16& acc, const Frag16<__half>& f, const __half* Bt, int ldb, unsigned int lane) {
  alloy_mma16t_f_tc(acc, f.a, Bt, ldb, lane);
}
DEVICE_FN unsigned int alloy_atom_add_acq_rel(unsigned int* p, unsigned int v) {
  unsigned int old;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
}
DEVICE_FN unsigned int alloy_ld_acquire(const unsigned int* p) {
  unsigned int v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
DEVICE_FN void alloy_red_release(unsigned int* p, unsigned int v) {
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}
#ifndef ALLOY_GSYNC
#define ALLOY_GSYNC 1
#endif
// grid_arrive / grid_wait: the two halves of a grid-wide barrier; between them a group may issue
// loads that do not depend on other groups' writes (weights), which then overlap the wait.
// ALLOY_GSYNC picks the arrival / wait scheme (bench/stack_probe.py times them):
//   0  two-level: 16 sub-counters (own 128-byte lines), the last of each on a top counter, the
//      last of all stores the round to a release word everyone polls (acquire/release atomics)
//   1  flat: a release reduction (no reply awaited) on one counter, acquire polls of that counter
//   2  flat, cooperative-groups style: fence, relaxed atomic add, volatile polls, fence
//   3  release reductions on an arrival line; group 0 alone polls it and releases the round on
//      another line that the other groups poll (pollers do not queue behind arrivals)
// Polls are bounded: a grid that is not all resident returns wrong values instead of hanging.
DEVICE_FN void grid_arrive(const unsigned int* counter, unsigned int target, unsigned int t) {
  __syncthreads();  // the group's writes are ordered before thread 0's arrival
  if (t == 0) {
    unsigned int* c = const_cast<unsigned int*>(counter);
#if ALLOY_GSYNC == 1 || ALLOY_GSYNC == 3
    alloy_red_release(c + 32u, 1u);
#elif ALLOY_GSYNC == 2
    __threadfence();
    atomicAdd(c + 32u, 1u);
#else
    const unsigned int G = gridDim.x * gridDim.y * gridDim.z;
    const unsigned int round = target / G;
    const unsigned int g = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const unsigned int nsub = G < 16u ? G : 16u;
    const unsigned int s = g % nsub;
    const unsigned int members = G / nsub + (s < G % nsub ? 1u : 0u);
    if (alloy_atom_add_acq_rel(c + 32u * (2u + s), 1u) + 1u == round * members) {
      if (alloy_atom_add_acq_rel(c + 32u, 1u) + 1u == round * nsub) {
        asm volatile("st.release.gpu.global.u32 [%0], %1;" :: "l"(c), "r"(round) : "memory");
      }
    }
#endif
  }
}
DEVICE_FN void grid_wait(const unsigned int* counter, unsigned int target, unsigned int t) {
  if (t == 0) {
    unsigned int* c = const_cast<unsigned int*>(counter);
#if ALLOY_GSYNC == 1
    for (unsigned int k = 0; alloy_ld_acquire(c + 32u) < target && k < (1u << 24); ++k) {
    }
#elif ALLOY_GSYNC == 2
    for (unsigned int k = 0; *reinterpret_cast<volatile unsigned int*>(c + 32u) < target && k < (1u << 24); ++k) {
    }
    __threadfence();
#elif ALLOY_GSYNC == 3
    const unsigned int G = gridDim.x * gridDim.y * gridDim.z;
    if (blockIdx.x + blockIdx.y + blockIdx.z == 0) {
      for (unsigned int k = 0; alloy_ld_acquire(c + 32u) < target && k < (1u << 24); ++k) {
      }
      asm volatile("st.release.gpu.global.u32 [%0], %1;" :: "l"(c), "r"(target / G) : "memory");
    } else {
      for (unsigned int k = 0; alloy_ld_acquire(c) < target / G && k < (1u << 24); ++k) {
      }
    }
#else
    const unsigned int round = target / (gridDim.x * gridDim.y * gridDim.z);
    for (unsigned int k = 0; alloy_ld_acquire(c) < round && k < (1u << 24); ++k) {
    }
#endif
  }
  __syncthreads();
}
DEVICE_FN void grid_sync(const unsigned int* counter, unsigned int target, unsigned int t) {
  grid_arrive(counter, target, t);
  grid_wait(counter, target, t);
}
template <typename U> DEVICE_FN void prefetch_l2(const U* p) { asm volatile("prefetch.global.L2 [%0];" :: "l"(p)); }
"""

_CUDA_HEADER = _CUDA_HEADER.replace("ALLOY_ACC16_LOOPS", ACC16_LOOPS)

_METAL_HEADER = """\
#define SHARED threadgroup
#define BARRIER() metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup)
#define DEVICE_FN inline
#define DEV device
#define ALIGN16 alignas(16)
DEVICE_FN float fexp(float v) { return metal::exp(v); }
DEVICE_FN float fsilu(float v) { return v / (1.0f + metal::exp(-v)); }
DEVICE_FN float frsqrt(float v) { return metal::rsqrt(v); }
DEVICE_FN float fsoftplus(float v) { return metal::max(v, 0.0f) + metal::log(1.0f + metal::exp(-metal::abs(v))); }
DEVICE_FN float shfl_xor(float v, int m) { return metal::simd_shuffle_xor(v, ushort(m)); }
DEVICE_FN void warp_sync() { metal::simdgroup_barrier(metal::mem_flags::mem_threadgroup); }
DEVICE_FN float warp_sum(float v) { return metal::simd_sum(v); }
DEVICE_FN float4 f4(float a, float b, float c, float d) { return float4(a, b, c, d); }
template <typename U> DEVICE_FN void ld8(const device U* p, thread float* o) {
  for (int j = 0; j < 8; ++j) o[j] = static_cast<float>(p[j]);
}
template <typename U> DEVICE_FN void ld8(const threadgroup U* p, thread float* o) {
  for (int j = 0; j < 8; ++j) o[j] = static_cast<float>(p[j]);
}
template <typename U> struct Raw8 { U v[8]; };
template <typename U> DEVICE_FN Raw8<U> ldr8(const device U* p) {
  Raw8<U> r;
  for (int j = 0; j < 8; ++j) r.v[j] = p[j];
  return r;
}
template <typename U> DEVICE_FN void cvt8(Raw8<U> r, thread float* o) {
  for (int j = 0; j < 8; ++j) o[j] = static_cast<float>(r.v[j]);
}
template <typename U> DEVICE_FN void str8(Raw8<U> r, threadgroup U* p) {
  for (int j = 0; j < 8; ++j) p[j] = r.v[j];
}
template <typename U> DEVICE_FN void st8(device U* p, thread const float* o) {
  for (int j = 0; j < 8; ++j) p[j] = static_cast<U>(o[j]);
}
template <typename U> DEVICE_FN void st8(threadgroup U* p, thread const float* o) {
  for (int j = 0; j < 8; ++j) p[j] = static_cast<U>(o[j]);
}
template <typename U> DEVICE_FN void st2(device U* p, float a, float b) {
  p[0] = static_cast<U>(a);
  p[1] = static_cast<U>(b);
}
template <typename U> DEVICE_FN void st2(threadgroup U* p, float a, float b) {
  p[0] = static_cast<U>(a);
  p[1] = static_cast<U>(b);
}
template <typename U> struct Raw4 { U v[4]; };
template <typename U> DEVICE_FN Raw4<U> ldr4(const device U* p) {
  Raw4<U> r;
  for (int j = 0; j < 4; ++j) r.v[j] = p[j];
  return r;
}
template <typename U> DEVICE_FN void cvt4(Raw4<U> r, thread float* o) {
  for (int j = 0; j < 4; ++j) o[j] = static_cast<float>(r.v[j]);
}
template <typename U> DEVICE_FN void st4(device U* p, thread const float* o) {
  for (int j = 0; j < 4; ++j) p[j] = static_cast<U>(o[j]);
}
template <typename U> DEVICE_FN void prefetch_l2(const device U* p) {}
// Acc16 / mma16 / acc_store: the layout of the CUDA dialect, computed by plain loops (no
// simdgroup_matrix yet)
struct Acc16 { float c[8]; };
DEVICE_FN void acc_zero(thread Acc16& a) {
  for (int i = 0; i < 8; ++i) a.c[i] = 0.0f;
}
DEVICE_FN int acc_row(int i, unsigned int lane) { return static_cast<int>(lane >> 2) + 8 * ((i >> 1) & 1); }
DEVICE_FN int acc_col(int i, unsigned int lane) { return 8 * (i >> 2) + 2 * static_cast<int>(lane & 3u) + (i & 1); }
template <typename U> DEVICE_FN void mma16(thread Acc16& acc, const threadgroup U* A, int lda, const threadgroup U* B,
                                           int ldb, unsigned int lane) {
  for (int i = 0; i < 8; ++i) {
    const int r = acc_row(i, lane), c = acc_col(i, lane);
    float s = 0.0f;
    for (int k = 0; k < 16; ++k) s += static_cast<float>(A[r * lda + k]) * static_cast<float>(B[k * ldb + c]);
    acc.c[i] += s;
  }
}
template <typename U> DEVICE_FN void mma16t(thread Acc16& acc, const threadgroup U* A, int lda, const threadgroup U* Bt,
                                            int ldb, unsigned int lane) {
  for (int i = 0; i < 8; ++i) {
    const int r = acc_row(i, lane), c = acc_col(i, lane);
    float s = 0.0f;
    for (int k = 0; k < 16; ++k) s += static_cast<float>(A[r * lda + k]) * static_cast<float>(Bt[c * ldb + k]);
    acc.c[i] += s;
  }
}
// Frag16: the tile's place (tr: stored transposed, [k][m], by lda16t; the products are mma16 / mma16t's)
template <typename U> struct Frag16 { const threadgroup U* p; int ld; bool tr; };
template <typename U> DEVICE_FN void lda16(thread Frag16<U>& f, const threadgroup U* A, int lda, unsigned int lane) {
  f.p = A;
  f.ld = lda;
  f.tr = false;
}
template <typename U> DEVICE_FN void lda16t(thread Frag16<U>& f, const threadgroup U* At, int lda, unsigned int lane) {
  f.p = At;
  f.ld = lda;
  f.tr = true;
}
template <typename U> DEVICE_FN float frag_at(thread const Frag16<U>& f, int r, int k) {
  return static_cast<float>(f.tr ? f.p[k * f.ld + r] : f.p[r * f.ld + k]);
}
template <typename U> DEVICE_FN void mma16_f(thread Acc16& acc, thread const Frag16<U>& f, const threadgroup U* B, int ldb,
                                             unsigned int lane) {
  for (int i = 0; i < 8; ++i) {
    const int r = acc_row(i, lane), c = acc_col(i, lane);
    float s = 0.0f;
    for (int k = 0; k < 16; ++k) s += frag_at(f, r, k) * static_cast<float>(B[k * ldb + c]);
    acc.c[i] += s;
  }
}
template <typename U> DEVICE_FN void mma16t_f(thread Acc16& acc, thread const Frag16<U>& f, const threadgroup U* Bt,
                                              int ldb, unsigned int lane) {
  for (int i = 0; i < 8; ++i) {
    const int r = acc_row(i, lane), c = acc_col(i, lane);
    float s = 0.0f;
    for (int k = 0; k < 16; ++k) s += frag_at(f, r, k) * static_cast<float>(Bt[c * ldb + k]);
    acc.c[i] += s;
  }
}
template <typename V> DEVICE_FN void acc_store(thread const Acc16& acc, threadgroup V* C, int ldc, unsigned int lane) {
  for (int i = 0; i < 8; ++i) C[acc_row(i, lane) * ldc + acc_col(i, lane)] = static_cast<V>(acc.c[i]);
}
template <typename V> DEVICE_FN void acc_store(thread const Acc16& acc, device V* C, int ldc, unsigned int lane) {
  for (int i = 0; i < 8; ++i) C[acc_row(i, lane) * ldc + acc_col(i, lane)] = static_cast<V>(acc.c[i]);
}
DEVICE_FN float ld_cg(const device float* p) { return *reinterpret_cast<const volatile device float*>(p); }
DEVICE_FN void grid_arrive(const device unsigned int* counter, unsigned int target, unsigned int t) {
  metal::threadgroup_barrier(metal::mem_flags::mem_device | metal::mem_flags::mem_threadgroup);
  if (t == 0) metal::atomic_fetch_add_explicit((device metal::atomic_uint*)counter, 1u, metal::memory_order_relaxed);
}
DEVICE_FN void grid_wait(const device unsigned int* counter, unsigned int target, unsigned int t) {
  if (t == 0) {
    device metal::atomic_uint* c = (device metal::atomic_uint*)counter;
    for (unsigned int k = 0; metal::atomic_load_explicit(c, metal::memory_order_relaxed) < target && k < (1u << 24); ++k) {
    }
  }
  metal::threadgroup_barrier(metal::mem_flags::mem_device | metal::mem_flags::mem_threadgroup);
}
DEVICE_FN void grid_sync(const device unsigned int* counter, unsigned int target, unsigned int t) {
  grid_arrive(counter, target, t);
  grid_wait(counter, target, t);
}
"""

# tokens that must never appear in a portable body (they belong to one dialect only)
DIALECT_TOKENS = {
    "cuda": ("threadIdx", "blockIdx", "blockDim", "__syncthreads", "__shared__", "__shfl",
             "__device__", "expf("),
    "metal": ("thread_position_in", "threadgroup_position_in", "threads_per_threadgroup",
              "simdgroup_index", "thread_index_in_simdgroup", "threadgroup_barrier",
              "simd_sum", "simd_shuffle", "metal::", "device ", "constant "),
}


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A portable kernel: `body` and `helpers` are written once, in the portable dialect.

    name: kernel name (MLX appends template values); inputs / outputs: parameter names;
    helpers: DEVICE_FN functions placed in the header after the prelude macros.
    """

    name: str
    inputs: tuple
    outputs: tuple
    body: str
    helpers: str = ""
    launch_bounds: tuple = ()  # CUDA only: (threads per group, min resident groups per SM)

    def __post_init__(self):
        for d, toks in DIALECT_TOKENS.items():
            for tok in toks:
                if tok in self.body or tok in self.helpers:
                    raise ValueError(f"kernel {self.name}: portable body uses {d}-only token {tok!r}")
        if re.search(r"\buint\b", self.body + self.helpers):
            raise ValueError(f"kernel {self.name}: use 'unsigned int', not 'uint' (CUDA has no uint)")

    def source(self, dialect: str) -> tuple[str, str]:
        """(header, body) for `dialect` ("cuda" or "metal"): prelude + the shared body."""
        if dialect not in DIALECTS:
            raise ValueError(f"dialect must be one of {DIALECTS}, got {dialect!r}")
        col = DIALECTS.index(dialect)
        used = [k for k in _INDEX if re.search(rf"\b{k}\b", self.body)]
        index_lines = "".join(f"  const unsigned int {k} = {_INDEX[k][col]};\n" for k in used)
        header = (_CUDA_HEADER if dialect == "cuda" else _METAL_HEADER) + self.helpers
        if dialect == "cuda" and os.environ.get("ALLOY_GRID_SYNC"):
            # experiments: the grid barrier's scheme (see grid_sync in the CUDA header)
            header = f"#define ALLOY_GSYNC {int(os.environ['ALLOY_GRID_SYNC'])}\n" + header
        if dialect == "cuda" and self.launch_bounds:
            # MLX writes the `__global__` signature itself: re-spell the qualifier for this module so
            # the compiler caps registers for the resident groups a persistent kernel needs
            nt, minb = self.launch_bounds
            header += ("#undef __global__\n#define __global__ __attribute__((global)) "
                       f"__attribute__((launch_bounds({int(nt)}, {int(minb)})))\n")
        return header, index_lines + self.body

    def build(self, dialect: str):
        """The MLX kernel object for `dialect` (cached per kernel and dialect)."""
        return _build(self, dialect)

    def __call__(self, inputs: Sequence[mx.array], *, template, grid, threadgroup,
                 output_shapes, output_dtypes, init_value=None):
        """Launch on the running GPU backend. grid: groups per axis (x, y, z);
        threadgroup: threads per group along x (1-D groups)."""
        kern = self.build(backend())
        gx, gy, gz = grid
        return kern(
            inputs=list(inputs),
            template=list(template),
            grid=(gx * threadgroup, gy, gz),
            threadgroup=(threadgroup, 1, 1),
            output_shapes=list(output_shapes),
            output_dtypes=list(output_dtypes),
            init_value=init_value,
        )


_CACHE: dict = {}


def _build(kernel: Kernel, dialect: str):
    key = (kernel, dialect, os.environ.get("ALLOY_GRID_SYNC"))
    if key not in _CACHE:
        header, body = kernel.source(dialect)
        make = mx.fast.cuda_kernel if dialect == "cuda" else mx.fast.metal_kernel
        _CACHE[key] = make(name=kernel.name, input_names=list(kernel.inputs),
                           output_names=list(kernel.outputs), source=body, header=header)
    return _CACHE[key]


def backend() -> str | None:
    """"cuda" or "metal" when the default device is a GPU of that backend, else None.

    A static fact (no array is read): the dispatchers use it to pick the kernel path.
    ALLOY_NO_KERNELS=1 in the environment switches every kernel path off (A/B checks)."""
    if os.environ.get("ALLOY_NO_KERNELS") == "1" or mx.default_device() != mx.gpu:
        return None
    if mx.cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return None


# `helpers` for kernels that move VW consecutive elements per thread (a template int VW, 8 or 1, and
# the element type T): LDV(p, o, v) reads p[o..o+VW) into float v[VW], STV(p, o, v) writes them back
# converted; VW = 8 is one 16-byte access for bf16 / fp16 (o a multiple of 8).
VEC_IO = """
#define LDV(p, o, v) if (VW == 8) { ld8(p + (o), v); } else { v[0] = static_cast<float>(p[o]); }
#define STV(p, o, v) if (VW == 8) { st8(p + (o), v); } else { p[o] = static_cast<T>(v[0]); }
"""


def fits_int32(*dims: int) -> bool:
    """Whether an array of these dimensions can be indexed with 32-bit ints (kernels that use `int`
    offsets: element count below 2^31)."""
    n = 1
    for d in dims:
        n *= int(d)
    return n < 2**31


def groups(n: int, size: int) -> int:
    """Number of groups of `size` covering `n` work items."""
    return max(1, -(-n // size))


def sum_rows(v: mx.array) -> mx.array:
    """(R, N) -> (N,): the sum over rows of per-work-item shares (e.g. a weight gradient's float32
    partial sums), as two column reductions of moderate length when R is large: (a, R/a, N) summed
    over its middle axis, then over a. MLX-CUDA runs one column reduction of a few thousand rows
    by N/32 thread blocks only (0.1-0.3 ms for a 768- to 9K-column float32 share array on an H100;
    the toy train step's profile, docs/benchmarks.md session 8); split, the first pass has a*N/32."""
    R = v.shape[0]
    a = max((d for d in range(1, int(R ** 0.5) + 1) if R % d == 0), default=1)
    if R <= 64 or a < 8:
        return v.sum(axis=0)
    return v.reshape(a, R // a, *v.shape[1:]).sum(axis=1).sum(axis=0)

"""CPU emulator for the portable kernels of `alloy.metal`: test a kernel body without a GPU.

A `Kernel` body (see `alloy.metal.prelude`) is compiled as plain C++20 with g++ against a CPU
"dialect" header that defines every portable name of the prelude, and run with one real OS thread
per GPU thread:

    out = emulate.run(KERNEL, inputs, template=[...], grid=(gx, gy, gz), threadgroup=128,
                      output_shapes=[...], output_dtypes=[...])          # Kernel.__call__'s arguments
    with emulate.patch(alloy.metal.gemv):                                # or: the module's launcher,
        y = alloy.metal.gemv.gemv(x, W)                                  # its KERNEL(...) emulated

`run` returns a list of `mx.array` of the requested dtypes (bf16 outputs as mx.bfloat16 arrays,
bit-exact), so results compare directly with MLX references on the CPU.

Execution model
    * every thread of a group runs concurrently; `BARRIER()` is a barrier of the group's threads,
      `warp_sum` / `shfl_xor` exchange through a per-warp buffer behind a barrier of its 32 lanes
      (warp_sum adds in the CUDA butterfly order, so results are bit-identical to the CUDA
      prelude's), `SHARED` declarations are rewritten into per-group arena memory (zeroed; NaN
      bytes with poison=True).
    * groups run in waves of at most `max_threads` threads. A body (or helper) that calls
      `grid_sync` runs its whole grid at once (an error if that exceeds `max_threads`), and
      grid_sync is a barrier of every thread of the grid; the counter is incremented by thread 0
      of each group as on the GPU, and the emulator checks that the target equals the counter
      when the last group arrives (a larger target would spin forever on the GPU, a smaller one
      lets groups through early) — both raise `EmulatorError`.
    * threads that return early leave every barrier (as exited GPU threads do); when every live
      thread waits at a barrier that can no longer complete, the launch stops with a deadlock
      report instead of hanging. `warp_sum` / `shfl_xor` reading a lane that did not make the
      same warp op (it returned, or the warp diverged) raise.
    * schedule="threads" (default) lets the OS interleave threads freely; "forward" / "reverse"
      run ONE thread at a time in thread order (reverse: last thread first), switching only at
      barriers: deterministic, and a missing barrier shows up as a wrong result every time
      (a reader runs before the writer it should have waited for).
    * every input and output buffer sits between 16 KiB guard zones of 0xFF bytes (NaN as float):
      reads past a buffer see NaN, writes past it raise `EmulatorError` after the run.
      `ld8` on bf16 / fp16 checks the 16-byte alignment that CUDA's vector load needs (`ldr4` / `st4`:
      8 bytes; `st4` to float: 16).
    * outputs start as `init_value` when given, else zero (MLX leaves them uninitialised on the
      GPU: poison=True fills them with NaN bytes instead, to catch unwritten elements).

Types: float32 -> float, float16 -> _Float16, bfloat16 -> `alloy_bf16` (a 16-bit struct:
`static_cast<float>` exact, `static_cast<T>(float)` rounds to nearest even, arithmetic promotes
to float), int32 -> int32_t, uint32 -> uint32_t, ... (`_TYPES`). Inputs arrive as
`const T* name`, outputs as `U* name`, `<name>_shape` (const int*), `<name>_strides`
(const int64_t*, elements) and `<name>_ndim` (int) when the body mentions them, template
arguments as `constexpr int` / `constexpr bool` / `using` in the body's function, the index
names as `const unsigned int` locals (only those the body uses, as in the prelude).

Build: the thread runtime (barriers, warp exchange, scheduling) is one shared object compiled once;
each kernel's translation unit (`source`: the dialect header, the helpers, one C++ function per
thread, template arguments baked in) is compiled with `g++ -std=c++20 -O1 -pthread -shared -fPIC`
(~0.3 s), cached by a hash of its text, and loaded with ctypes. When the prelude gains a name the
CPU dialect lacks, compilation fails and the error names it (`missing_names()`).

Limits: one process, no isolation: a wild pointer far outside the guard zones crashes Python,
an endless loop in a body hangs (only barrier deadlocks are detected). Races are only found when
the interleaving exposes them (use schedule="forward" / "reverse"). Float math is the host's
(expf, 1/sqrtf): equal to the GPU up to a few ulp. g++ (C++20, with _Float16: g++ >= 12 on
x86-64) is needed: `available()`; ALLOY_EMULATE_CXX picks the compiler, ALLOY_EMULATE_CACHE the
directory of compiled kernels (default <tmp>/alloy-emulate, keyed by a hash of the source).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np

from alloy.metal import prelude
from alloy.metal.prelude import Kernel

__all__ = ["available", "run", "source", "emulated", "patch", "missing_names", "EmulatorError",
           "EmulatorCompileError"]

FLAGS = ("-std=c++20", "-O1", "-pthread", "-shared", "-fPIC")
GUARD = 16384  # bytes of 0xFF before and after every buffer
SCHEDULES = {"threads": 0, "forward": 1, "reverse": 2}
_STACK = 1 << 20  # bytes of stack per emulated thread


class EmulatorError(RuntimeError):
    """A kernel misbehaved under emulation: deadlock, bad grid_sync target, out-of-bounds write, ..."""


class EmulatorCompileError(EmulatorError):
    """g++ rejected the generated translation unit (the message holds the compiler's output)."""


def _cxx() -> str:
    return os.environ.get("ALLOY_EMULATE_CXX", "g++")


def available() -> bool:
    """True when the C++ compiler the emulator needs is on PATH."""
    return shutil.which(_cxx()) is not None


# ---------------------------------------------------------------------------------------------
# dtypes: canonical name -> (C++ type, numpy storage dtype)
_TYPES = {
    "float32": ("float", np.float32),
    "float16": ("alloy_half", np.float16),
    "bfloat16": ("alloy_bf16", np.uint16),  # stored as its bits
    "float64": ("double", np.float64),
    "int8": ("int8_t", np.int8),
    "int16": ("int16_t", np.int16),
    "int32": ("int32_t", np.int32),
    "int64": ("int64_t", np.int64),
    "uint8": ("uint8_t", np.uint8),
    "uint16": ("uint16_t", np.uint16),
    "uint32": ("uint32_t", np.uint32),
    "uint64": ("uint64_t", np.uint64),
    "bool": ("bool", np.bool_),
}


def _dtype_name(dt) -> str:
    if isinstance(dt, mx.Dtype):
        name = str(dt).rsplit(".", 1)[-1]
    else:
        name = np.dtype(dt).name
    if name not in _TYPES:
        raise TypeError(f"emulate: unsupported dtype {dt!r}")
    return name


def _ctype(dt) -> str:
    return _TYPES[dt if isinstance(dt, str) and dt in _TYPES else _dtype_name(dt)][0]


def _mx_dtype(name: str):
    return getattr(mx, "bool_" if name == "bool" else name)


# ---------------------------------------------------------------------------------------------
# The C++ side. _ABI is shared by the runtime and every kernel translation unit.
_ABI = r"""
#include <cstddef>
#include <cstdint>
struct alloy_emu_ops {
  void (*barrier)(void* rt);
  float (*shfl_xor)(void* rt, float v, int m);
  float (*warp_sum)(void* rt, float v);
  void* (*shm)(void* rt, int idx, size_t bytes);
  void (*grid_sync)(void* rt, const unsigned int* counter, unsigned int target, unsigned int t);
  [[noreturn]] void (*fail)(void* rt, const char* msg);
};
struct alloy_emu_thread {
  void* rt;
  const alloy_emu_ops* ops;
  void* const* bufs;        // inputs, then outputs
  const int32_t* shapes;    // 8 per input
  const int64_t* strides;   // 8 per input
  const int32_t* ndims;
  unsigned int tid, bid_x, bid_y, bid_z, nthreads;
};
"""

# The CPU dialect. It must define every name of prelude._CUDA_HEADER / _METAL_HEADER:
#   SHARED (rewritten by `_rewrite_shared`; a leftover is an error)  BARRIER()  DEVICE_FN  DEV  ALIGN16
#   fexp fsilu frsqrt fsoftplus  shfl_xor warp_sum warp_sync  f4 / float4 (.x .y .z .w)  ld8  ldr8 / cvt8 / str8 / Raw8  st8 st2  ldr4 / cvt4 / Raw4 st4  ld_cg  grid_sync  grid_arrive / grid_wait  prefetch_l2  Acc16 acc_zero mma16 mma16t Frag16 lda16 lda16t frag_at mma16_f mma16t_f acc_store acc_row acc_col
# and the index names of prelude._INDEX (see _INDEX_CPU). A name the prelude gains goes here
# (a DEVICE_FN function; runtime services through alloy_emu_self->ops, see _RUNTIME).
_DIALECT = r"""
#include <cmath>
#include <cstring>
#include <type_traits>

using alloy_half = _Float16;

struct alloy_bf16 {  // bfloat16: the upper 16 bits of a float32
  uint16_t bits;
  alloy_bf16() = default;
  template <class U, class = std::enable_if_t<std::is_arithmetic_v<U>>>
  alloy_bf16(U v) : bits(round(static_cast<float>(v))) {}
  alloy_bf16(_Float16 v) : bits(round(static_cast<float>(v))) {}
  operator float() const {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static uint16_t round(float f) {  // round to nearest even; NaN stays a (quiet) NaN
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
  }
  alloy_bf16& operator+=(float v) { return *this = alloy_bf16(float(*this) + v); }
  alloy_bf16& operator-=(float v) { return *this = alloy_bf16(float(*this) - v); }
  alloy_bf16& operator*=(float v) { return *this = alloy_bf16(float(*this) * v); }
  alloy_bf16& operator/=(float v) { return *this = alloy_bf16(float(*this) / v); }
};

struct float2 { float x, y; };
struct float4 { float x, y, z, w; };

static thread_local const alloy_emu_thread* alloy_emu_self;  // the emulated thread running here
[[noreturn]] inline void alloy_emu_fail(const char* msg) { alloy_emu_self->ops->fail(alloy_emu_self->rt, msg); }
inline void* alloy_emu_shm(int idx, size_t bytes) { return alloy_emu_self->ops->shm(alloy_emu_self->rt, idx, bytes); }

#define SHARED alloy_emu_unsupported_SHARED_declaration  // declarations are rewritten before this
#define BARRIER() (alloy_emu_self->ops->barrier(alloy_emu_self->rt))
#define DEVICE_FN inline
#define ALIGN16  // SHARED arrays live in 64-byte aligned arena memory
#define DEV
DEVICE_FN float fexp(float v) { return std::exp(v); }
DEVICE_FN float fsilu(float v) { return v / (1.0f + std::exp(-v)); }
DEVICE_FN float frsqrt(float v) { return 1.0f / std::sqrt(v); }
DEVICE_FN float fsoftplus(float v) { return std::fmax(v, 0.0f) + std::log1p(std::exp(-std::fabs(v))); }
DEVICE_FN float shfl_xor(float v, int m) { return alloy_emu_self->ops->shfl_xor(alloy_emu_self->rt, v, m); }
DEVICE_FN float warp_sum(float v) { return alloy_emu_self->ops->warp_sum(alloy_emu_self->rt, v); }
DEVICE_FN void warp_sync() { (void)alloy_emu_self->ops->warp_sum(alloy_emu_self->rt, 0.0f); }  // the exchange is a warp barrier
DEVICE_FN float4 f4(float a, float b, float c, float d) { return float4{a, b, c, d}; }
// bf16 / fp16 accesses that CUDA makes as one wide word (ld8, ldr8, st8, str8: 16 bytes; st2: 4)
// need that word's alignment there: fail with `msg` where the pointer lacks it
template <typename U> DEVICE_FN void alloy_emu_aligned(const void* p, unsigned int bytes, const char* msg) {
  if constexpr (std::is_same_v<U, alloy_bf16> || std::is_same_v<U, alloy_half>) {
    if (reinterpret_cast<uintptr_t>(p) & (bytes - 1u)) alloy_emu_fail(msg);
  }
}
template <typename U> DEVICE_FN void ld8(const U* p, float* o) {
  alloy_emu_aligned<U>(p, 16u, "ld8: a bf16/fp16 pointer that is not 16-byte aligned (CUDA loads the 8 elements as one uint4)");
  for (int j = 0; j < 8; ++j) o[j] = static_cast<float>(p[j]);
}
template <typename U> struct Raw8 { U v[8]; };
template <typename U> DEVICE_FN Raw8<U> ldr8(const U* p) {
  alloy_emu_aligned<U>(p, 16u, "ldr8: a bf16/fp16 pointer that is not 16-byte aligned (CUDA loads the 8 elements as one uint4)");
  Raw8<U> r;
  for (int j = 0; j < 8; ++j) r.v[j] = p[j];
  return r;
}
template <typename U> DEVICE_FN void cvt8(const Raw8<U>& r, float* o) {
  for (int j = 0; j < 8; ++j) o[j] = static_cast<float>(r.v[j]);
}
template <typename U> DEVICE_FN void st8(U* p, const float* o) {
  alloy_emu_aligned<U>(p, 16u, "st8: a bf16/fp16 pointer that is not 16-byte aligned (CUDA stores the 8 elements as one uint4)");
  for (int j = 0; j < 8; ++j) p[j] = static_cast<U>(o[j]);
}
template <typename U> DEVICE_FN void st2(U* p, float a, float b) {
  alloy_emu_aligned<U>(p, 4u, "st2: a bf16/fp16 pointer that is not 4-byte aligned (CUDA stores the pair as one 32-bit word)");
  p[0] = static_cast<U>(a);
  p[1] = static_cast<U>(b);
}
template <typename U> DEVICE_FN void str8(const Raw8<U>& r, U* p) {
  alloy_emu_aligned<U>(p, 16u, "str8: a bf16/fp16 pointer that is not 16-byte aligned (CUDA stores the 8 elements as one uint4)");
  for (int j = 0; j < 8; ++j) p[j] = r.v[j];
}
template <typename U> struct Raw4 { U v[4]; };
template <typename U> DEVICE_FN Raw4<U> ldr4(const U* p) {
  alloy_emu_aligned<U>(p, 8u, "ldr4: a bf16/fp16 pointer that is not 8-byte aligned (CUDA loads the 4 elements as one uint2)");
  Raw4<U> r;
  for (int j = 0; j < 4; ++j) r.v[j] = p[j];
  return r;
}
template <typename U> DEVICE_FN void cvt4(const Raw4<U>& r, float* o) {
  for (int j = 0; j < 4; ++j) o[j] = static_cast<float>(r.v[j]);
}
template <typename U> DEVICE_FN void st4(U* p, const float* o) {
  alloy_emu_aligned<U>(p, 8u, "st4: a bf16/fp16 pointer that is not 8-byte aligned (CUDA stores the 4 elements as one uint2)");
  if constexpr (std::is_same_v<U, float>) {
    if (reinterpret_cast<uintptr_t>(p) & 15u) alloy_emu_fail("st4: a float pointer that is not 16-byte aligned (CUDA stores the 4 floats as one float4)");
  }
  for (int j = 0; j < 4; ++j) p[j] = static_cast<U>(o[j]);
}
ALLOY_ACC16_LOOPSDEVICE_FN float ld_cg(const float* p) {
  float r;
  __atomic_load(p, &r, __ATOMIC_RELAXED);
  return r;
}
template <typename U> DEVICE_FN void prefetch_l2(const U*) {}
DEVICE_FN void grid_sync(const unsigned int* counter, unsigned int target, unsigned int t) {
  alloy_emu_self->ops->grid_sync(alloy_emu_self->rt, counter, target, t);
}
// the split barrier: the whole barrier happens at grid_wait (loads in between see the same data)
DEVICE_FN void grid_arrive(const unsigned int*, unsigned int, unsigned int) {}
DEVICE_FN void grid_wait(const unsigned int* counter, unsigned int target, unsigned int t) {
  alloy_emu_self->ops->grid_sync(alloy_emu_self->rt, counter, target, t);
}
"""
_DIALECT = _DIALECT.replace("ALLOY_ACC16_LOOPS", prelude.ACC16_LOOPS)  # the loops of the CUDA dialect

# portable index name -> C++ expression over the thread record `alloy_emu_t`
_INDEX_CPU = {
    "tid": "alloy_emu_t->tid",
    "bid_x": "alloy_emu_t->bid_x",
    "bid_y": "alloy_emu_t->bid_y",
    "bid_z": "alloy_emu_t->bid_z",
    "nthreads": "alloy_emu_t->nthreads",
    "lane": "(alloy_emu_t->tid & 31u)",
    "warp": "(alloy_emu_t->tid >> 5)",
}

_RUNTIME = r"""
#include <pthread.h>
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace {

struct Abort {};  // unwinds an emulated thread once the launch is aborted
struct Launch;
struct Thread;

// All barrier state is guarded by the launch's one mutex (simple, and deadlock detection is exact);
// a blocked thread sleeps on its own futex word `go` (no mutex convoy when a phase completes).
struct Barrier {
  int expected = 0, arrived = 0;
  unsigned long phase = 0;
  std::vector<Thread*> waiters;
  std::string name;
  bool grid = false;  // grid_sync bookkeeping: what thread 0 of each group passed this phase
  const unsigned int* counter = nullptr;
  unsigned int target = 0;
  int contributors = 0;
};

struct Group {
  unsigned int bx, by, bz;
  Barrier bar;
  std::vector<Barrier> warp_bar;
  std::vector<float> wbuf;       // per warp two slots (alternate warp ops) of 32 floats
  std::vector<unsigned long> wstamp;  // per slot and lane: the warp op that wrote it
  std::vector<void*> shm;
  std::vector<size_t> shm_bytes;
  ~Group() { for (void* p : shm) std::free(p); }
};

struct Thread {
  alloy_emu_thread info;  // first member: info.rt == this
  Launch* L = nullptr;
  Group* g = nullptr;
  std::atomic<int> go{0};  // set to let the thread run on (released, given the baton, or aborted)
  bool blocked = false;
  Barrier* at = nullptr;
  unsigned long wops = 0;  // warp ops done by this lane
  pthread_t handle{};
};

struct Launch {
  std::mutex m;
  void (*entry)(const alloy_emu_thread*) = nullptr;
  int schedule = 0;  // 0: free threads, 1: one at a time forward, 2: one at a time reverse
  bool poison = false, grid_mode = false;
  std::atomic<bool> aborted{false};
  std::string error;
  int live = 0, blocked = 0;
  std::deque<Thread*> ready;
  Thread* running = nullptr;
  Barrier grid;
  std::vector<std::unique_ptr<Group>> groups;
  std::vector<std::unique_ptr<Thread>> threads;
};

using Lock = std::unique_lock<std::mutex>;

std::string where(const Thread* t) {
  char s[96];
  std::snprintf(s, sizeof s, "thread %u of group (%u,%u,%u)", t->info.tid, t->g->bx, t->g->by, t->g->bz);
  return s;
}

void wake(Thread* t) {
  t->go.store(1, std::memory_order_release);
  t->go.notify_one();
}

void wait_go(Thread* t) {  // lock NOT held
  while (t->go.load(std::memory_order_acquire) == 0) t->go.wait(0, std::memory_order_acquire);
  t->go.store(0, std::memory_order_relaxed);
}

void abort_all(Launch* L, const std::string& msg) {  // lock held
  if (!L->aborted) {
    L->error = msg;
    L->aborted = true;
  }
  for (auto& t : L->threads) wake(t.get());
}

void check_deadlock(Launch* L) {  // lock held
  if (L->aborted || L->live == 0 || L->blocked < L->live) return;
  std::map<std::string, int> at;
  for (auto& t : L->threads)
    if (t->blocked && t->at) at[t->at->name]++;
  std::string msg = "deadlock: every live thread (" + std::to_string(L->live) +
                    ") waits at a barrier that can no longer complete:";
  int shown = 0;
  for (auto& [name, n] : at) {
    if (shown++ == 8) { msg += " ..."; break; }
    msg += " " + std::to_string(n) + " at " + name + ";";
  }
  msg += " (divergent BARRIER / warp_sum / shfl_xor / grid_sync calls)";
  abort_all(L, msg);
}

void pass_baton(Launch* L) {  // lock held; serial schedules: the next ready thread runs
  if (L->schedule == 0) return;
  if (L->ready.empty()) {
    L->running = nullptr;
    return;
  }
  L->running = L->ready.front();
  L->ready.pop_front();
  wake(L->running);
}

void release(Launch* L, Thread* w) {  // lock held
  w->blocked = false;
  w->at = nullptr;
  L->blocked--;
  if (L->schedule) L->ready.push_back(w);
  else wake(w);
}

void grid_check(Launch* L, Barrier* b) {  // lock held; at the completion of a grid_sync phase
  if (b->contributors > 0) {
    const unsigned int v = __atomic_load_n(b->counter, __ATOMIC_SEQ_CST);
    char s[400];
    if (v < b->target) {
      std::snprintf(s, sizeof s, "grid_sync #%lu: every group has arrived and the counter is %u, but the target is %u: "
                    "the GPU would spin forever (the k-th sync of a G-group grid waits for k * G = %lu * %d)",
                    b->phase + 1, v, b->target, b->phase + 1, (int)L->groups.size());
      abort_all(L, s);
    } else if (v > b->target) {
      std::snprintf(s, sizeof s, "grid_sync #%lu: the target %u is below the counter %u reached when every group has "
                    "arrived: on the GPU groups pass before the others arrive (the k-th sync of a G-group grid "
                    "waits for k * G = %lu * %d)",
                    b->phase + 1, b->target, v, b->phase + 1, (int)L->groups.size());
      abort_all(L, s);
    }
  }
  b->contributors = 0;
  b->counter = nullptr;
}

void complete(Launch* L, Barrier* b) {  // lock held
  b->arrived = 0;
  if (b->grid) grid_check(L, b);
  b->phase++;
  for (Thread* w : b->waiters) release(L, w);
  b->waiters.clear();
}

void drop(Launch* L, Barrier* b) {  // lock held; an exited thread leaves the barrier
  b->expected--;
  if (b->arrived > 0 && b->arrived >= b->expected) complete(L, b);
}

void arrive(Lock& lk, Thread* t, Barrier* b) {  // called locked, returns unlocked
  Launch* L = t->L;
  if (L->aborted) throw Abort{};
  if (++b->arrived >= b->expected) {
    complete(L, b);  // the last one to arrive goes on (and keeps the baton)
    if (L->aborted) throw Abort{};
    lk.unlock();
    return;
  }
  b->waiters.push_back(t);
  t->blocked = true;
  t->at = b;
  L->blocked++;
  check_deadlock(L);
  pass_baton(L);
  lk.unlock();
  wait_go(t);
  if (L->aborted) throw Abort{};
}

Thread* self(void* rt) { return static_cast<Thread*>(rt); }

void op_barrier(void* rt) {
  Thread* t = self(rt);
  Lock lk(t->L->m);
  arrive(lk, t, &t->g->bar);
}

[[noreturn]] void fail_locked(Thread* t, const std::string& msg) {
  abort_all(t->L, msg + " (" + where(t) + ")");
  throw Abort{};
}

[[noreturn]] void op_fail(void* rt, const char* msg) {
  Thread* t = self(rt);
  Lock lk(t->L->m);
  fail_locked(t, msg);
}

// Warp ops alternate between two buffer slots, so one barrier per op suffices: a lane can only
// rewrite a slot after the next op's barrier, which waits for every reader of this one. A slot
// entry is valid for this op only if its stamp says so (else its lane returned or diverged).
float* warp_slot(Thread* t, unsigned long op, unsigned long** stamp) {
  const unsigned int w = t->info.tid >> 5;
  const size_t slot = (w * 2 + (op & 1)) * 32;
  *stamp = &t->g->wstamp[slot];
  return &t->g->wbuf[slot];
}

[[noreturn]] void lane_gone(Lock& lk, Thread* t, const std::string& what, int src) {
  lk.lock();
  fail_locked(t, what + " reads lane " + std::to_string(src) +
                     ", which did not take part (it returned, or the warp diverged): undefined on the GPU");
}

// One warp op's exchange: publish this lane's v in the op's slot and wait for the warp (lock held
// on return). Returns the slot; *stamp / *op tell which entries belong to this op.
float* warp_exchange(Lock& lk, Thread* t, float v, unsigned long* op, unsigned long** stamp) {
  *op = t->wops++;
  float* buf = warp_slot(t, *op, stamp);
  const unsigned int lane = t->info.tid & 31u;
  buf[lane] = v;
  (*stamp)[lane] = *op;
  arrive(lk, t, &t->g->warp_bar[t->info.tid >> 5]);
  return buf;
}

float op_shfl_xor(void* rt, float v, int m) {
  Thread* t = self(rt);
  const unsigned int lane = t->info.tid & 31u;
  Lock lk(t->L->m);
  unsigned long op, *stamp;
  float* buf = warp_exchange(lk, t, v, &op, &stamp);
  const int src = static_cast<int>(lane) ^ m;
  if (src < 0 || src >= 32) return v;  // a source outside the warp returns the caller's value (CUDA)
  if (stamp[src] != op) lane_gone(lk, t, "shfl_xor(v, " + std::to_string(m) + ")", src);
  return buf[src];
}

float op_warp_sum(void* rt, float v) {
  Thread* t = self(rt);
  const unsigned int lane = t->info.tid & 31u;
  Lock lk(t->L->m);
  unsigned long op, *stamp;
  float* buf = warp_exchange(lk, t, v, &op, &stamp);
  float a[32], b[32];
  for (int l = 0; l < 32; ++l) {
    if (stamp[l] != op) lane_gone(lk, t, "warp_sum", l);
    a[l] = buf[l];
  }
  for (int m = 16; m > 0; m >>= 1) {  // the CUDA prelude's butterfly: v += shfl_xor(v, m)
    for (int l = 0; l < 32; ++l) b[l] = a[l] + a[l ^ m];
    std::memcpy(a, b, sizeof a);
  }
  return a[lane];
}

void* op_shm(void* rt, int idx, size_t bytes) {
  Thread* t = self(rt);
  Group* g = t->g;
  Lock lk(t->L->m);
  if (t->L->aborted) throw Abort{};
  if (g->shm.size() <= static_cast<size_t>(idx)) {
    g->shm.resize(idx + 1, nullptr);
    g->shm_bytes.resize(idx + 1, 0);
  }
  if (!g->shm[idx]) {
    const size_t n = (bytes + 63) / 64 * 64 + 64;
    void* p = std::aligned_alloc(64, n);
    if (!p) fail_locked(t, "out of memory for a SHARED array");
    std::memset(p, t->L->poison ? 0xff : 0, n);
    g->shm[idx] = p;
    g->shm_bytes[idx] = bytes;
  } else if (g->shm_bytes[idx] != bytes) {
    fail_locked(t, "SHARED declaration #" + std::to_string(idx) + " has different sizes in one group");
  }
  return g->shm[idx];
}

void op_grid_sync(void* rt, const unsigned int* counter, unsigned int target, unsigned int tt) {
  Thread* t = self(rt);
  Launch* L = t->L;
  Lock lk(L->m);
  if (!L->grid_mode) fail_locked(t, "grid_sync in a launch that does not run the whole grid at once");
  Barrier* b = &L->grid;
  if (tt == 0) {  // as the prelude: thread 0 of each group adds one
    unsigned int* c = const_cast<unsigned int*>(counter);
    __atomic_fetch_add(c, 1u, __ATOMIC_SEQ_CST);
    if (b->contributors == 0) {
      b->counter = counter;
      b->target = target;
    } else if (b->counter != counter || b->target != target) {
      fail_locked(t, "grid_sync: groups of one phase pass different counters or targets (" +
                     std::to_string(target) + " vs " + std::to_string(b->target) + ")");
    }
    b->contributors++;
  }
  arrive(lk, t, b);
}

const alloy_emu_ops OPS = {op_barrier, op_shfl_xor, op_warp_sum, op_shm, op_grid_sync, op_fail};

void finish(Thread* t) {  // lock held: the thread has returned (or never started)
  Launch* L = t->L;
  L->live--;
  drop(L, &t->g->bar);
  drop(L, &t->g->warp_bar[t->info.tid >> 5]);
  if (L->grid_mode) drop(L, &L->grid);
  if (L->schedule && L->running == t) pass_baton(L);
  check_deadlock(L);
}

void* thread_main(void* p) {
  Thread* t = static_cast<Thread*>(p);
  Launch* L = t->L;
  if (L->schedule) wait_go(t);  // serial schedules: wait for the baton
  if (!L->aborted) {
    try {
      L->entry(&t->info);
    } catch (const Abort&) {
    } catch (const std::exception& e) {
      Lock lk(L->m);
      abort_all(L, std::string("exception in the kernel: ") + e.what() + " (" + where(t) + ")");
    } catch (...) {
      Lock lk(L->m);
      abort_all(L, "unknown exception in the kernel (" + where(t) + ")");
    }
  }
  Lock lk(L->m);
  finish(t);
  return nullptr;
}

}  // namespace

extern "C" int alloy_emu_launch(void* entry, void* const* bufs, const int32_t* shapes, const int64_t* strides,
                                const int32_t* ndims, unsigned int gx, unsigned int gy, unsigned int gz,
                                unsigned int nthreads, unsigned int wave_groups, int grid_mode, int schedule,
                                int poison, size_t stack, char* err, size_t errlen) {
  const unsigned long total = static_cast<unsigned long>(gx) * gy * gz;
  for (unsigned long start = 0; start < total; start += wave_groups) {
    const unsigned long n = total - start < wave_groups ? total - start : wave_groups;
    Launch L;
    L.entry = reinterpret_cast<void (*)(const alloy_emu_thread*)>(entry);
    L.schedule = schedule;
    L.poison = poison != 0;
    L.grid_mode = grid_mode != 0;
    L.grid.grid = true;
    L.grid.name = "grid_sync";
    L.grid.expected = grid_mode ? static_cast<int>(n * nthreads) : 0;
    for (unsigned long i = 0; i < n; ++i) {
      const unsigned long q = start + i;
      auto g = std::make_unique<Group>();
      g->bx = q % gx;
      g->by = (q / gx) % gy;
      g->bz = q / (static_cast<unsigned long>(gx) * gy);
      char s[96];
      std::snprintf(s, sizeof s, "(%u,%u,%u)", g->bx, g->by, g->bz);
      g->bar.expected = nthreads;
      g->bar.name = std::string("BARRIER() of group ") + s;
      g->warp_bar.resize(nthreads / 32);
      for (unsigned int w = 0; w < nthreads / 32; ++w) {
        g->warp_bar[w].expected = 32;
        g->warp_bar[w].name = "warp_sum / shfl_xor of warp " + std::to_string(w) + " of group " + s;
      }
      g->wbuf.assign(2 * nthreads, 0.0f);
      g->wstamp.assign(2 * nthreads, ~0ul);
      for (unsigned int tid = 0; tid < nthreads; ++tid) {
        auto t = std::make_unique<Thread>();
        t->info = alloy_emu_thread{t.get(), &OPS, bufs, shapes, strides, ndims, tid, g->bx, g->by, g->bz, nthreads};
        t->L = &L;
        t->g = g.get();
        L.threads.push_back(std::move(t));
      }
      L.groups.push_back(std::move(g));
    }
    L.live = static_cast<int>(L.threads.size());
    if (schedule) {
      for (auto& t : L.threads) {
        if (schedule == 1) L.ready.push_back(t.get());
        else L.ready.push_front(t.get());
      }
      L.running = L.ready.front();
      L.ready.pop_front();
      L.running->go.store(1);
    }
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, stack);
    size_t created = 0;
    for (; created < L.threads.size(); ++created) {
      Thread* t = L.threads[created].get();
      if (pthread_create(&t->handle, &attr, thread_main, t) != 0) break;
    }
    pthread_attr_destroy(&attr);
    if (created < L.threads.size()) {
      Lock lk(L.m);
      abort_all(&L, "could not start thread " + std::to_string(created) + " of " + std::to_string(L.threads.size()) +
                        " (lower max_threads)");
      for (size_t i = created; i < L.threads.size(); ++i) {
        L.ready.erase(std::remove(L.ready.begin(), L.ready.end(), L.threads[i].get()), L.ready.end());
        finish(L.threads[i].get());
      }
    }
    for (size_t i = 0; i < created; ++i) pthread_join(L.threads[i]->handle, nullptr);
    if (L.aborted) {
      std::snprintf(err, errlen, "%s", L.error.c_str());
      return 1;
    }
  }
  return 0;
}
"""


def missing_names() -> list[str]:
    """Names the prelude's CUDA header defines (macros, DEVICE_FN functions) that the CPU dialect
    lacks: what to add to `_DIALECT` when the prelude grows (named in compile errors)."""
    header = getattr(prelude, "_CUDA_HEADER", "")
    names = re.findall(r"#define\s+(\w+)", header) + re.findall(r"DEVICE_FN[^(;{]*?\b(\w+)\s*\(", header)
    return sorted({n for n in names if not re.search(rf"\b{n}\b", _DIALECT)})


# ---------------------------------------------------------------------------------------------
_SHARED_DECL = re.compile(
    r"\bSHARED\s+(?P<type>[A-Za-z_][\w:]*(?:\s+[A-Za-z_][\w:]*)*?)\s+(?P<name>[A-Za-z_]\w*)\s*"
    r"(?P<dims>(?:\[[^\[\]]+\]\s*)*);")


def _rewrite_shared(body: str, kname: str) -> str:
    """`SHARED type name[d0][d1];` -> a reference to the group's arena array of that type."""
    count = 0

    def sub(m):
        nonlocal count
        typ, name = m.group("type"), m.group("name")
        dims = "".join(re.findall(r"\[[^\[\]]+\]", m.group("dims")))
        idx, count = count, count + 1
        return (f"auto& {name} = *reinterpret_cast<{typ}(*){dims}>(alloy_emu_shm({idx}, sizeof({typ}{dims})));")

    out = _SHARED_DECL.sub(sub, body)
    code = re.sub(r"//[^\n]*|/\*.*?\*/", "", out, flags=re.S)
    left = re.search(r"[^\n]*\bSHARED\b[^\n]*", code)
    if left:
        raise ValueError(f"emulate: kernel {kname}: unsupported SHARED declaration (one array per "
                         f"declaration, `SHARED type name[d0]...;`): {left.group(0).strip()!r}")
    return out


def _template_lines(template) -> str:
    lines = []
    for name, v in template:
        if isinstance(v, (bool, np.bool_)):
            lines.append(f"  constexpr bool {name} = {'true' if v else 'false'};\n")
        elif isinstance(v, (int, np.integer)):
            lines.append(f"  constexpr int {name} = {int(v)};\n")
        elif isinstance(v, (mx.Dtype, np.dtype, type)):
            lines.append(f"  using {name} = {_TYPES[_dtype_name(v)][0]};\n")
        else:
            raise TypeError(f"emulate: template argument {name}={v!r}: expected int, bool or a dtype")
    return "".join(lines)


def source(kernel: Kernel, input_dtypes, input_ndims, template, output_dtypes) -> str:
    """The kernel's C++ translation unit (dialect header, helpers, one function per thread).

    input_dtypes / output_dtypes: dtype names (see `_TYPES`) or dtypes; input_ndims: ranks."""
    body = kernel.body
    missing = [k for k in prelude._INDEX if k not in _INDEX_CPU and re.search(rf"\b{k}\b", body)]
    if missing:
        raise NotImplementedError(f"emulate: index names {missing} of the prelude have no CPU mapping (_INDEX_CPU)")
    used = [k for k in _INDEX_CPU if re.search(rf"\b{k}\b", body)]
    params = []
    for i, (name, dt, nd) in enumerate(zip(kernel.inputs, input_dtypes, input_ndims)):
        ct = _ctype(dt)
        params.append(f"  const {ct}* const {name} = static_cast<const {ct}*>(alloy_emu_t->bufs[{i}]);\n")
        if nd > 0:  # as MLX: only for arrays of rank > 0, and only when the body names them
            if f"{name}_shape" in body:
                params.append(f"  const int32_t* const {name}_shape = alloy_emu_t->shapes + {8 * i};\n")
            if f"{name}_strides" in body:
                params.append(f"  const int64_t* const {name}_strides = alloy_emu_t->strides + {8 * i};\n")
            if f"{name}_ndim" in body:
                params.append(f"  const int {name}_ndim = alloy_emu_t->ndims[{i}];\n")
    n_in = len(kernel.inputs)
    for j, (name, dt) in enumerate(zip(kernel.outputs, output_dtypes)):
        ct = _ctype(dt)
        params.append(f"  {ct}* const {name} = static_cast<{ct}*>(alloy_emu_t->bufs[{n_in + j}]);\n")
    index = "".join(f"  const unsigned int {k} = {_INDEX_CPU[k]};\n" for k in used)
    return (
        f"// alloy.metal.emulate: kernel {kernel.name}\n" + _ABI + _DIALECT
        + f'#line 1 "{kernel.name}.helpers"\n' + kernel.helpers + "\n"
        + '#line 1 "alloy_emulate_signature"\n'
        + "static void alloy_emu_kernel(const alloy_emu_thread* alloy_emu_t) {\n"
        + "".join(params) + _template_lines(template) + index
        + f'#line 1 "{kernel.name}.body"\n' + _rewrite_shared(body, kernel.name) + "\n}\n"
        + '#line 1 "alloy_emulate_entry"\n'
        + 'extern "C" void alloy_emu_entry(const alloy_emu_thread* t) {\n'
        + "  alloy_emu_self = t;\n  alloy_emu_kernel(t);\n}\n"
    )


# ---------------------------------------------------------------------------------------------
_LOCK = threading.Lock()
_LIBS: dict = {}


def _cache_dir() -> Path:
    d = Path(os.environ.get("ALLOY_EMULATE_CACHE") or Path(tempfile.gettempdir()) / "alloy-emulate")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _compile(src: str, tag: str) -> ctypes.CDLL:
    """The loaded shared object of `src`, compiled once per source hash (in-process and on disk)."""
    if not available():
        raise EmulatorError(f"alloy.metal.emulate needs a C++20 compiler: {_cxx()!r} is not on PATH "
                            "(install g++ >= 12, or set ALLOY_EMULATE_CXX)")
    key = hashlib.sha256("\0".join((_cxx(), *FLAGS, src)).encode()).hexdigest()[:24]
    with _LOCK:
        if key in _LIBS:
            return _LIBS[key]
        d = _cache_dir()
        so, cpp = d / f"{tag}-{key}.so", d / f"{tag}-{key}.cpp"
        if not so.exists():
            cpp.write_text(src)
            tmp = d / f"{tag}-{key}.{os.getpid()}.{threading.get_ident()}.tmp"
            proc = subprocess.run([_cxx(), *FLAGS, "-o", str(tmp), str(cpp)], capture_output=True, text=True,
                                  env={**os.environ, "LC_ALL": "C"})
            if proc.returncode != 0:
                tmp.unlink(missing_ok=True)
                msg = proc.stderr.strip()
                lines = msg.splitlines()
                if len(lines) > 80:
                    msg = "\n".join(lines[:80] + [f"... ({len(lines) - 80} more lines)"])
                hint = ""
                undeclared = sorted(set(re.findall(r"['\u2018](\w+)['\u2019] was not declared in this scope",
                                                   proc.stderr)))
                if undeclared:
                    hint = f"\nnot declared: {', '.join(undeclared)}"
                lacking = missing_names()
                if lacking:
                    hint += (f"\nthe prelude defines names the CPU dialect lacks: {', '.join(lacking)} "
                             "(add them to _DIALECT in alloy/metal/emulate.py)")
                raise EmulatorCompileError(f"emulate: g++ failed on {tag} (generated source: {cpp}):\n{msg}{hint}")
            os.replace(tmp, so)
        lib = ctypes.CDLL(str(so))
        _LIBS[key] = lib
        return lib


def _runtime() -> ctypes.CDLL:
    lib = _compile(_ABI + _RUNTIME, "alloy_emu_runtime")
    f = lib.alloy_emu_launch
    if f.restype is not ctypes.c_int or f.argtypes is None:
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                      ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
                      ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]
    return lib


class _Buffer:
    """A 64-byte aligned buffer between guard zones of 0xFF bytes."""

    def __init__(self, name: str, data: np.ndarray):
        self.name, self.dtype, self.shape = name, data.dtype, data.shape
        self.nbytes = data.nbytes
        raw = np.full(self.nbytes + 2 * GUARD + 64, 0xFF, np.uint8)
        off = (-raw.ctypes.data) % 64
        self.raw = raw[off:off + self.nbytes + 2 * GUARD]
        self.raw[GUARD:GUARD + self.nbytes] = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        self.ptr = self.raw.ctypes.data + GUARD

    def array(self) -> np.ndarray:
        return self.raw[GUARD:GUARD + self.nbytes].view(self.dtype).reshape(self.shape).copy()

    def check_guards(self, what: str):
        for side, zone in (("before the start", self.raw[:GUARD]), ("after the end", self.raw[GUARD + self.nbytes:])):
            bad = np.flatnonzero(zone != 0xFF)
            if bad.size:
                far = (GUARD - bad[0]) if side == "before the start" else bad[-1] + 1
                raise EmulatorError(f"emulate: the kernel wrote outside {what} `{self.name}` ({side}, "
                                    f"up to {far} bytes away)")


def _as_numpy(a):
    """(storage array, dtype name): bf16 as its uint16 bits."""
    if isinstance(a, mx.array):
        name = _dtype_name(a.dtype)
        if name == "bfloat16":
            f = np.array(a.astype(mx.float32), dtype=np.float32)
            return (f.view(np.uint32) >> 16).astype(np.uint16), name
        return np.array(a), name
    a = np.asarray(a)
    return a, _dtype_name(a.dtype)


def _fill(shape, name, value) -> np.ndarray:
    if name == "bfloat16":
        f = np.array(mx.array(value, mx.bfloat16).astype(mx.float32), dtype=np.float32)
        return np.full(shape, (f.view(np.uint32) >> 16).astype(np.uint16), np.uint16)
    return np.full(shape, value, _TYPES[name][1])


def run(kernel: Kernel, inputs, *, template, grid, threadgroup, output_shapes, output_dtypes,
        init_value=None, schedule: str = "threads", max_threads: int = 1024, poison: bool = False):
    """Run `kernel` on the CPU with the arguments of `Kernel.__call__`; returns a list of mx.array
    (the requested dtypes). grid: groups per axis; threadgroup: threads per group (a multiple of 32).

    schedule: "threads" (free OS threads), "forward" / "reverse" (one thread at a time, switching at
    barriers: deterministic); max_threads: threads alive at once (a grid_sync kernel needs its whole
    grid within it); poison: NaN bytes instead of zeros in SHARED arrays and (without init_value) in
    the outputs. Raises EmulatorCompileError / EmulatorError (see the module docstring)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"emulate: schedule must be one of {tuple(SCHEDULES)}, got {schedule!r}")
    gx, gy, gz = (int(v) for v in grid)
    nt = int(threadgroup)
    if nt <= 0 or nt % 32 or nt > 1024:
        raise ValueError(f"emulate: threadgroup must be a multiple of 32 in [32, 1024], got {threadgroup}")
    if min(gx, gy, gz) <= 0:
        raise ValueError(f"emulate: grid needs at least one group per axis, got {tuple(grid)}")
    inputs = list(inputs)
    if len(inputs) != len(kernel.inputs):
        raise ValueError(f"emulate: kernel {kernel.name} takes {len(kernel.inputs)} inputs, got {len(inputs)}")
    output_shapes, output_dtypes = list(output_shapes), list(output_dtypes)
    if not (len(output_shapes) == len(output_dtypes) == len(kernel.outputs)):
        raise ValueError(f"emulate: kernel {kernel.name} has {len(kernel.outputs)} outputs")

    arrays = [_as_numpy(a) for a in inputs]
    out_names = [_dtype_name(d) for d in output_dtypes]
    src = source(kernel, [n for _, n in arrays], [a.ndim for a, _ in arrays], template, out_names)
    rt = _runtime()
    lib = _compile(src, re.sub(r"\W", "_", kernel.name))
    entry = ctypes.cast(lib.alloy_emu_entry, ctypes.c_void_p).value

    ins = [_Buffer(n, a) for n, (a, _) in zip(kernel.inputs, arrays)]
    outs = []
    for name, shape, dn in zip(kernel.outputs, output_shapes, out_names):
        shape = tuple(int(s) for s in shape)
        if init_value is not None:
            data = _fill(shape, dn, init_value)
        else:
            data = np.zeros(shape, _TYPES[dn][1])
            if poison:
                data.view(np.uint8)[...] = 0xFF
        outs.append(_Buffer(name, data))

    n_in = len(ins)
    shapes = np.zeros(8 * max(n_in, 1), np.int32)
    strides = np.zeros(8 * max(n_in, 1), np.int64)
    ndims = np.zeros(max(n_in, 1), np.int32)
    for i, (a, _) in enumerate(arrays):
        if a.ndim > 8:
            raise ValueError(f"emulate: input {kernel.inputs[i]} has rank {a.ndim} > 8")
        ndims[i] = a.ndim
        st = 1
        for d in range(a.ndim - 1, -1, -1):  # row-contiguous strides in elements, as MLX passes
            shapes[8 * i + d] = a.shape[d]
            strides[8 * i + d] = st
            st *= a.shape[d]
    bufs = (ctypes.c_void_p * (len(ins) + len(outs)))(*[b.ptr for b in ins + outs])

    grid_mode = re.search(r"\bgrid_(sync|wait)\s*\(", kernel.body + kernel.helpers) is not None
    total = gx * gy * gz
    if grid_mode:
        if total * nt > max_threads:
            raise EmulatorError(f"emulate: kernel {kernel.name} calls grid_sync, so all {total} groups x {nt} "
                                f"threads must run at once: {total * nt} > max_threads={max_threads} "
                                "(use a smaller grid, or raise max_threads)")
        wave = total
    else:
        wave = max(1, max_threads // nt)
    err = ctypes.create_string_buffer(4096)
    rc = rt.alloy_emu_launch(entry, bufs, shapes.ctypes.data, strides.ctypes.data, ndims.ctypes.data,
                             gx, gy, gz, nt, wave, int(grid_mode), SCHEDULES[schedule], int(poison),
                             _STACK, err, len(err))
    if rc != 0:
        raise EmulatorError(f"emulate: kernel {kernel.name}: {err.value.decode(errors='replace')}")
    for b in outs:
        b.check_guards("output")
    for b in ins:
        b.check_guards("input")

    results = []
    for b, dn in zip(outs, out_names):
        a = b.array()
        if dn == "bfloat16":
            f = (a.astype(np.uint32) << 16).view(np.float32)
            results.append(mx.array(f).astype(mx.bfloat16))
        else:
            results.append(mx.array(a).astype(_mx_dtype(dn)))
    return results


class emulated:
    """A stand-in for a `Kernel` whose calls run on the CPU emulator (same call signature).

    Extra keyword arguments of `run` (schedule, max_threads, poison) are fixed at construction."""

    def __init__(self, kernel: Kernel, **options):
        self.kernel, self.options = kernel, options
        self.calls = 0

    def __getattr__(self, name):  # name, inputs, outputs, body, ... of the wrapped kernel
        return getattr(self.kernel, name)

    def __call__(self, inputs, *, template, grid, threadgroup, output_shapes, output_dtypes, init_value=None):
        self.calls += 1
        return run(self.kernel, inputs, template=template, grid=grid, threadgroup=threadgroup,
                   output_shapes=output_shapes, output_dtypes=output_dtypes, init_value=init_value,
                   **self.options)


@contextlib.contextmanager
def patch(*modules, **options):
    """Within the block, every module-level `Kernel` of `modules` (e.g. `alloy.metal.gemv.KERNEL`)
    is an `emulated` one, so the module's own launcher runs on the CPU. Not thread-safe (it swaps
    module globals); for tests."""
    saved = []
    try:
        for mod in modules:
            for attr, val in list(vars(mod).items()):
                if isinstance(val, Kernel):
                    saved.append((mod, attr, val))
                    setattr(mod, attr, emulated(val, **options))
        yield
    finally:
        for mod, attr, val in saved:
            setattr(mod, attr, val)

"""Fused causal depthwise conv1d (+ optional SiLU) with the carried state in and out.

    xp = concat(state, x) along time;  y_t = act(b + sum_k w[:, k] * xp[t + k]);  new_state = xp[-(K-1):]

One launch serves prefill (any T) and the single-step state update (T = 1). Work item: VW
consecutive channels c .. c + VW - 1 of one batch row b over a tile of up to `TILE` time steps.
VW = 8 where the channel rows split into whole groups of 8 (C, and for the split kernels each
width, a multiple of 8) and x has more than one row (`_plan`): one 16-byte load / store per row and
step for bf16 / fp16; else VW = 1, the same body. Time is streamed through a window of the K-1 previous inputs held in
registers: the K-1 inputs before the tile are re-read (from `state` or `x`), then each step loads
one row of VW channels, the loads of `AHEAD` steps issued together before their stores (outputs
may alias x as far as the compiler knows). Channels are the fastest index of x, so a group of
threads reads one contiguous stretch of a row per step. The work item holding the first tile also
writes the new state.

Shapes: x (B, T, C), weight (C, K) with K >= 2, bias (C,), state (B, K-1, C) -> y (B, T, C) in
x.dtype, new_state (B, K-1, C) in x.dtype. The state is rounded to x.dtype before use, as in
`alloy.ops.conv.causal_conv1d_ref`.

`BWD` is its gradient in one launch, with the same work items: it streams the tile and the K-1
steps after it (whose d pre-activations reach the tile's inputs), recomputing each step's
pre-activation from the input window, and keeps the last K-1 d pre-activations in registers: dx /
dstate are the transposed convolution of d pre-activation, written K-1 steps behind. Each work item
writes its share of dweight / dbias, (K+1, C) channel-fastest; `prelude.sum_rows` sums the
B * T/tile shares afterwards in two column reductions (no atomics).

`KERNEL_SPLIT` / `BWD_SPLIT` are the same kernels with y (and dy) as three arrays split along
channels, y0 (B, T, C0), y1 (B, T, C1), y2 (B, T, C - C0 - C1), each contiguous: a consumer that
splits the conv's output (Mamba-2's x, B, C) gets contiguous pieces with no slicing copies before
the kernels that read them, and no concatenation of their cotangents in the backward.

`KERNEL_PIPE` / `BWD_PIPE` (and the split ones) are the same four with the same arithmetic (equal
results bit for bit), software-pipelined: a thread's loads of the next batch of steps are in flight
while it computes the current one, and rows further ahead are prefetched into L2 (see "the pipe
variants" below). `FWD_VARIANT` / `BWD_VARIANT` pick the kernels the launchers take.

`BWD_PIPE4` / `BWD_SPLIT_PIPE4` are the pipe gradients at VW = 4 (8-byte accesses, half the
per-thread state, twice the threads, the same tiles and arithmetic: equal results bit for bit);
`BWD_PIPE_VW` picks them.
"""
from __future__ import annotations

import mlx.core as mx

from alloy.metal.prelude import VEC_IO, Kernel, groups, sum_rows

# Time steps per work item, at most: halo overhead (K-1)/TILE (2(K-1)/TILE in the gradient), and
# B * T/TILE shares of dweight / dbias. The tile halves (down to TILE_MIN) while the launch would
# have fewer than MIN_ITEMS work items (threads): the toy Mamba-2 layer (16 x 2048 x 1792, VW 8)
# keeps 64 with 115K threads; an unbatched prefill gets shorter tiles and more threads. The tile
# length costs no registers (the window is K-1 steps): nvcc sm_90, bf16, K 4, VW 8: forward 121,
# gradient 250 registers, no spills: 16 / 8 resident warps per SM, 68K / 34K threads on an H100.
TILE = 64
TILE_MIN = 16
MIN_ITEMS = 100_000
# steps whose loads are issued together: a gradient thread has 2 x 4 16-byte loads in flight
# (32 KB per SM at 8 warps); 2 would take 211 registers and half the loads
AHEAD = 4
GROUP = 128  # threads per group, along channels
# Which kernels the launchers take (module switches, for A/B runs such as bench/conv_tune.py's):
# "stream" (KERNEL / BWD and the split ones: load AHEAD steps, then compute them) or "pipe" (their
# *_PIPE variants below: the next batch's loads in flight while a batch is computed, L2 prefetch;
# VW 8 launches only, VW 1 ones take the streaming kernels). H100, session 9 (bench/conv_tune.py, toy
# layer 16 x 2048 x 1792 bf16): forward 183 -> 135 us, gradient kernel 464 -> 246 us (2-step gradient
# batches; 3: 278, 4: 296; PREFETCH 0 / 16 / 32 within noise of 8); train step 76.1 ms with both
# streaming vs 74.5 / 74.7 pipe (docs/benchmarks.md). nvcc sm_90, bf16, K 4, VW 8 (no spills): pipe forward, 2-step
# batches under launch bounds (GROUP, 4): 123 registers, 16 resident warps per SM; pipe gradient,
# 2 / 3-step batches: 230 / 243 registers (4-step: 255 and 24 bytes of spills), 8 warps.
VARIANTS = ("stream", "pipe")
FWD_VARIANT = "pipe"
BWD_VARIANT = "pipe"
PIPE_AHEAD_FWD = 2  # steps per batch of the pipe kernels (2 batches of loads in flight)
PIPE_AHEAD_BWD = 2
# channels per thread of the pipe gradient (BWD_VARIANT "pipe"): 8 (BWD_PIPE / BWD_SPLIT_PIPE) or 4
# (BWD_PIPE4 / BWD_SPLIT_PIPE4: the same arithmetic, bit for bit, with half the per-thread state and
# twice the threads; C and the split widths multiples of 4, 8-byte loads / stores, the dw / db share
# in 16-byte stores). H100 Nsight Compute, toy gradient at VW 8: 272 us, 230 registers -> 2 warps per
# scheduler, latency bound (4.0 cycles per issued instruction). nvcc sm_90, bf16, K 4, 2-step batches,
# no spills: VW 4 takes 135 registers unbounded (3 warps per scheduler), 123 under launch bounds
# (GROUP, 4) (4 warps per scheduler; (GROUP, 5): 96 and 344 bytes of spills). H100, session 11
# (bench/conv_tune.py, toy layer): gradient kernel 264.5 us at VW 8 -> 204.5 at VW 4 (236.2 unbounded,
# 206.3 with 3-step batches, 221.8 without the L2 prefetch); toy train step (40 pipelined steps, same
# job): 70.0 / 70.4 ms at VW 4 against 70.6 / 71.1 / 70.2 at VW 8 (docs/benchmarks.md).
BWD_PIPE_VW = 4
BWD_PIPE4_MIN_GROUPS = 4  # the VW 4 gradients' launch bounds: (GROUP, this) (0: none)
FWD_MIN_GROUPS = 4  # the pipe forward's launch bounds: (GROUP, this) — registers capped for 4 groups per SM
# the pipe kernels pull the rows this many steps ahead into L2 (0: none): about twice the two batches
# the loads reach ahead; at 8 steps the rows prefetched and not yet read fill ~9 MB of the 50 MB L2
# (toy gradient: 34K resident threads x 32 bytes a step)
PREFETCH = 8


# the gradient kernels' copy of the XT trailing (passed-through) columns' cotangent into dx: by the groups
# of the first channel block, the tile's rows of dtail (B, T, XT)
_TAIL_COPY = """
  if (XT > 0 && bid_x == 0 && t0 < Tn) {
    const int tn = (t0 + TILE < Tn ? t0 + TILE : Tn) - t0;
    for (int e = tid; e < tn * XT; e += nthreads) {
      const int t = t0 + e / XT;
      dx[(b * Tn + t) * Xn + Cn + e % XT] = dtail[(b * Tn + t) * XT + e % XT];
    }
  }"""


def _head(tail_copy: bool = False) -> str:
    """The opening every kernel here shares: channels c .. c + VW - 1 of batch row b over the tile
    t0 .. t1 - 1, their weights and bias, and the window xw of the K-1 inputs before the tile. Opens
    the work item's `if`. x's rows are Xn = Cn + XT wide: the conv's Cn channels, then XT columns the
    kernels pass by (template XT; a gradient kernel writes their cotangent `dtail` into dx's: tail_copy)."""
    return f"""
  const int Tn = x_shape[1];
  const int Xn = x_shape[2];
  const int Cn = Xn - XT;
  const int c = (bid_x * nthreads + tid) * VW;  // the first of this thread's VW channels
  const int b = bid_z;
  const int t0 = bid_y * TILE;{_TAIL_COPY if tail_copy else ""}
  if (c < Cn && t0 < Tn) {{
    const int t1 = t0 + TILE < Tn ? t0 + TILE : Tn;
    float wk[K][VW];
    float bv[VW];
    for (int j = 0; j < VW; ++j) {{
      for (int k = 0; k < K; ++k) wk[k][j] = static_cast<float>(w[(c + j) * K + k]);
      bv[j] = static_cast<float>(bias[c + j]);
    }}
    // the window at step t: xw[k] = xp[t + k] = x[t - (K - 1) + k], k < K - 1 (before x: the state)
    float xw[K - 1][VW];
    for (int k = 0; k < K - 1; ++k) {{
      const int i = t0 + k - (K - 1);
      if (i >= 0) {{
        LDV(x, (b * Tn + i) * Xn + c, xw[k]);
      }} else {{
        for (int j = 0; j < VW; ++j)
          xw[k][j] = static_cast<float>(static_cast<T>(state[(b * (K - 1) + i + K - 1) * Cn + c + j]));
      }}
    }}"""


def _rows(name: str, split: bool, qual: str = "") -> str:
    """Defines `<name>_p`, `<name>_w`, `<name>_c`: the (B, T, *) rows `name` holding channel c, their
    width and c's column in them (element (b, t) at `<name>_p[(b * Tn + t) * <name>_w + <name>_c]`).
    Split: the rows are the three arrays name0 / name1 / name2 of widths C0, C1 and C - C0 - C1
    along channels, picked once per work item (a VW group never straddles two). qual: "const " for
    an input."""
    if not split:
        return f"""
    {qual}DEV T* const {name}_p = {name};
    const int {name}_w = Cn;
    const int {name}_c = c;"""
    return f"""
    const bool in0 = c < C0, in1 = c < C0 + C1;
    {qual}DEV T* const {name}_p = in0 ? {name}0 : (in1 ? {name}1 : {name}2);
    const int {name}_w = in0 ? C0 : (in1 ? C1 : Cn - C0 - C1);
    const int {name}_c = in0 ? c : (in1 ? c - C0 : c - C0 - C1);"""


def _forward(split: bool) -> str:
    return _head() + _rows("y", split) + """
    for (int s0 = t0; s0 < t1; s0 += AHEAD) {
      float xv[AHEAD][VW];                  // the next AHEAD inputs, all loads before any store
#pragma unroll
      for (int u = 0; u < AHEAD; ++u) {
        if (s0 + u < t1) {
          LDV(x, (b * Tn + s0 + u) * Xn + c, xv[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < AHEAD; ++u) {
        if (s0 + u < t1) {
          float yv[VW];
          for (int j = 0; j < VW; ++j) {
            float acc = 0.0f;
            for (int k = 0; k < K - 1; ++k) acc += wk[k][j] * xw[k][j];
            acc += wk[K - 1][j] * xv[u][j];
            acc += bv[j];
            if (SILU) acc = fsilu(acc);
            yv[j] = acc;
            for (int k = 0; k < K - 2; ++k) xw[k][j] = xw[k + 1][j];
            xw[K - 2][j] = xv[u][j];
          }
          STV(y_p, (b * Tn + s0 + u) * y_w + y_c, yv);
        }
      }
    }""" + _new_state() + """
  }
"""


# the gradient kernels' opening after the rows: the steps a work item sweeps, its dw / db share and
# the window of d pre-activations, zeroed
_BWD_ACC = """
    const int s1 = t1 + K - 1;             // steps t0 .. s1 - 1: the tile and the K - 1 after it
    float dwk[K + 1][VW];                  // this work item's share of dw[k] = sum_t dp[t] xp[t + k], db = sum_t dp[t]
    float dpw[K - 1][VW];                  // dp at the K - 1 steps before (0 before t0)
    for (int j = 0; j < VW; ++j) {
      for (int k = 0; k <= K; ++k) dwk[k][j] = 0.0f;
      for (int k = 0; k < K - 1; ++k) dpw[k][j] = 0.0f;
    }
"""


def _backward(split: bool) -> str:
    # step s: dp[s] from x / dy at s and the window; its share of dw / db while s is in the tile;
    # then dx[s - (K - 1)], whose K d pre-activations dp[s - K + 1 .. s] are all known
    return _head(True) + _rows("dy", split, "const ") + _BWD_ACC + """\
    for (int s0 = t0; s0 < s1; s0 += AHEAD) {
      float xv[AHEAD][VW];                  // x and dy at the next AHEAD steps (0 past the end)
      float gv[AHEAD][VW];
#pragma unroll
      for (int u = 0; u < AHEAD; ++u) {
        const int s = s0 + u;
        if (s < Tn) {
          LDV(x, (b * Tn + s) * Xn + c, xv[u]);
          LDV(dy_p, (b * Tn + s) * dy_w + dy_c, gv[u]);
        } else {
          for (int j = 0; j < VW; ++j) xv[u][j] = gv[u][j] = 0.0f;
        }
      }
#pragma unroll
      for (int u = 0; u < AHEAD; ++u) {
        const int s = s0 + u;
        if (s < s1) {
          float dxv[VW];
          for (int j = 0; j < VW; ++j) {
            float g = gv[u][j];
            if (SILU && s < Tn) {
              float pre = bv[j];
              for (int k = 0; k < K - 1; ++k) pre += wk[k][j] * xw[k][j];
              pre += wk[K - 1][j] * xv[u][j];
              const float sg = 1.0f / (1.0f + fexp(-pre));
              g *= sg * (1.0f + pre * (1.0f - sg));
            }
            if (s < t1) {
              for (int k = 0; k < K - 1; ++k) dwk[k][j] += g * xw[k][j];
              dwk[K - 1][j] += g * xv[u][j];
              dwk[K][j] += g;
            }
            float acc = wk[0][j] * g;        // dx[s - (K - 1)] = sum_k w[k] dp[s - k]
            for (int k = 1; k < K; ++k) acc += wk[k][j] * dpw[K - 1 - k][j];
            dxv[j] = acc;
            for (int k = 0; k < K - 2; ++k) {
              xw[k][j] = xw[k + 1][j];
              dpw[k][j] = dpw[k + 1][j];
            }
            xw[K - 2][j] = xv[u][j];
            dpw[K - 2][j] = g;
          }
          const int i = s - (K - 1);
          const int m = s - Tn;              // new_state[m] = xp[T + m]: its cotangent adds in
          if (i >= t0) {
            if (m >= 0) {
              for (int j = 0; j < VW; ++j) dxv[j] += static_cast<float>(dns[(b * (K - 1) + m) * Cn + c + j]);
            }
            STV(dx, (b * Tn + i) * Xn + c, dxv);
          } else if (t0 == 0 && i < 0) {     // dstate[s] = sum_k w[k] dp[s - k] (+ dns where T < K - 1)
            for (int j = 0; j < VW; ++j) {
              const float d = m >= 0 ? static_cast<float>(dns[(b * (K - 1) + m) * Cn + c + j]) : 0.0f;
              dstate[(b * (K - 1) + s) * Cn + c + j] = static_cast<T>(dxv[j] + d);
            }
          }
        }
      }
    }
    const int ny = (Tn + TILE - 1) / TILE;
    for (int k = 0; k <= K; ++k)
      for (int j = 0; j < VW; ++j) dwb[((b * ny + bid_y) * (K + 1) + k) * Cn + c + j] = dwk[k][j];
  }
"""


# ---------------------------------------------------------------- the "pipe" variants
# The same work items and arithmetic as the kernels above (bitwise: each value is computed by the same
# expression in the same order), arranged so that a thread's loads overlap its own arithmetic: the
# tile's steps go in whole batches of AHEAD, the raw 16-byte loads of batch n + 1 issued before batch
# n is computed (two batches of loads in flight, held as raw bits: 4 registers per load), the
# batches free of bounds checks; the steps after the last whole batch (the tile's partial batch; in
# the gradient also the K - 1 halo steps) are loaded together, then computed. `PREF` > 0 also
# pulls the rows PREF steps ahead into L2 (`prefetch_l2`: bytes in flight that hold no register).
# With SILU the exponentials of a step's VW channels come before their divisions (each division
# branches to a slow path, which splits the instruction stream). Eight channels per thread (`_plan`'s
# VW 8; the gradient also 4: `BWD_PIPE_VW`): VW 1 launches take the streaming kernels.


def _pipe_loop(load, steps, load_tail) -> str:
    """Steps t0 .. te - 1 (te = t0 + nb * AHEAD: the tile's whole batches): `load(i, s0)` issues the
    raw loads of batch s0 .. s0 + AHEAD - 1 into buffer i, `steps(i, s0)` computes it; the loads of
    batch n + 1 are issued before batch n is computed, ping-pong between buffers 0 and 1. Then
    `load_tail` issues the loads of the steps after te, all together (loaded inside the loop, they
    would hold their registers through all of it)."""
    return f"""
    const int nb = (t1 - t0) / AHEAD;      // whole batches in the tile
    const int te = t0 + nb * AHEAD;
    if (nb > 0) {{{load(0, "t0")}
    }}
    for (int n = 0; n < nb; n += 2) {{
      const int s0 = t0 + n * AHEAD;
      if (n + 1 < nb) {{{load(1, "s0 + AHEAD")}
      }}{steps(0, "s0")}
      if (n + 1 < nb) {{
        if (n + 2 < nb) {{{load(0, "s0 + 2 * AHEAD")}
        }}{steps(1, "s0 + AHEAD")}
      }}
    }}{load_tail}"""


def _pipe_loads(arrays, vw: int = 8):
    """(load(i, s0), load_tail) for `_pipe_loop`; arrays: (name, row pointer, row width, column) per
    input. load: the rows of steps s0 .. s0 + AHEAD - 1 into <name>r[i][u], and the rows PREF steps
    further (below `pe`) into L2; load_tail: the rows of steps te .. te + NT - 1 below `pe` into
    <name>t[q] (NT: the most steps a tail has, a constant of the body). vw: channels per load (8:
    ldr8, 4: ldr4)."""
    def load(i, s0):
        loads = "".join(f"""
          {n}r[{i}][u] = ldr{vw}({p} + (b * Tn + s) * {w} + {col});""" for n, p, w, col in arrays)
        pref = "".join(f"""
            prefetch_l2({p} + (b * Tn + s + PREF) * {w} + {col});""" for n, p, w, col in arrays)
        return f"""
#pragma unroll
        for (int u = 0; u < AHEAD; ++u) {{
          const int s = {s0} + u;{loads}
          if (PREF > 0 && s + PREF < pe) {{{pref}
          }}
        }}"""
    tail_loads = "".join(f"""
        {n}t[q] = ldr{vw}({p} + (b * Tn + s) * {w} + {col});""" for n, p, w, col in arrays)
    tail = f"""
#pragma unroll
    for (int q = 0; q < NT; ++q) {{
      const int s = te + q;
      if (s < pe) {{{tail_loads}
      }}
    }}"""
    return load, tail


def _fwd_step() -> str:
    """y at step s from xv (x at s) and the window, as `_forward`'s step; the window moves on."""
    return """
        float yv[VW];
        for (int j = 0; j < VW; ++j) {
          float acc = 0.0f;
          for (int k = 0; k < K - 1; ++k) acc += wk[k][j] * xw[k][j];
          acc += wk[K - 1][j] * xv[j];
          yv[j] = acc + bv[j];
        }
        if (SILU) {                       // fsilu, the exponentials first
          float e[VW];
          for (int j = 0; j < VW; ++j) e[j] = fexp(-yv[j]);
          for (int j = 0; j < VW; ++j) yv[j] = yv[j] / (1.0f + e[j]);
        }
        for (int j = 0; j < VW; ++j) {
          for (int k = 0; k < K - 2; ++k) xw[k][j] = xw[k + 1][j];
          xw[K - 2][j] = xv[j];
        }
        STV(y_p, (b * Tn + s) * y_w + y_c, yv);"""


def _forward_pipe(split: bool) -> str:
    def steps(i, s0):
        return f"""
#pragma unroll
      for (int u = 0; u < AHEAD; ++u) {{
        const int s = {s0} + u;
        float xv[VW];
        cvt8(xr[{i}][u], xv);{_fwd_step()}
      }}"""
    load, tail = _pipe_loads([("x", "x", "Xn", "c")])
    return _head() + _rows("y", split) + """
    constexpr int NT = AHEAD;              // steps after the whole batches: fewer than AHEAD
    const int pe = t1;                     // rows loaded / prefetched: the tile's
    Raw8<T> xr[2][AHEAD], xt[NT];""" + _pipe_loop(load, steps, tail) + """
#pragma unroll
    for (int q = 0; q < NT; ++q) {         // the tile's partial last batch
      const int s = te + q;
      if (s < t1) {
        float xv[VW];
        cvt8(xt[q], xv);""" + _fwd_step() + """
      }
    }""" + _new_state() + """
  }
"""


def _new_state() -> str:
    return """
    if (t0 == 0) {  // new_state[m] = xp[T + m]
      for (int m = 0; m < K - 1; ++m) {
        const int i = Tn + m - (K - 1);
        for (int j = 0; j < VW; ++j)
          new_state[(b * (K - 1) + m) * Cn + c + j] =
              i >= 0 ? static_cast<T>(static_cast<float>(x[(b * Tn + i) * Xn + c + j]))
                     : static_cast<T>(static_cast<float>(state[(b * (K - 1) + Tn + m) * Cn + c + j]));
      }
    }"""


def _bwd_step(tail: bool) -> str:
    """One gradient step s from xv / gv (x and dy at s; g becomes dp[s]) and the windows, as
    `_backward`'s: its share of dw / db, dx[s - (K - 1)] (or dstate). tail: s may lie past the tile
    (no dw share) or past T (no activation; new_state's cotangent adds in); else s is inside both."""
    silu_if = "SILU && s < Tn" if tail else "SILU"
    dw_if = "s < t1" if tail else "true"  # (a constant condition: the same text both ways)
    dns = """
            if (m >= 0) {
              for (int j = 0; j < VW; ++j) dxv[j] += static_cast<float>(dns[(b * (K - 1) + m) * Cn + c + j]);
            }""" if tail else ""
    dns_state = "m >= 0 ? static_cast<float>(dns[(b * (K - 1) + m) * Cn + c + j]) : 0.0f" if tail else "0.0f"
    return f"""
        float g[VW];
        for (int j = 0; j < VW; ++j) g[j] = gv[j];
        if ({silu_if}) {{
          float pre[VW], e[VW];
          for (int j = 0; j < VW; ++j) {{
            pre[j] = bv[j];
            for (int k = 0; k < K - 1; ++k) pre[j] += wk[k][j] * xw[k][j];
            pre[j] += wk[K - 1][j] * xv[j];
          }}
          for (int j = 0; j < VW; ++j) e[j] = fexp(-pre[j]);
          for (int j = 0; j < VW; ++j) {{
            const float sg = 1.0f / (1.0f + e[j]);
            g[j] *= sg * (1.0f + pre[j] * (1.0f - sg));
          }}
        }}
        float dxv[VW];
        for (int j = 0; j < VW; ++j) {{
          if ({dw_if}) {{
            for (int k = 0; k < K - 1; ++k) dwk[k][j] += g[j] * xw[k][j];
            dwk[K - 1][j] += g[j] * xv[j];
            dwk[K][j] += g[j];
          }}
          float acc = wk[0][j] * g[j];     // dx[s - (K - 1)] = sum_k w[k] dp[s - k]
          for (int k = 1; k < K; ++k) acc += wk[k][j] * dpw[K - 1 - k][j];
          dxv[j] = acc;
          for (int k = 0; k < K - 2; ++k) {{
            xw[k][j] = xw[k + 1][j];
            dpw[k][j] = dpw[k + 1][j];
          }}
          xw[K - 2][j] = xv[j];
          dpw[K - 2][j] = g[j];
        }}
        const int i = s - (K - 1);
        const int m = s - Tn;              // new_state[m] = xp[T + m]: its cotangent adds in
        if (i >= t0) {{{dns}
          STV(dx, (b * Tn + i) * Xn + c, dxv);
        }} else if (t0 == 0 && i < 0) {{     // dstate[s] = sum_k w[k] dp[s - k] (+ dns where T < K - 1)
          for (int j = 0; j < VW; ++j) {{
            const float d = {dns_state};
            dstate[(b * (K - 1) + s) * Cn + c + j] = static_cast<T>(dxv[j] + d);
          }}
        }}"""


def _backward_pipe(split: bool, vw: int = 8) -> str:
    """vw 8: `BWD_PIPE` (16-byte loads and stores of 8 channels, scalar stores of the dw / db share);
    vw 4: `BWD_PIPE4` (8-byte loads and stores of 4 channels, the share in 16-byte float stores;
    `_VEC_IO4`'s LDV / STV)."""
    def steps(i, s0):
        return f"""
#pragma unroll
      for (int u = 0; u < AHEAD; ++u) {{
        const int s = {s0} + u;
        float xv[VW], gv[VW];
        cvt{vw}(xr[{i}][u], xv);
        cvt{vw}(gr[{i}][u], gv);{_bwd_step(False)}
      }}"""
    load, tail = _pipe_loads([("x", "x", "Xn", "c"), ("g", "dy_p", "dy_w", "dy_c")], vw)
    share = ("""
      for (int j = 0; j < VW; ++j) dwb[((b * ny + bid_y) * (K + 1) + k) * Cn + c + j] = dwk[k][j];""" if vw == 8
             else """
      st4(dwb + ((b * ny + bid_y) * (K + 1) + k) * Cn + c, dwk[k]);""")
    return _head(True) + _rows("dy", split, "const ") + _BWD_ACC + f"""\
    constexpr int NT = AHEAD + K - 2;      // steps after the whole batches: the partial batch, the halo
    const int pe = s1 < Tn ? s1 : Tn;      // rows loaded / prefetched: the tile's and the halo's
    Raw{vw}<T> xr[2][AHEAD], gr[2][AHEAD], xt[NT], gt[NT];""" + _pipe_loop(load, steps, tail) + f"""
#pragma unroll
    for (int q = 0; q < NT; ++q) {{         // the tile's partial last batch and the K - 1 steps after it
      const int s = te + q;
      if (s < s1) {{
        float xv[VW], gv[VW];              // x and dy at s (0 past the end)
        if (s < Tn) {{
          cvt{vw}(xt[q], xv);
          cvt{vw}(gt[q], gv);
        }} else {{
          for (int j = 0; j < VW; ++j) xv[j] = gv[j] = 0.0f;
        }}""" + _bwd_step(True) + """
      }
    }
    const int ny = (Tn + TILE - 1) / TILE;
    for (int k = 0; k <= K; ++k)""" + share + """
  }
"""


KERNEL = Kernel(name="alloy_causal_conv1d", inputs=("x", "w", "bias", "state"), outputs=("y", "new_state"),
                body=_forward(False), helpers=VEC_IO)
BWD = Kernel(name="alloy_causal_conv1d_bwd", inputs=("x", "w", "bias", "state", "dy", "dns", "dtail"),
             outputs=("dx", "dstate", "dwb"), body=_backward(False), helpers=VEC_IO)
# template ints C0, C1: the widths of y0 / y1 (dy0 / dy1); y2 takes the remaining C - C0 - C1 channels
KERNEL_SPLIT = Kernel(name="alloy_causal_conv1d_split", inputs=("x", "w", "bias", "state"),
                      outputs=("y0", "y1", "y2", "new_state"), body=_forward(True), helpers=VEC_IO)
BWD_SPLIT = Kernel(name="alloy_causal_conv1d_split_bwd",
                   inputs=("x", "w", "bias", "state", "dy0", "dy1", "dy2", "dns", "dtail"),
                   outputs=("dx", "dstate", "dwb"), body=_backward(True), helpers=VEC_IO)
# the "pipe" variants of the four (template int PREF besides; VW 8 only)
_FWD_BOUNDS = (GROUP, FWD_MIN_GROUPS) if FWD_MIN_GROUPS else ()
KERNEL_PIPE = Kernel(name="alloy_causal_conv1d_pipe", inputs=KERNEL.inputs, outputs=KERNEL.outputs,
                     body=_forward_pipe(False), helpers=VEC_IO, launch_bounds=_FWD_BOUNDS)
BWD_PIPE = Kernel(name="alloy_causal_conv1d_bwd_pipe", inputs=BWD.inputs, outputs=BWD.outputs,
                  body=_backward_pipe(False), helpers=VEC_IO)
KERNEL_SPLIT_PIPE = Kernel(name="alloy_causal_conv1d_split_pipe", inputs=KERNEL_SPLIT.inputs,
                           outputs=KERNEL_SPLIT.outputs, body=_forward_pipe(True), helpers=VEC_IO,
                           launch_bounds=_FWD_BOUNDS)
BWD_SPLIT_PIPE = Kernel(name="alloy_causal_conv1d_split_bwd_pipe", inputs=BWD_SPLIT.inputs,
                        outputs=BWD_SPLIT.outputs, body=_backward_pipe(True), helpers=VEC_IO)
# LDV / STV of the VW 4 kernels: 4 channels as one 8-byte access for bf16 / fp16 (o a multiple of 4)
_VEC_IO4 = """
#define LDV(p, o, v) { cvt4(ldr4(p + (o)), v); }
#define STV(p, o, v) { st4(p + (o), v); }
"""
# the pipe gradients at 4 channels per thread (template VW 4; `BWD_PIPE_VW` = 4 picks them)
_BWD4_BOUNDS = (GROUP, BWD_PIPE4_MIN_GROUPS) if BWD_PIPE4_MIN_GROUPS else ()
BWD_PIPE4 = Kernel(name="alloy_causal_conv1d_bwd_pipe4", inputs=BWD.inputs, outputs=BWD.outputs,
                   body=_backward_pipe(False, 4), helpers=_VEC_IO4, launch_bounds=_BWD4_BOUNDS)
BWD_SPLIT_PIPE4 = Kernel(name="alloy_causal_conv1d_split_bwd_pipe4", inputs=BWD_SPLIT.inputs,
                         outputs=BWD_SPLIT.outputs, body=_backward_pipe(True, 4), helpers=_VEC_IO4,
                         launch_bounds=_BWD4_BOUNDS)


def _plan(x, widths, vec: int = 8, tail: int = 0) -> tuple[int, int]:
    """(VW, tile) for x (B, T, C + tail): VW `vec` (8, or 4 for `BWD_PIPE4`) where C, C + tail and the
    split widths are multiples of it and x has more than one row (a single row may be a channel slice of a wider
    one at any offset, which MLX passes uncopied: no 16- / 8-byte alignment), else 1; the tile halves
    from TILE while there would be fewer than MIN_ITEMS work items (not below TILE_MIN), counted in
    8-channel items for VW 4 too: VW 4 keeps VW 8's tiles, hence its dweight / dbias shares bit for
    bit."""
    if vec not in (4, 8):
        raise ValueError(f"conv1d: channels per thread must be 8 or 4, got {vec!r}")
    B, T, X = x.shape
    C = X - tail
    vw = vec if B * T > 1 and all(n % vec == 0 for n in (X, C, *(widths or ()))) else 1
    tile = TILE
    while tile > TILE_MIN and B * groups(T, tile) * groups(C, 8 if vw > 1 else 1) < MIN_ITEMS:
        tile //= 2
    return vw, tile


def _template(x, K: int, silu: bool, widths, variant: str = "stream",
              pipe_ahead: int = 0, vec: int = 8, tail: int = 0) -> tuple[list, int, int, bool]:
    """(template arguments, VW, tile, pipe): pipe where `variant` is "pipe" and VW is 8 (or 4: vec 4,
    the VW 4 pipe gradients only) (the pipe kernels' template: AHEAD pipe_ahead, and PREF); with
    ``widths`` (three channel counts summing to C) the split kernels' C0, C1."""
    if tail < 0 or tail >= x.shape[2]:
        raise ValueError(f"conv1d: the passed-through tail must leave channels: 0 <= tail < {x.shape[2]}, got {tail}")
    if widths is not None and (len(widths) != 3 or min(widths) < 1 or sum(widths) != x.shape[2] - tail):
        raise ValueError(f"conv1d: widths must be three positive channel counts summing to C = "
                         f"{x.shape[2] - tail}, got {tuple(widths)}")
    if variant not in VARIANTS:
        raise ValueError(f"conv1d: variant must be one of {VARIANTS}, got {variant!r}")
    if vec == 4 and variant != "pipe":
        raise ValueError("conv1d: 4 channels per thread is a pipe kernel's (the streaming kernels take 8 or 1)")
    vw, tile = _plan(x, widths, vec, tail)
    pipe = variant == "pipe" and vw > 1
    t = [("T", x.dtype), ("K", K), ("TILE", tile), ("SILU", bool(silu)), ("VW", vw),
         ("AHEAD", int(pipe_ahead if pipe else AHEAD)), ("XT", int(tail))]
    if pipe:
        t += [("PREF", int(PREFETCH))]
    if widths is not None:
        t += [("C0", int(widths[0])), ("C1", int(widths[1]))]
    return t, vw, tile, pipe


def _bwd_launch(kernels, x, weight, bias, state, dys, dns, silu: bool, widths=None, dtail=None):
    """The gradient kernel alone -> (dx, dstate, the (B * tiles, (K + 1) * C) float32 shares of
    dweight / dbias); kernels: (the streaming gradient kernel, its pipe variant, the pipe variant at
    4 channels per thread), picked by `BWD_VARIANT` and `BWD_PIPE_VW`. x (B, T, C + XT) with
    dtail (B, T, XT), the cotangent of its passed-through columns (XT = 0: None), written into dx's."""
    B, T, X = x.shape
    C, K = weight.shape
    tail = X - C
    if (dtail is None) != (tail == 0) or (dtail is not None and dtail.shape != (B, T, tail)):
        raise ValueError(f"conv1d: x has {X} columns for {C} channels: the gradient needs dtail of shape "
                         f"{(B, T, tail)}, got {None if dtail is None else dtail.shape}")
    if BWD_PIPE_VW not in (4, 8):
        raise ValueError(f"conv1d: BWD_PIPE_VW must be 8 or 4, got {BWD_PIPE_VW!r}")
    vec = BWD_PIPE_VW if BWD_VARIANT == "pipe" else 8
    template, vw, tile, pipe = _template(x, K, silu, widths, BWD_VARIANT, PIPE_AHEAD_BWD, vec, tail)
    kernel = kernels[2] if pipe and vw == 4 else kernels[pipe]
    bounds = getattr(kernel, "launch_bounds", ())
    if bounds and bounds[0] != GROUP:
        raise ValueError(f"conv1d: {kernel.name} is built for groups of {bounds[0]} threads, GROUP is {GROUP}: "
                         "rebuild it with launch_bounds (GROUP, BWD_PIPE4_MIN_GROUPS) (as bench/conv_tune.py does)")
    ny = groups(T, tile)
    dx, dstate, dwb = kernel(
        [x, weight, bias, state, *(d.astype(x.dtype) for d in dys), dns.astype(x.dtype),
         dns[:1, :1, :1] if dtail is None else dtail.astype(x.dtype)],  # (no tail: an unread stand-in)
        template=template,
        grid=(groups(groups(C, vw), GROUP), ny, B),
        threadgroup=GROUP,
        output_shapes=[(B, T, X), (B, K - 1, C), (B * ny, (K + 1) * C)],
        output_dtypes=[x.dtype, x.dtype, mx.float32],
    )
    return dx, dstate, dwb


def _vjp(kernels, x, weight, bias, state, dys, dns, silu: bool, widths=None, dtail=None):
    C, K = weight.shape
    dx, dstate, dwb = _bwd_launch(kernels, x, weight, bias, state, dys, dns, silu, widths, dtail)
    dwb = sum_rows(dwb).reshape(K + 1, C)  # (B * tiles, (K + 1) * C) shares
    return dx, dwb[:K].T.astype(weight.dtype), dwb[K].astype(bias.dtype), dstate.astype(state.dtype)


def _forward_launch(kernels, x, weight, bias, state, silu: bool, widths=None):
    """kernels: (the streaming forward kernel, its pipe variant), picked by `FWD_VARIANT`. x may
    carry columns past weight's C channels (read past, not convolved)."""
    B, T, X = x.shape
    C, K = weight.shape
    template, vw, tile, pipe = _template(x, K, silu, widths, FWD_VARIANT, PIPE_AHEAD_FWD, tail=X - C)
    bounds = getattr(kernels[pipe], "launch_bounds", ())
    if bounds and bounds[0] != GROUP:
        raise ValueError(f"conv1d: {kernels[pipe].name} is built for groups of {bounds[0]} threads, GROUP is "
                         f"{GROUP}: rebuild it with launch_bounds (GROUP, FWD_MIN_GROUPS) (as bench/conv_tune.py does)")
    return kernels[pipe](
        [x, weight, bias, state],
        template=template,
        grid=(groups(groups(C, vw), GROUP), groups(T, tile), B),
        threadgroup=GROUP,
        output_shapes=[(B, T, w) for w in (widths or (C,))] + [(B, K - 1, C)],
        output_dtypes=[x.dtype] * (len(widths or (C,)) + 1),
    )


def causal_conv1d_vjp(x, weight, bias, state, dy, dns, silu: bool):
    """The gradient of `causal_conv1d` (same arguments; dy, dns: cotangents of y and new_state) ->
    (dx, dweight (C, K), dbias (C,), dstate) in the argument dtypes. One launch (per-tile shares of
    dweight / dbias in float32, summed here)."""
    return _vjp((BWD, BWD_PIPE, BWD_PIPE4), x, weight, bias, state, (dy,), dns, silu)


def causal_conv1d(x, weight, bias, state, silu: bool):
    """Launch the fused kernel. x (B, T, C); weight (C, K), K >= 2; bias (C,); state (B, K-1, C)
    -> (y (B, T, C), new_state (B, K-1, C)), both in x.dtype."""
    y, new_state = _forward_launch((KERNEL, KERNEL_PIPE), x, weight, bias, state, silu)
    return y, new_state


def causal_conv1d_split(x, weight, bias, state, silu: bool, widths):
    """`causal_conv1d` with y written as three arrays split along channels: widths (C0, C1, C2),
    positive, summing to C -> (y0 (B, T, C0), y1 (B, T, C1), y2 (B, T, C2), new_state (B, K-1, C)),
    each contiguous, in x.dtype. x may be (B, T, C + XT): its last XT columns are not convolved (see
    `causal_conv1d_split_vjp`'s dtail)."""
    y0, y1, y2, new_state = _forward_launch((KERNEL_SPLIT, KERNEL_SPLIT_PIPE), x, weight, bias, state, silu,
                                            tuple(widths))
    return y0, y1, y2, new_state


def causal_conv1d_split_vjp(x, weight, bias, state, dy0, dy1, dy2, dns, silu: bool, widths, dtail=None):
    """The gradient of `causal_conv1d_split`: the cotangents of y0, y1, y2 (widths C0, C1, C2) and
    new_state -> (dx, dweight, dbias, dstate) as `causal_conv1d_vjp`; no concatenation of dy. For x
    of C + XT columns, dtail (B, T, XT) is the cotangent of its last XT columns (which a caller reads
    past the conv, e.g. Mamba-2's dt): dx (B, T, C + XT) carries it there, so the projection that
    wrote x takes one gradient, not a concatenation."""
    return _vjp((BWD_SPLIT, BWD_SPLIT_PIPE, BWD_SPLIT_PIPE4), x, weight, bias, state, (dy0, dy1, dy2), dns, silu,
                tuple(widths), dtail)

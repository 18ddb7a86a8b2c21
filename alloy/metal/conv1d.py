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


def _head() -> str:
    """The opening every kernel here shares: channels c .. c + VW - 1 of batch row b over the tile
    t0 .. t1 - 1, their weights and bias, and the window xw of the K-1 inputs before the tile. Opens
    the work item's `if`."""
    return f"""
  const int Tn = x_shape[1];
  const int Cn = x_shape[2];
  const int c = (bid_x * nthreads + tid) * VW;  // the first of this thread's VW channels
  const int b = bid_z;
  const int t0 = bid_y * TILE;
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
        LDV(x, (b * Tn + i) * Cn + c, xw[k]);
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
          LDV(x, (b * Tn + s0 + u) * Cn + c, xv[u]);
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
    }
    if (t0 == 0) {  // new_state[m] = xp[T + m]
      for (int m = 0; m < K - 1; ++m) {
        const int i = Tn + m - (K - 1);
        for (int j = 0; j < VW; ++j)
          new_state[(b * (K - 1) + m) * Cn + c + j] =
              i >= 0 ? static_cast<T>(static_cast<float>(x[(b * Tn + i) * Cn + c + j]))
                     : static_cast<T>(static_cast<float>(state[(b * (K - 1) + Tn + m) * Cn + c + j]));
      }
    }
  }
"""


def _backward(split: bool) -> str:
    # step s: dp[s] from x / dy at s and the window; its share of dw / db while s is in the tile;
    # then dx[s - (K - 1)], whose K d pre-activations dp[s - K + 1 .. s] are all known
    return _head() + _rows("dy", split, "const ") + """
    const int s1 = t1 + K - 1;             // steps t0 .. s1 - 1: the tile and the K - 1 after it
    float dwk[K + 1][VW];                  // this work item's share of dw[k] = sum_t dp[t] xp[t + k], db = sum_t dp[t]
    float dpw[K - 1][VW];                  // dp at the K - 1 steps before (0 before t0)
    for (int j = 0; j < VW; ++j) {
      for (int k = 0; k <= K; ++k) dwk[k][j] = 0.0f;
      for (int k = 0; k < K - 1; ++k) dpw[k][j] = 0.0f;
    }
    for (int s0 = t0; s0 < s1; s0 += AHEAD) {
      float xv[AHEAD][VW];                  // x and dy at the next AHEAD steps (0 past the end)
      float gv[AHEAD][VW];
#pragma unroll
      for (int u = 0; u < AHEAD; ++u) {
        const int s = s0 + u;
        if (s < Tn) {
          LDV(x, (b * Tn + s) * Cn + c, xv[u]);
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
            STV(dx, (b * Tn + i) * Cn + c, dxv);
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


KERNEL = Kernel(name="alloy_causal_conv1d", inputs=("x", "w", "bias", "state"), outputs=("y", "new_state"),
                body=_forward(False), helpers=VEC_IO)
BWD = Kernel(name="alloy_causal_conv1d_bwd", inputs=("x", "w", "bias", "state", "dy", "dns"),
             outputs=("dx", "dstate", "dwb"), body=_backward(False), helpers=VEC_IO)
# template ints C0, C1: the widths of y0 / y1 (dy0 / dy1); y2 takes the remaining C - C0 - C1 channels
KERNEL_SPLIT = Kernel(name="alloy_causal_conv1d_split", inputs=("x", "w", "bias", "state"),
                      outputs=("y0", "y1", "y2", "new_state"), body=_forward(True), helpers=VEC_IO)
BWD_SPLIT = Kernel(name="alloy_causal_conv1d_split_bwd",
                   inputs=("x", "w", "bias", "state", "dy0", "dy1", "dy2", "dns"),
                   outputs=("dx", "dstate", "dwb"), body=_backward(True), helpers=VEC_IO)


def _plan(x, widths) -> tuple[int, int]:
    """(VW, tile) for x (B, T, C): VW 8 where C and the split widths are multiples of 8 and x has
    more than one row (a single row may be a channel slice of a wider one at any offset, which MLX
    passes uncopied: no 16-byte alignment), else 1; the tile halves from TILE while there would be
    fewer than MIN_ITEMS work items (not below TILE_MIN)."""
    B, T, C = x.shape
    vw = 8 if B * T > 1 and all(n % 8 == 0 for n in (C, *(widths or ()))) else 1
    tile = TILE
    while tile > TILE_MIN and B * groups(T, tile) * groups(C, vw) < MIN_ITEMS:
        tile //= 2
    return vw, tile


def _template(x, K: int, silu: bool, widths) -> tuple[list, int, int]:
    """(template arguments, VW, tile); with ``widths`` (three channel counts summing to C) the split
    kernels' C0, C1."""
    if widths is not None and (len(widths) != 3 or min(widths) < 1 or sum(widths) != x.shape[2]):
        raise ValueError(f"conv1d: widths must be three positive channel counts summing to C = {x.shape[2]}, "
                         f"got {tuple(widths)}")
    vw, tile = _plan(x, widths)
    t = [("T", x.dtype), ("K", K), ("TILE", tile), ("SILU", bool(silu)), ("VW", vw), ("AHEAD", int(AHEAD))]
    if widths is not None:
        t += [("C0", int(widths[0])), ("C1", int(widths[1]))]
    return t, vw, tile


def _vjp(kernel, x, weight, bias, state, dys, dns, silu: bool, widths=None):
    B, T, C = x.shape
    K = weight.shape[1]
    template, vw, tile = _template(x, K, silu, widths)
    ny = groups(T, tile)
    dx, dstate, dwb = kernel(
        [x, weight, bias, state, *(d.astype(x.dtype) for d in dys), dns.astype(x.dtype)],
        template=template,
        grid=(groups(groups(C, vw), GROUP), ny, B),
        threadgroup=GROUP,
        output_shapes=[(B, T, C), (B, K - 1, C), (B * ny, (K + 1) * C)],
        output_dtypes=[x.dtype, x.dtype, mx.float32],
    )
    dwb = sum_rows(dwb).reshape(K + 1, C)  # (B * tiles, (K + 1) * C) shares
    return dx, dwb[:K].T.astype(weight.dtype), dwb[K].astype(bias.dtype), dstate.astype(state.dtype)


def _forward_launch(kernel, x, weight, bias, state, silu: bool, widths=None):
    B, T, C = x.shape
    K = weight.shape[1]
    template, vw, tile = _template(x, K, silu, widths)
    return kernel(
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
    return _vjp(BWD, x, weight, bias, state, (dy,), dns, silu)


def causal_conv1d(x, weight, bias, state, silu: bool):
    """Launch the fused kernel. x (B, T, C); weight (C, K), K >= 2; bias (C,); state (B, K-1, C)
    -> (y (B, T, C), new_state (B, K-1, C)), both in x.dtype."""
    y, new_state = _forward_launch(KERNEL, x, weight, bias, state, silu)
    return y, new_state


def causal_conv1d_split(x, weight, bias, state, silu: bool, widths):
    """`causal_conv1d` with y written as three arrays split along channels: widths (C0, C1, C2),
    positive, summing to C -> (y0 (B, T, C0), y1 (B, T, C1), y2 (B, T, C2), new_state (B, K-1, C)),
    each contiguous, in x.dtype."""
    y0, y1, y2, new_state = _forward_launch(KERNEL_SPLIT, x, weight, bias, state, silu, tuple(widths))
    return y0, y1, y2, new_state


def causal_conv1d_split_vjp(x, weight, bias, state, dy0, dy1, dy2, dns, silu: bool, widths):
    """The gradient of `causal_conv1d_split`: the cotangents of y0, y1, y2 (widths C0, C1, C2) and
    new_state -> (dx, dweight, dbias, dstate) as `causal_conv1d_vjp`; no concatenation of dy."""
    return _vjp(BWD_SPLIT, x, weight, bias, state, (dy0, dy1, dy2), dns, silu, tuple(widths))

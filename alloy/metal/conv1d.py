"""Fused causal depthwise conv1d (+ optional SiLU) with the carried state in and out.

    xp = concat(state, x) along time;  y_t = act(b + sum_k w[:, k] * xp[t + k]);  new_state = xp[-(K-1):]

One launch serves prefill (any T) and the single-step state update (T = 1). Work item: one
channel c of one batch row b over a tile of TILE time steps; the K-1 inputs before the tile are
loaded once (from `state` or `x`), then the window slides in registers. Channels are the fastest
index of x, so a group of threads reads one contiguous row of x per step. The group holding the
first tile also writes the new state. The tile is loaded into registers before any store, so
its loads are all in flight at once.

Shapes: x (B, T, C), weight (C, K) with K >= 2, bias (C,), state (B, K-1, C) -> y (B, T, C) in
x.dtype, new_state (B, K-1, C) in x.dtype. The state is rounded to x.dtype before use, as in
`alloy.ops.conv.causal_conv1d_ref`.

`BWD` is its gradient in one launch, a work item covering `BWD_TILES` consecutive tiles of one
channel: each tile's pre-activations are recomputed from x (and the K-1 steps after the tile, whose
gradients reach the tile's inputs), dx / dstate are the transposed convolution of d pre-activation,
and each work item writes its share of dweight / dbias, (K+1, C) channel-fastest (summed by MLX
afterwards, no atomics).

`KERNEL_SPLIT` / `BWD_SPLIT` are the same kernels with y (and dy) as three arrays split along
channels, y0 (B, T, C0), y1 (B, T, C1), y2 (B, T, C - C0 - C1), each contiguous: a consumer that
splits the conv's output (Mamba-2's x, B, C) gets contiguous pieces with no slicing copies before
the kernels that read them, and no concatenation of their cotangents in the backward.
"""
from __future__ import annotations

import mlx.core as mx

from alloy.metal.prelude import Kernel, groups

TILE = 16  # time steps per work item: halo overhead (K-1)/TILE, still B*C*T/TILE work items
GROUP = 128  # threads per group, along channels
# tiles per work item of the gradient kernels (its float32 dweight / dbias shares shrink by this
# factor: 73 MB per toy layer at 1; 16 x 2048 x 1792 channels). 1 until measured on a GPU.
BWD_TILES = 1


def _head() -> str:
    """The opening every kernel here shares: channel c of batch row b, its weights and bias. Opens
    the channel's `if`."""
    return """
  const int Tn = x_shape[1];
  const int Cn = x_shape[2];
  const int c = bid_x * nthreads + tid;
  const int b = bid_z;
  if (c < Cn) {
    float wk[K];
    for (int k = 0; k < K; ++k) wk[k] = static_cast<float>(w[c * K + k]);
    const float bv = static_cast<float>(bias[c]);"""


def _tile(nx: str) -> str:
    """xs = xp[t0 .. t0 + nx - 1] for the tile from t0 (the K-1 inputs before the tile come from x
    or the carried state; past the end: 0), loaded before any store so that all loads are in flight
    at once (outputs may alias x as far as the compiler knows)."""
    return f"""
      float xs[{nx}];
      for (int k = 0; k < {nx}; ++k) {{
        const int i = t0 + k - (K - 1);  // index into x; negative -> the carried state
        xs[k] = i < 0 ? static_cast<float>(static_cast<T>(state[(b * (K - 1) + i + K - 1) * Cn + c]))
              : (i < Tn ? static_cast<float>(x[(b * Tn + i) * Cn + c]) : 0.0f);
      }}"""


def _rows(name: str, split: bool, qual: str = "") -> str:
    """Defines `<NAME>_AT(t)`, the element of the (B, T, C) rows `name` at step t of the work item's
    channel c. Split: the rows are the three arrays name0 / name1 / name2 of widths C0, C1 and
    C - C0 - C1 along channels; c's array, row width and column are picked once per work item.
    qual: "const " for an input."""
    at = f"{name.upper()}_AT"
    if not split:
        return f"""
#define {at}(t) {name}[(b * Tn + (t)) * Cn + c]"""
    return f"""
    const bool in0 = c < C0, in1 = c < C0 + C1;
    {qual}DEV T* const {name}_p = in0 ? {name}0 : (in1 ? {name}1 : {name}2);
    const int {name}_w = in0 ? C0 : (in1 ? C1 : Cn - C0 - C1);
    const int {name}_c = in0 ? c : (in1 ? c - C0 : c - C0 - C1);
#define {at}(t) {name}_p[(b * Tn + (t)) * {name}_w + {name}_c]"""


def _forward(split: bool) -> str:
    return _head() + _rows("y", split) + """
    const int t0 = bid_y * TILE;
    if (t0 < Tn) {""" + _tile("TILE + K - 1") + """
      for (int u = 0; u < TILE; ++u) {
        if (t0 + u < Tn) {
          float acc = 0.0f;
          for (int k = 0; k < K; ++k) acc += wk[k] * xs[u + k];
          acc += bv;
          if (SILU) acc = fsilu(acc);
          Y_AT(t0 + u) = static_cast<T>(acc);
        }
      }
      if (t0 == 0) {  // new_state[j] = xp[T + j]
        for (int j = 0; j < K - 1; ++j) {
          const int i = Tn + j - (K - 1);
          new_state[(b * (K - 1) + j) * Cn + c] =
              i >= 0 ? static_cast<T>(static_cast<float>(x[(b * Tn + i) * Cn + c]))
                     : static_cast<T>(static_cast<float>(state[(b * (K - 1) + Tn + j) * Cn + c]));
        }
      }
    }
  }
"""


def _backward(split: bool) -> str:
    # a work item covers RT consecutive tiles of its channel, one after the other, and writes one
    # share of dweight / dbias for all of them (channel-fastest: coalesced stores)
    return _head() + _rows("dy", split, "const ") + """
    const int nt = (Tn + TILE - 1) / TILE;
    const int ny = (nt + RT - 1) / RT;      // work items along time
    float dwk[K + 1];
    for (int k = 0; k <= K; ++k) dwk[k] = 0.0f;
    for (int r = 0; r < RT; ++r) {
      const int t0 = (bid_y * RT + r) * TILE;
      if (t0 >= Tn) break;""" + _tile("TILE + 2 * (K - 1)") + """
      // dy on the tile and the K-1 steps after it (their gradients reach the tile's inputs)
      float dp[TILE + K - 1];               // d pre-activation at t0 .. t0 + TILE + K - 2 (0 past the end)
      for (int u = 0; u < TILE + K - 1; ++u) {
        const int t = t0 + u;
        float g = t < Tn ? static_cast<float>(DY_AT(t)) : 0.0f;
        if (SILU && t < Tn) {
          float pre = bv;
          for (int k = 0; k < K; ++k) pre += wk[k] * xs[u + k];
          const float sg = 1.0f / (1.0f + fexp(-pre));
          g *= sg * (1.0f + pre * (1.0f - sg));
        }
        dp[u] = g;
      }
      // this tile's share of dw[k] = sum_t dp[t] xp[t + k] and db = sum_t dp[t]
      for (int u = 0; u < TILE; ++u) {
        for (int k = 0; k < K; ++k) dwk[k] += dp[u] * xs[u + k];
        dwk[K] += dp[u];
      }
      // dx[i] = sum_k w[k] dp[i + K - 1 - k] (+ the new state's cotangent on the last K - 1 inputs)
      for (int u = 0; u < TILE; ++u) {
        const int i = t0 + u;
        if (i < Tn) {
          float acc = 0.0f;
          for (int k = 0; k < K; ++k) acc += wk[k] * dp[u + K - 1 - k];
          const int m = i + K - 1 - Tn;      // new_state[m] = x[i]
          if (m >= 0) acc += static_cast<float>(dns[(b * (K - 1) + m) * Cn + c]);
          dx[(b * Tn + i) * Cn + c] = static_cast<T>(acc);
        }
      }
      if (t0 == 0) {                         // dstate[j] = sum_k w[k] dp[j - k] (+ dns where T < K - 1)
        for (int j = 0; j < K - 1; ++j) {
          float acc = 0.0f;
          for (int k = 0; k <= j; ++k) acc += wk[k] * dp[j - k];
          if (j >= Tn) acc += static_cast<float>(dns[(b * (K - 1) + j - Tn) * Cn + c]);
          dstate[(b * (K - 1) + j) * Cn + c] = static_cast<T>(acc);
        }
      }
    }
    for (int k = 0; k <= K; ++k) dwb[((b * ny + bid_y) * (K + 1) + k) * Cn + c] = dwk[k];
  }
"""


KERNEL = Kernel(name="alloy_causal_conv1d", inputs=("x", "w", "bias", "state"), outputs=("y", "new_state"),
                body=_forward(False))
BWD = Kernel(name="alloy_causal_conv1d_bwd", inputs=("x", "w", "bias", "state", "dy", "dns"),
             outputs=("dx", "dstate", "dwb"), body=_backward(False))
# template ints C0, C1: the widths of y0 / y1 (dy0 / dy1); y2 takes the remaining C - C0 - C1 channels
KERNEL_SPLIT = Kernel(name="alloy_causal_conv1d_split", inputs=("x", "w", "bias", "state"),
                      outputs=("y0", "y1", "y2", "new_state"), body=_forward(True))
BWD_SPLIT = Kernel(name="alloy_causal_conv1d_split_bwd",
                   inputs=("x", "w", "bias", "state", "dy0", "dy1", "dy2", "dns"),
                   outputs=("dx", "dstate", "dwb"), body=_backward(True))


def _template(x, K: int, silu: bool, widths) -> list:
    """The template arguments; with ``widths`` (three channel counts summing to C) the split
    kernels' C0, C1."""
    t = [("T", x.dtype), ("K", K), ("TILE", TILE), ("SILU", bool(silu))]
    if widths is None:
        return t
    if len(widths) != 3 or min(widths) < 1 or sum(widths) != x.shape[2]:
        raise ValueError(f"conv1d: widths must be three positive channel counts summing to C = {x.shape[2]}, "
                         f"got {tuple(widths)}")
    return t + [("C0", int(widths[0])), ("C1", int(widths[1]))]


def _vjp(kernel, x, weight, bias, state, dys, dns, silu: bool, widths=None):
    B, T, C = x.shape
    K = weight.shape[1]
    rt = max(1, int(BWD_TILES))
    ny = groups(groups(T, TILE), rt)
    dx, dstate, dwb = kernel(
        [x, weight, bias, state, *(d.astype(x.dtype) for d in dys), dns.astype(x.dtype)],
        template=_template(x, K, silu, widths) + [("RT", rt)],
        grid=(groups(C, GROUP), ny, B),
        threadgroup=GROUP,
        output_shapes=[(B, T, C), (B, K - 1, C), (B, ny, K + 1, C)],
        output_dtypes=[x.dtype, x.dtype, mx.float32],
    )
    dwb = dwb.sum(axis=(0, 1))  # (K + 1, C)
    return dx, dwb[:K].T.astype(weight.dtype), dwb[K].astype(bias.dtype), dstate.astype(state.dtype)


def _forward_launch(kernel, x, weight, bias, state, silu: bool, widths=None):
    B, T, C = x.shape
    K = weight.shape[1]
    return kernel(
        [x, weight, bias, state],
        template=_template(x, K, silu, widths),
        grid=(groups(C, GROUP), groups(T, TILE), B),
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

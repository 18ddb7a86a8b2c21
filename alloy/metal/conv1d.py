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
`alloy.ops.conv.causal_conv1d_ref`. Inference kernel; `alloy.ops.conv` gives it a VJP through the
reference ops.
"""
from __future__ import annotations

import mlx.core as mx

from alloy.metal.prelude import Kernel, groups

TILE = 16  # time steps per work item: halo overhead (K-1)/TILE, still B*C*T/TILE work items
GROUP = 128  # threads per group, along channels

KERNEL = Kernel(
    name="alloy_causal_conv1d",
    inputs=("x", "w", "bias", "state"),
    outputs=("y", "new_state"),
    body="""
  const int Tn = x_shape[1];
  const int Cn = x_shape[2];
  const int c = bid_x * nthreads + tid;
  const int t0 = bid_y * TILE;
  const int b = bid_z;
  if (c < Cn && t0 < Tn) {
    float wk[K];
    for (int k = 0; k < K; ++k) wk[k] = static_cast<float>(w[c * K + k]);
    const float bv = static_cast<float>(bias[c]);
    // the tile and the K-1 inputs before it, xp[t0 .. t0 + TILE + K - 2], loaded before any
    // store so that all loads are in flight at once (y may alias x as far as the compiler knows)
    float xs[TILE + K - 1];
    for (int k = 0; k < TILE + K - 1; ++k) {
      const int i = t0 + k - (K - 1);  // index into x; negative -> the carried state
      xs[k] = i < 0 ? static_cast<float>(static_cast<T>(state[(b * (K - 1) + i + K - 1) * Cn + c]))
            : (i < Tn ? static_cast<float>(x[(b * Tn + i) * Cn + c]) : 0.0f);
    }
    for (int u = 0; u < TILE; ++u) {
      if (t0 + u < Tn) {
        float acc = 0.0f;
        for (int k = 0; k < K; ++k) acc += wk[k] * xs[u + k];
        acc += bv;
        if (SILU) acc = fsilu(acc);
        y[(b * Tn + t0 + u) * Cn + c] = static_cast<T>(acc);
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
""",
)


def causal_conv1d(x, weight, bias, state, silu: bool):
    """Launch the fused kernel. x (B, T, C); weight (C, K), K >= 2; bias (C,); state (B, K-1, C)
    -> (y (B, T, C), new_state (B, K-1, C)), both in x.dtype."""
    B, T, C = x.shape
    K = weight.shape[1]
    y, new_state = KERNEL(
        [x, weight, bias, state],
        template=[("T", x.dtype), ("K", K), ("TILE", TILE), ("SILU", bool(silu))],
        grid=(groups(C, GROUP), groups(T, TILE), B),
        threadgroup=GROUP,
        output_shapes=[(B, T, C), (B, K - 1, C)],
        output_dtypes=[x.dtype, x.dtype],
    )
    return y, new_state

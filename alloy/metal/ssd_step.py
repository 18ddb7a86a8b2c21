"""Mamba-2 SSD decode step in one launch: state update, readout and D skip.

    h' = exp(dt A) h + (dt x) ⊗ B ;   y = h' · C + D x          (per head; head i reads group i // (H/G))

Work item: one row (b, h, p) of the state (its n entries) per 32-lane warp; lanes stride over n,
the readout is a warp sum. The state (b, H, P, N) float32 dominates the traffic: read once,
written once.

Shapes: x (b, H, P), dt (b, H), A (H,), B/C (b, G, N), D (H,), state (b, H, P, N) float32
-> y (b, H, P) in x.dtype, new_state (b, H, P, N) float32. Inference kernel; `alloy.ops.ssd`
gives it a VJP through `ssd_step`.
"""
from __future__ import annotations

import mlx.core as mx

from alloy.metal.prelude import Kernel, groups

GROUP = 128  # 4 warps, 4 rows per group

KERNEL = Kernel(
    name="alloy_ssd_step",
    inputs=("x", "dt", "A", "B", "C", "D", "state"),
    outputs=("y", "new_state"),
    body="""
  const int H = x_shape[1];
  const int P = x_shape[2];
  const int G = B_shape[1];
  const int N = B_shape[2];
  const int row = bid_x * (nthreads / 32) + warp;  // (b * H + h) * P + p
  if (row < x_shape[0] * H * P) {                     // uniform across the warp
    const int bh = row / P;
    const int h = bh % H;
    const int b = bh / H;
    const int bn = (b * G + h / (H / G)) * N;
    const float dtv = static_cast<float>(dt[bh]);
    const float decay = fexp(dtv * static_cast<float>(A[h]));
    const float xv = static_cast<float>(x[row]);
    const float dx = dtv * xv;
    float acc = 0.0f;
    for (int j = lane; j < N; j += 32) {
      const float s = decay * static_cast<float>(state[row * N + j]) + dx * static_cast<float>(B[bn + j]);
      new_state[row * N + j] = s;
      acc += s * static_cast<float>(C[bn + j]);
    }
    acc = warp_sum(acc);
    if (lane == 0) y[row] = static_cast<T>(acc + static_cast<float>(D[h]) * xv);
  }
""",
)


def ssd_step(x, dt, A, B, C, D, state):
    """One fused decode step (see module docstring); all arguments are arrays (D and state given)."""
    b, H, P = x.shape
    G, N = B.shape[-2:]
    rows = b * H * P
    y, new_state = KERNEL(
        [x, dt, A, B, C, D, state],
        template=[("T", x.dtype)],
        grid=(groups(rows, GROUP // 32), 1, 1),
        threadgroup=GROUP,
        output_shapes=[(b, H, P), (b, H, P, N)],
        output_dtypes=[x.dtype, mx.float32],
    )
    return y, new_state

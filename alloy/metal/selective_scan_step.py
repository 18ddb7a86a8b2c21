"""Mamba-1 selective-scan decode step in one launch: state update, readout, D skip and gate.

    h' = exp(dt A) ∘ h + (dt x) B ;   y = (h' C + D x) · silu(z)          (per channel d)

Work item: one channel row (b, d) of the state (its n entries) per LANES lanes of a warp
(LANES = the power of two >= n, at most 32; lanes stride over n); the readout is a butterfly sum
inside those lanes. Every lane takes part in the shuffles, so rows past the end only mask loads.

Shapes: x, dt, z (b, D), A (D, N), B/C (b, N), Dskip (D,), state (b, D, N) float32 -> y (b, D)
in x.dtype, new_state (b, D, N) float32. Inference kernel; `alloy.ops.selective_scan` gives it a
VJP through `selective_scan_step`.
"""
from __future__ import annotations

import mlx.core as mx

from alloy.metal.prelude import Kernel, groups

GROUP = 128

KERNEL = Kernel(
    name="alloy_selective_scan_step",
    inputs=("x", "dt", "z", "A", "B", "C", "Dskip", "state"),
    outputs=("y", "new_state"),
    body="""
  const int Dn = x_shape[1];
  const int N = A_shape[1];
  const int gi = bid_x * nthreads + tid;
  const int row = gi / LANES;                 // b * Dn + d
  const int j0 = gi % LANES;
  const bool ok = row < x_shape[0] * Dn;
  const int b = ok ? row / Dn : 0;
  const int d = ok ? row % Dn : 0;
  const float dtv = ok ? static_cast<float>(dt[row]) : 0.0f;
  const float xv = ok ? static_cast<float>(x[row]) : 0.0f;
  float acc = 0.0f;
  for (int j = j0; j < N; j += LANES) {
    if (ok) {
      const float s = fexp(dtv * static_cast<float>(A[d * N + j])) * static_cast<float>(state[row * N + j])
                      + dtv * xv * static_cast<float>(B[b * N + j]);
      new_state[row * N + j] = s;
      acc += s * static_cast<float>(C[b * N + j]);
    }
  }
  for (int m = LANES / 2; m > 0; m >>= 1) acc += shfl_xor(acc, m);
  if (ok && j0 == 0) {
    float yv = acc + static_cast<float>(Dskip[d]) * xv;
    if (HAS_Z) yv *= fsilu(static_cast<float>(z[row]));
    y[row] = static_cast<T>(yv);
  }
""",
)


def lanes_for(n: int) -> int:
    """Lanes per state row: the power of two >= n, capped at the warp width 32."""
    lanes = 1
    while lanes < min(n, 32):
        lanes *= 2
    return lanes


def selective_scan_step(x, dt, A, B, C, D, z, state):
    """One fused decode step (see module docstring); z may be None (no gate), D and state given."""
    b, Dn = x.shape
    N = A.shape[1]
    lanes = lanes_for(N)
    y, new_state = KERNEL(
        [x, dt, x if z is None else z, A, B, C, D, state],
        template=[("T", x.dtype), ("LANES", lanes), ("HAS_Z", z is not None)],
        grid=(groups(b * Dn * lanes, GROUP), 1, 1),
        threadgroup=GROUP,
        output_shapes=[(b, Dn), (b, Dn, N)],
        output_dtypes=[x.dtype, mx.float32],
    )
    return y, new_state

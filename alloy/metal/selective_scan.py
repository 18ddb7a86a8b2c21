"""Mamba-1 selective scan forward (prefill) in one launch, with the carried state in and out.

    h_t = exp(dt_t A) ∘ h_{t-1} + (dt_t x_t) B_t ;   y_t = (h_t C_t + D x_t) · silu(z_t)

Work item: one channel row (b, d) per LANES lanes (the power of two >= n, at most 32); each lane
keeps NJ = ceil(n / LANES) state entries in registers and walks the sequence once, so the state
never touches memory between steps; y_t is a butterfly sum inside the lanes. Inputs are loaded
TB steps ahead of the recurrence, so the sweep is not a chain of dependent memory round trips. Parallel over
b * D rows, sequential over time: memory traffic is one read of x, dt, z, B, C and one write of y.

Shapes: x, dt, z (b, L, D), A (D, N), B/C (b, L, N), Dskip (D,), state (b, D, N) float32
-> y (b, L, D) in x.dtype, final state (b, D, N) float32. Inference kernel; `alloy.ops.selective_scan`
gives it a VJP through `selective_scan_chunked`.
"""
from __future__ import annotations

import mlx.core as mx

from alloy.metal.prelude import Kernel, groups
from alloy.metal.selective_scan_step import lanes_for

GROUP = 128
TB = 8  # time steps loaded ahead of the recurrence

KERNEL = Kernel(
    name="alloy_selective_scan",
    inputs=("x", "dt", "z", "A", "B", "C", "Dskip", "state"),
    outputs=("y", "final_state"),
    body="""
  const int L = x_shape[1];
  const int Dn = x_shape[2];
  const int N = A_shape[1];
  const int gi = bid_x * nthreads + tid;
  const int row = gi / LANES;                 // b * Dn + d
  const int j0 = gi % LANES;
  const bool ok = row < x_shape[0] * Dn;
  const int b = ok ? row / Dn : 0;
  const int d = ok ? row % Dn : 0;
  float h[NJ];
  float a[NJ];
  for (int i = 0; i < NJ; ++i) {
    const int j = j0 + i * LANES;
    const bool v = ok && j < N;
    h[i] = v ? static_cast<float>(state[row * N + j]) : 0.0f;
    a[i] = v ? static_cast<float>(A[d * N + j]) : 0.0f;
  }
  const float dskip = ok ? static_cast<float>(Dskip[d]) : 0.0f;
  for (int t0 = 0; t0 < L; t0 += TB) {
    // load TB steps before computing them: the loads are independent of the recurrence
    // (past the end: dt = 0, i.e. decay 1 and no input, so h is unchanged)
    float dts[TB];
    float xs[TB];
    float zs[TB];
    float bs[TB][NJ];
    float cs[TB][NJ];
    for (int u = 0; u < TB; ++u) {
      const int t = t0 + u;
      const bool v = ok && t < L;
      const int xi = (b * L + t) * Dn + d;
      dts[u] = v ? static_cast<float>(dt[xi]) : 0.0f;
      xs[u] = v ? static_cast<float>(x[xi]) : 0.0f;
      zs[u] = (v && HAS_Z) ? static_cast<float>(z[xi]) : 0.0f;
      for (int i = 0; i < NJ; ++i) {
        const int j = j0 + i * LANES;
        const bool vj = v && j < N;
        bs[u][i] = vj ? static_cast<float>(B[(b * L + t) * N + j]) : 0.0f;
        cs[u][i] = vj ? static_cast<float>(C[(b * L + t) * N + j]) : 0.0f;
      }
    }
    for (int u = 0; u < TB; ++u) {
      const float dx = dts[u] * xs[u];
      float acc = 0.0f;
      for (int i = 0; i < NJ; ++i) {
        h[i] = fexp(dts[u] * a[i]) * h[i] + dx * bs[u][i];
        acc += h[i] * cs[u][i];
      }
      for (int m = LANES / 2; m > 0; m >>= 1) acc += shfl_xor(acc, m);
      if (ok && j0 == 0 && t0 + u < L) {
        float yv = acc + dskip * xs[u];
        if (HAS_Z) yv *= fsilu(zs[u]);
        y[(b * L + t0 + u) * Dn + d] = static_cast<T>(yv);
      }
    }
  }
  for (int i = 0; i < NJ; ++i) {
    const int j = j0 + i * LANES;
    if (ok && j < N) final_state[row * N + j] = h[i];
  }
""",
)


def selective_scan(x, dt, A, B, C, D, z, state):
    """The fused forward scan (see module docstring); z may be None, D and state given."""
    b, L, Dn = x.shape
    N = A.shape[1]
    lanes = lanes_for(N)
    y, final_state = KERNEL(
        [x, dt, x if z is None else z, A, B, C, D, state],
        template=[("T", x.dtype), ("LANES", lanes), ("NJ", -(-N // lanes)), ("TB", TB), ("HAS_Z", z is not None)],
        grid=(groups(b * Dn * lanes, GROUP), 1, 1),
        threadgroup=GROUP,
        output_shapes=[(b, L, Dn), (b, Dn, N)],
        output_dtypes=[x.dtype, mx.float32],
    )
    return y, final_state

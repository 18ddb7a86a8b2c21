"""Matrix-vector products for decode, optionally behind a (grouped) RMSNorm of the input.

    xn = x                                              (NG = 0)
    xn = rms_norm_per_group(x) * nw                     (NG >= 1 groups of IN / NG, fp32 statistics)
    y[m, o] = sum_i W[o, i] * xn[m, i]  (+ bias[o]) (+ res[m, o])     W in the HF (out, in) layout

At batch-1 decode every op costs a launch and host-side graph work, whatever its size; the MLX
composition of a linear on one row is several graph nodes (views, matmul), and a norm before it one
more. This is one node. Each group of 256 threads copies its input row into group-shared memory
(normalising it when NG > 0 — every group redoes the few-KB norm rather than launching another op),
then each warp computes RB / 8 output rows with lanes striding the row (coalesced 32-element
segments, UNROLL loads in flight per lane) and a warp sum.

Shapes: x (M, IN) (any leading shape flattening to M rows), W (OUT, IN), nw (IN,) or any array when
NG = 0, bias (OUT,) or any array when HAS_BIAS is false, eps (1,) float32 -> y (M, OUT) in x.dtype
(the caller gives the output shape). IN is a template constant (the shared row).
"""
from __future__ import annotations

import math

import mlx.core as mx

from alloy.metal.prelude import Kernel, groups

GROUP = 256
MAX_IN = 8192  # 32 KB of group-shared floats

KERNEL = Kernel(
    name="alloy_gemv",
    inputs=("x", "W", "nw", "bias", "res", "eps"),
    outputs=("y",),
    body="""
  const int OUT = W_shape[0];
  const int m = bid_y;
  SHARED float xs[IN];
  SHARED float part[8 * (NG > 0 ? NG : 1)];
  for (int i = tid; i < IN; i += nthreads) xs[i] = static_cast<float>(x[m * IN + i]);
  if (NG > 0) {
    BARRIER();
    const int gs = IN / (NG > 0 ? NG : 1);
    for (int g = 0; g < NG; ++g) {
      float s = 0.0f;
      for (int i = tid; i < gs; i += nthreads) s += xs[g * gs + i] * xs[g * gs + i];
      s = warp_sum(s);
      if (lane == 0) part[g * 8 + warp] = s;
    }
    BARRIER();
    for (int i = tid; i < IN; i += nthreads) {
      const int g = i / gs;
      float s = 0.0f;
      for (int w = 0; w < 8; ++w) s += part[g * 8 + w];
      const float r = frsqrt(s / static_cast<float>(gs) + static_cast<float>(eps[0]));
      xs[i] = static_cast<float>(static_cast<T>(xs[i] * r * static_cast<float>(nw[i])));
    }
  }
  BARRIER();
  for (int r = 0; r < RB / 8; ++r) {
    const int o = bid_x * RB + warp * (RB / 8) + r;
    if (o < OUT) {
      const int base = o * IN;
      float acc = 0.0f;
      for (int i0 = lane; i0 < IN; i0 += 32 * UNROLL) {
        float a[UNROLL];
        for (int u = 0; u < UNROLL; ++u) a[u] = i0 + 32 * u < IN ? static_cast<float>(W[base + i0 + 32 * u]) : 0.0f;
        for (int u = 0; u < UNROLL; ++u) acc += i0 + 32 * u < IN ? a[u] * xs[i0 + 32 * u] : 0.0f;
      }
      acc = warp_sum(acc);
      if (HAS_BIAS) acc += static_cast<float>(bias[o]);
      if (HAS_RES) acc += static_cast<float>(res[m * OUT + o]);
      if (lane == 0) y[m * OUT + o] = static_cast<T>(acc);
    }
  }
""",
)


UNROLL = 16  # loads in flight per lane


def gemv(x, W, bias=None, norm_weight=None, norm_groups=0, eps=1e-6, out_shape=None, residual=None):
    """y = xn @ W^T (+ bias) (+ residual), xn = x or its grouped RMSNorm (norm_groups >= 1) times
    norm_weight. x (..., IN) with few rows; W (OUT, IN); residual: M x OUT values (any shape);
    returns out_shape (default (..., OUT)) in x.dtype."""
    IN = x.shape[-1]
    OUT = W.shape[0]
    M = math.prod(x.shape[:-1])
    RB = 16 if groups(OUT, 16) >= 264 else 8  # rows per group: enough groups to fill the GPU
    (y,) = KERNEL(
        [x, W, W if norm_weight is None else norm_weight, W if bias is None else bias,
         W if residual is None else residual, mx.array([eps], dtype=mx.float32)],
        template=[("T", x.dtype), ("IN", IN), ("NG", int(norm_groups)), ("RB", RB), ("UNROLL", UNROLL),
                  ("HAS_BIAS", bias is not None), ("HAS_RES", residual is not None)],
        grid=(groups(OUT, RB), M, 1),
        threadgroup=GROUP,
        output_shapes=[out_shape or (*x.shape[:-1], OUT)],
        output_dtypes=[x.dtype],
    )
    return y


def applies(x, W) -> bool:
    """Static facts for the decode gemv: few rows, a float weight matrix with IN within the shared row."""
    return (x.ndim >= 1 and math.prod(x.shape[:-1]) <= 8 and W.ndim == 2 and W.shape[1] == x.shape[-1]
            and x.shape[-1] <= MAX_IN and W.dtype in (mx.float32, mx.float16, mx.bfloat16)
            and x.dtype == W.dtype)

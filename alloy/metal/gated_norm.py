"""Gated RMSNorm (Mamba-2's and Gated DeltaNet's output norm), forward and gradient, one warp per row.

    gate first (NBG false):  h = x * silu(z);  y = h * rstd_g(h) * w
    gate after (NBG true):   h = x;            y = h * rstd_g(h) * w * silu(z)
    rstd_g(h) = 1 / sqrt(mean over the row's group g of h^2 + eps)       (groups of G along the row)

Rows are the flattened leading axes, D the last; lane l of a warp owns columns l, l + 32, ...
(coalesced across lanes), so D and G are multiples of 32. Statistics and arithmetic in float32, as
`alloy.ops.norm.gated_rms_norm_ref`.

`FWD` writes y. `BWD` recomputes h and the group statistics and writes dx, dz and, per warp, its
rows' share of dw (float32, summed by MLX afterwards):

    u = w dy (gate first) or w dy silu(z) (gate after);  c_g = rstd_g^3 mean_g(h u)
    dh = rstd_g u - c_g h;   gate first: dx = dh silu(z), dz = dh x silu'(z)
                             gate after: dx = dh,        dz = dy w h rstd_g silu'(z)
    dw = sum over rows of dy h rstd_g (times silu(z) when the gate is after)
"""
from __future__ import annotations

import mlx.core as mx

from alloy.metal.prelude import Kernel, groups

NWP = 8  # warps (rows) per group
RPW = 8  # rows per warp in the gradient kernel (its dw share covers these rows)

_COMMON = """
  constexpr int J = D / 32;                  // columns per lane
  constexpr int NGP = D / G;                  // groups per row
  constexpr int JG = G / 32;                 // a lane's columns per group
  const float ep = eps[0];
"""

FWD = Kernel(
    name="alloy_gated_rms_norm",
    inputs=("x", "z", "w", "eps"),
    outputs=("y",),
    body=_COMMON + """
  const int R = x_shape[0];
  const int row = static_cast<int>(bid_x * NWP + warp);
  if (row < R) {
    const int base = row * D + static_cast<int>(lane);
    float ss[NGP];
    for (int g = 0; g < NGP; ++g) ss[g] = 0.0f;
    for (int j = 0; j < J; ++j) {
      const float xv = static_cast<float>(x[base + 32 * j]);
      const float h = NBG ? xv : xv * fsilu(static_cast<float>(z[base + 32 * j]));
      ss[j / JG] += h * h;
    }
    for (int g = 0; g < NGP; ++g) ss[g] = frsqrt(warp_sum(ss[g]) / static_cast<float>(G) + ep);
    for (int j = 0; j < J; ++j) {
      const float xv = static_cast<float>(x[base + 32 * j]);
      const float s = fsilu(static_cast<float>(z[base + 32 * j]));
      const float wv = static_cast<float>(w[static_cast<int>(lane) + 32 * j]);
      y[base + 32 * j] = static_cast<T>(NBG ? xv * ss[j / JG] * wv * s : xv * s * ss[j / JG] * wv);
    }
  }
""",
)

BWD = Kernel(
    name="alloy_gated_rms_norm_bwd",
    inputs=("x", "z", "w", "eps", "dy"),
    outputs=("dx", "dz", "dwp"),
    body=_COMMON + """
  const int R = x_shape[0];
  const int wid = static_cast<int>(bid_x * NWP + warp);   // this warp's rows: wid * RPW ...
  float wv[J];
  float dw[J];
#pragma unroll
  for (int j = 0; j < J; ++j) {
    wv[j] = static_cast<float>(w[static_cast<int>(lane) + 32 * j]);
    dw[j] = 0.0f;
  }
  for (int q = 0; q < RPW; ++q) {
    const int row = wid * RPW + q;
    if (row >= R) break;
    const int base = row * D + static_cast<int>(lane);
    float ss[NGP];
    float hu[NGP];
    for (int g = 0; g < NGP; ++g) {
      ss[g] = 0.0f;
      hu[g] = 0.0f;
    }
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const float xv = static_cast<float>(x[base + 32 * j]);
      const float s = fsilu(static_cast<float>(z[base + 32 * j]));
      const float h = NBG ? xv : xv * s;
      const float u = wv[j] * static_cast<float>(dy[base + 32 * j]) * (NBG ? s : 1.0f);
      ss[j / JG] += h * h;
      hu[j / JG] += h * u;
    }
    for (int g = 0; g < NGP; ++g) {
      const float r = frsqrt(warp_sum(ss[g]) / static_cast<float>(G) + ep);
      ss[g] = r;
      hu[g] = r * r * r * warp_sum(hu[g]) / static_cast<float>(G);
    }
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const float xv = static_cast<float>(x[base + 32 * j]);
      const float zv = static_cast<float>(z[base + 32 * j]);
      const float dyv = static_cast<float>(dy[base + 32 * j]);
      const float sg = 1.0f / (1.0f + fexp(-zv));
      const float s = zv * sg;
      const float ds = sg * (1.0f + zv * (1.0f - sg));
      const float r = ss[j / JG];
      const float h = NBG ? xv : xv * s;
      const float u = wv[j] * dyv * (NBG ? s : 1.0f);
      const float dh = r * u - hu[j / JG] * h;
      dx[base + 32 * j] = static_cast<T>(NBG ? dh : dh * s);
      dz[base + 32 * j] = static_cast<T>(NBG ? dyv * wv[j] * h * r * ds : dh * xv * ds);
      dw[j] += dyv * h * r * (NBG ? s : 1.0f);
    }
  }
#pragma unroll
  for (int j = 0; j < J; ++j) dwp[wid * D + static_cast<int>(lane) + 32 * j] = dw[j];
""",
)


def applies(x, z, weight, group_size) -> bool:
    """Static facts under which the kernels run: a gate, a weight, D and G multiples of 32."""
    D = x.shape[-1]
    G = D if group_size is None else group_size
    return (z is not None and weight is not None and z.dtype == x.dtype and z.shape == x.shape
            and D % 32 == 0 and G % 32 == 0 and D % G == 0)


def _template(x, D, G, nbg):
    return [("T", x.dtype), ("D", D), ("G", G), ("NBG", bool(nbg)), ("NWP", NWP), ("RPW", RPW)]


def gated_rms_norm(x, z, weight, eps: float, group_size, norm_before_gate: bool):
    """FWD launch: y in x.dtype, the shape of x."""
    D = x.shape[-1]
    G = D if group_size is None else group_size
    x2, z2 = x.reshape(-1, D), z.reshape(-1, D)
    R = x2.shape[0]
    y = FWD([x2, z2, weight, mx.array([eps], mx.float32)], template=_template(x, D, G, norm_before_gate),
            grid=(groups(R, NWP), 1, 1), threadgroup=32 * NWP, output_shapes=[(R, D)],
            output_dtypes=[x.dtype])[0]
    return y.reshape(x.shape)


def gated_rms_norm_vjp(x, z, weight, eps: float, group_size, norm_before_gate: bool, dy):
    """BWD launch: (dx, dz, dweight) in the argument dtypes."""
    D = x.shape[-1]
    G = D if group_size is None else group_size
    x2, z2 = x.reshape(-1, D), z.reshape(-1, D)
    R = x2.shape[0]
    nw = groups(R, RPW)
    dx, dz, dwp = BWD([x2, z2, weight, mx.array([eps], mx.float32), dy.astype(x.dtype).reshape(-1, D)],
                      template=_template(x, D, G, norm_before_gate), grid=(groups(nw, NWP), 1, 1),
                      threadgroup=32 * NWP, output_shapes=[(R, D), (R, D), (groups(nw, NWP) * NWP, D)],
                      output_dtypes=[x.dtype, z.dtype, mx.float32])
    return dx.reshape(x.shape), dz.reshape(z.shape), dwp.sum(axis=0).astype(weight.dtype)

"""Mamba-1 mixer (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces").

    [x, z] = in_proj(u)                               each d_inner
    x = silu(causal_conv1d(x))
    [dt_r, B, C] = x_proj(x);  dt = softplus(dt_proj(dt_r))      dt_rank, d_state, d_state
    A = -exp(A_log)                                   (d_inner, d_state)
    h_t = exp(dt_t A) h_{t-1} + (dt_t x_t) B_t ;  y_t = h_t C_t + D x_t      (ops.selective_scan)
    out = out_proj(y * silu(z))

Parameters follow the Hugging Face ``MambaMixer`` names. State: conv (B, d_conv-1, d_inner) and
ssm (B, d_inner, d_state) float32. An optional state entry ``valid`` (B,) int32 marks the first
valid[b] tokens of this call as real: padded tokens get dt = 0 (the SSM state passes through) and
the conv tail is taken at each row's true end.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from alloy.layers.common import conv_tail, dense, live_mask
from alloy.layers.registry import LayerSettings, register_mixer
from alloy.ops.conv import causal_conv1d
from alloy.ops.norm import rms_norm
from alloy.ops.selective_scan import selective_scan
from alloy.params import init as I


@dataclass(frozen=True)
class Mamba1Settings(LayerSettings):
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 0  # 0: ceil(d_model / 16), the paper's default
    chunk_size: int = 64
    conv_bias: bool = True
    bias: bool = False
    dt_min: float = 1e-3
    dt_max: float = 0.1
    # Jamba: RMSNorm (with weights dt_layernorm / b_layernorm / c_layernorm) on dt, B and C
    dt_bc_norm: bool = False
    dt_bc_norm_eps: float = 1e-6
    dt_bc_norm_weight: bool = True  # False: weightless RMSNorms (Falcon-Mamba)
    # Zamba: channels split into n_heads independent Mamba heads, each with its own x_proj / dt_proj
    # (x_proj (H, rank+2N, d_inner/H), dt_proj (H, d_inner/H, rank)) and its own B, C
    n_heads: int = 1

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def rank(self) -> int:
        return self.dt_rank or math.ceil(self.d_model / 16)

    def validate(self):
        for f in ("d_state", "d_conv", "expand", "chunk_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{f} must be a positive int, got {v!r}")
        if not isinstance(self.n_heads, int) or self.n_heads < 1 or self.d_inner % self.n_heads:
            raise ValueError(f"n_heads must be a positive int dividing d_inner {self.d_inner}, got {self.n_heads!r}")
        if self.n_heads > 1 and self.dt_bc_norm:
            raise ValueError("dt_bc_norm is not supported with n_heads > 1")
        if not isinstance(self.dt_rank, int) or self.dt_rank < 0:
            raise ValueError(f"dt_rank must be a non-negative int (0 = auto), got {self.dt_rank!r}")


def init(key, cfg: Mamba1Settings) -> dict:
    k = I.split(key, 6)
    r, n = cfg.rank, cfg.d_state
    dt_std = r ** -0.5
    return {
        "in_proj": I.linear(k[0], cfg.d_model, 2 * cfg.d_inner, bias=cfg.bias),
        "conv1d": I.conv1d(k[1], cfg.d_inner, cfg.d_conv, bias=cfg.conv_bias),
        "x_proj": (I.linear(k[2], cfg.d_inner, r + 2 * n) if cfg.n_heads == 1 else
                   {"weight": I.normal(k[2], (cfg.n_heads, r + 2 * n, cfg.d_inner // cfg.n_heads))}),
        "dt_proj": {"weight": I.uniform(k[3], (cfg.d_inner, r) if cfg.n_heads == 1 else
                                        (cfg.n_heads, cfg.d_inner // cfg.n_heads, r), -dt_std, dt_std),
                    "bias": I.dt_bias(k[4], cfg.d_inner, cfg.dt_min, cfg.dt_max)},
        "A_log": mx.log(mx.broadcast_to(mx.arange(1, n + 1, dtype=mx.float32), (cfg.d_inner, n))),
        "D": mx.ones((cfg.d_inner,)),
        "out_proj": I.linear(k[5], cfg.d_inner, cfg.d_model, bias=cfg.bias),
        **({"dt_layernorm": {"weight": mx.ones((r,))}, "b_layernorm": {"weight": mx.ones((n,))},
            "c_layernorm": {"weight": mx.ones((n,))}} if cfg.dt_bc_norm and cfg.dt_bc_norm_weight else {}),
    }


def init_state(cfg: Mamba1Settings, batch: int, max_len: int, dtype=mx.float32) -> dict:
    return {
        "conv": mx.zeros((batch, cfg.d_conv - 1, cfg.d_inner), dtype=dtype),
        "ssm": mx.zeros((batch, cfg.d_inner, cfg.d_state), dtype=mx.float32),
    }


@register_mixer("mamba1", settings=Mamba1Settings, init=init, init_state=init_state, state="ssm",
                mask="none")
def apply(params, x, state, cfg: Mamba1Settings):
    xz = dense(params["in_proj"], x)
    xs, z = mx.split(xz, 2, axis=-1)
    valid = None if state is None else state.get("valid")
    xs_in = xs
    xs, conv_state = causal_conv1d(xs, params["conv1d"]["weight"], params["conv1d"].get("bias"),
                                   None if state is None else state["conv"], activation="silu")
    if cfg.n_heads > 1:
        return _apply_heads(params, xs, z, xs_in, conv_state, state, valid, cfg)
    dt_r, Bm, Cm = mx.split(dense(params["x_proj"], xs), [cfg.rank, cfg.rank + cfg.d_state], axis=-1)
    if cfg.dt_bc_norm:
        eps = cfg.dt_bc_norm_eps
        w = (lambda n: params[n]["weight"]) if cfg.dt_bc_norm_weight else (lambda n: None)
        dt_r = rms_norm(dt_r, w("dt_layernorm"), eps)
        Bm = rms_norm(Bm, w("b_layernorm"), eps)
        Cm = rms_norm(Cm, w("c_layernorm"), eps)
    dt = nn.softplus(dense(params["dt_proj"], dt_r).astype(mx.float32))
    if valid is not None:
        dt = mx.where(live_mask(valid, x.shape[1])[..., None], dt, 0.0)
        conv_state = conv_tail(state["conv"], xs_in, valid)
    A = -mx.exp(params["A_log"].astype(mx.float32))
    y, ssm_state = selective_scan(xs, dt, A, Bm, Cm, params["D"], z,
                                  None if state is None else state["ssm"], chunk_size=cfg.chunk_size)
    return _finish(params, y, conv_state, ssm_state, state)


def _finish(params, y, conv_state, ssm_state, state):
    out = dense(params["out_proj"], y)
    if state is None:
        return out, None
    return out, {"conv": conv_state.astype(state["conv"].dtype), "ssm": ssm_state}


def _apply_heads(params, xs, z, xs_in, conv_state, state, valid, cfg: Mamba1Settings):
    """Independent Mamba heads over channel blocks (Zamba): per-head x_proj / dt_proj / B / C.
    A Python loop over the (few) heads, each a full selective scan."""
    B_, T, _ = xs.shape
    H, dh = cfg.n_heads, cfg.d_inner // cfg.n_heads
    xh = xs.reshape(B_, T, H, dh)
    dbl = mx.einsum("bthd,hkd->bthk", xh, params["x_proj"]["weight"])
    dt_r, Bm, Cm = mx.split(dbl, [cfg.rank, cfg.rank + cfg.d_state], axis=-1)
    dt = mx.einsum("bthr,hdr->bthd", dt_r, params["dt_proj"]["weight"]).reshape(B_, T, cfg.d_inner)
    dt = nn.softplus((dt + params["dt_proj"]["bias"]).astype(mx.float32))
    if valid is not None:
        dt = mx.where(live_mask(valid, T)[..., None], dt, 0.0)
        conv_state = conv_tail(state["conv"], xs_in, valid)
    A = -mx.exp(params["A_log"].astype(mx.float32))
    ys, states = [], []
    for h in range(H):
        c = slice(h * dh, (h + 1) * dh)
        y, st = selective_scan(xs[..., c], dt[..., c], A[c], Bm[:, :, h], Cm[:, :, h], params["D"][c], z[..., c],
                               None if state is None else state["ssm"][:, c], chunk_size=cfg.chunk_size)
        ys.append(y)
        states.append(st)
    return _finish(params, mx.concatenate(ys, axis=-1), conv_state, mx.concatenate(states, axis=1), state)

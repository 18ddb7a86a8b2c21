"""Kimi Delta Attention (Kimi-Linear, Moonshot 2025): the gated delta rule with one decay per key
channel instead of per head.

    q, k, v = silu(causal_conv1d([q_proj(x), k_proj(x), v_proj(x)]))     H heads of head_dim each
    g = -exp(A_log_h) * softplus(f_b(f_a(x)) + dt_bias)                 (B, T, H, head_dim): per channel
    beta = sigmoid(b_proj(x))
    o = gated_delta(q, k, v, g, beta)                                    (L2-normed q, k; q * K^-1/2)
    out = o_proj(rms_norm(o) * w * sigmoid(g_b(g_a(x))))                 (per head)

Parameters follow the Hugging Face ``KimiLinearDeltaAttention`` names (the forget gate's f_a_proj,
f_b_proj, dt_bias and A_log under ``forget_gate``). State: conv (B, K-1, 3*H*hd), ssm (B, H, hd, hd).
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from alloy.layers.common import conv_tail, dense, live_mask
from alloy.layers.registry import LayerSettings, register_mixer
from alloy.ops.conv import causal_conv1d
from alloy.ops.gated_delta import gated_delta
from alloy.ops.norm import rms_norm
from alloy.params import init as I


@dataclass(frozen=True)
class KDASettings(LayerSettings):
    n_heads: int = 8
    head_dim: int = 64
    d_conv: int = 4
    chunk_size: int = 16  # per-channel decays build a (C, C, head_dim) tensor per chunk: keep C small
    norm_eps: float = 1e-5

    @property
    def qkv_dim(self) -> int:
        return self.n_heads * self.head_dim

    def validate(self):
        for f in ("n_heads", "head_dim", "d_conv", "chunk_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{f} must be a positive int, got {v!r}")


def init(key, cfg: KDASettings) -> dict:
    k = I.split(key, 12)
    D, Q, hd, H = cfg.d_model, cfg.qkv_dim, cfg.head_dim, cfg.n_heads
    return {
        "q_proj": I.linear(k[0], D, Q), "k_proj": I.linear(k[1], D, Q), "v_proj": I.linear(k[2], D, Q),
        "conv1d": I.conv1d(k[3], 3 * Q, cfg.d_conv, bias=False),
        "forget_gate": {"f_a_proj": I.linear(k[4], D, hd), "f_b_proj": I.linear(k[5], hd, Q),
                        "dt_bias": I.dt_bias(k[6], Q), "A_log": mx.log(I.uniform(k[7], (H,), 1.0, 16.0))},
        "b_proj": I.linear(k[8], D, H),
        "g_a_proj": I.linear(k[9], D, hd), "g_b_proj": I.linear(k[10], hd, Q),
        "o_norm": {"weight": mx.ones((hd,))},
        "o_proj": I.linear(k[11], Q, D),
    }


def init_state(cfg: KDASettings, batch: int, max_len: int, dtype=mx.float32) -> dict:
    return {"conv": mx.zeros((batch, cfg.d_conv - 1, 3 * cfg.qkv_dim), dtype=dtype),
            "ssm": mx.zeros((batch, cfg.n_heads, cfg.head_dim, cfg.head_dim), dtype=mx.float32)}


@register_mixer("kda", settings=KDASettings, init=init, init_state=init_state, state="ssm", mask="none")
def apply(params, x, state, cfg: KDASettings):
    B, T, _ = x.shape
    H, hd, Q = cfg.n_heads, cfg.head_dim, cfg.qkv_dim
    qkv_in = mx.concatenate([dense(params[n], x) for n in ("q_proj", "k_proj", "v_proj")], axis=-1)
    qkv, conv_state = causal_conv1d(qkv_in, params["conv1d"]["weight"], params["conv1d"].get("bias"),
                                    None if state is None else state["conv"], activation="silu")
    q, k, v = (a.reshape(B, T, H, hd) for a in mx.split(qkv, 3, axis=-1))
    fg = params["forget_gate"]
    gate_in = dense(fg["f_b_proj"], dense(fg["f_a_proj"], x)).astype(mx.float32) + fg["dt_bias"].astype(mx.float32)
    g = -mx.exp(fg["A_log"].astype(mx.float32))[:, None] * nn.softplus(gate_in).reshape(B, T, H, hd)
    beta = mx.sigmoid(dense(params["b_proj"], x).astype(mx.float32))
    valid = None if state is None else state.get("valid")
    if valid is not None:  # padded tokens: no decay, no write
        live = live_mask(valid, T)
        g, beta = mx.where(live[..., None, None], g, 0.0), mx.where(live[..., None], beta, 0.0)
        conv_state = conv_tail(state["conv"], qkv_in, valid)
    o, ssm = gated_delta(q, k, v, g, beta, None if state is None else state["ssm"], chunk_size=cfg.chunk_size)
    gate = dense(params["g_b_proj"], dense(params["g_a_proj"], x)).reshape(B, T, H, hd)
    o = rms_norm(o.astype(mx.float32), params["o_norm"]["weight"].astype(mx.float32), cfg.norm_eps)
    o = (o * mx.sigmoid(gate.astype(mx.float32))).astype(x.dtype)
    out = dense(params["o_proj"], o.reshape(B, T, Q))
    if state is None:
        return out, None
    return out, {"conv": conv_state.astype(state["conv"].dtype), "ssm": ssm}

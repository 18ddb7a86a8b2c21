"""Gated DeltaNet mixer (Yang et al. 2024; the linear-attention layer of Qwen3-Next / Qwen3.5).

    qkv = silu(causal_conv1d(in_proj_qkv(x)))          q, k: Hk heads of K; v: H heads of V
    z = in_proj_z(x);  beta = sigmoid(in_proj_b(x));  g = -exp(A_log) * softplus(in_proj_a(x) + dt_bias)
    o = gated_delta(q, k, v, g, beta)                  (ops.gated_delta: L2-normed q, k; q * K^-1/2)
    out = out_proj(rms_norm(o) * w * silu(z))          (per value head, norm before gate)

Parameters follow the Hugging Face Qwen3.5 names (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a,
conv1d, dt_bias, A_log, norm, out_proj). State: conv (B, d_conv-1, 2*Hk*K + H*V) and
ssm (B, H, K, V) float32. An optional state entry ``valid`` (B,) int32 marks the first valid[b]
tokens of this call as real: padded tokens get g = 0 and beta = 0 (no decay, no write) and the
conv tail is taken at each row's true end.
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from alloy.layers.common import conv_tail, dense, live_mask
from alloy.layers.registry import LayerSettings, register_mixer
from alloy.ops.conv import causal_conv1d
from alloy.ops.gated_delta import gated_delta
from alloy.ops.norm import gated_rms_norm
from alloy.params import init as I


@dataclass(frozen=True)
class GatedDeltaNetSettings(LayerSettings):
    n_k_heads: int = 4
    n_v_heads: int = 8
    head_k_dim: int = 64
    head_v_dim: int = 64
    d_conv: int = 4
    chunk_size: int = 64
    norm_eps: float = 1e-6
    conv_bias: bool = False

    @property
    def key_dim(self) -> int:
        return self.n_k_heads * self.head_k_dim

    @property
    def value_dim(self) -> int:
        return self.n_v_heads * self.head_v_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim

    def validate(self):
        for f in ("n_k_heads", "n_v_heads", "head_k_dim", "head_v_dim", "d_conv", "chunk_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{f} must be a positive int, got {v!r}")
        if self.n_v_heads % self.n_k_heads:
            raise ValueError(f"n_k_heads {self.n_k_heads} must divide n_v_heads {self.n_v_heads}")


def init(key, cfg: GatedDeltaNetSettings) -> dict:
    k = I.split(key, 8)
    H = cfg.n_v_heads
    return {
        "in_proj_qkv": I.linear(k[0], cfg.d_model, cfg.conv_dim),
        "in_proj_z": I.linear(k[1], cfg.d_model, cfg.value_dim),
        "in_proj_b": I.linear(k[2], cfg.d_model, H),
        "in_proj_a": I.linear(k[3], cfg.d_model, H),
        "conv1d": I.conv1d(k[4], cfg.conv_dim, cfg.d_conv, bias=cfg.conv_bias),
        "dt_bias": I.dt_bias(k[5], H),
        "A_log": mx.log(I.uniform(k[6], (H,), 1.0, 16.0)),
        "norm": {"weight": mx.ones((cfg.head_v_dim,))},
        "out_proj": I.linear(k[7], cfg.value_dim, cfg.d_model),
    }


def init_state(cfg: GatedDeltaNetSettings, batch: int, max_len: int, dtype=mx.float32) -> dict:
    return {"conv": mx.zeros((batch, cfg.d_conv - 1, cfg.conv_dim), dtype=dtype),
            "ssm": mx.zeros((batch, cfg.n_v_heads, cfg.head_k_dim, cfg.head_v_dim), dtype=mx.float32)}


@register_mixer("gated_deltanet", settings=GatedDeltaNetSettings, init=init, init_state=init_state,
                state="ssm", mask="none")
def apply(params, x, state, cfg: GatedDeltaNetSettings):
    B, T, _ = x.shape
    valid = None if state is None else state.get("valid")  # (B,) real tokens per row (right padding)
    qkv_in = dense(params["in_proj_qkv"], x)
    qkv, conv_state = causal_conv1d(qkv_in, params["conv1d"]["weight"],
                                    params["conv1d"].get("bias"), None if state is None else state["conv"],
                                    activation="silu")
    q, k, v = mx.split(qkv, [cfg.key_dim, 2 * cfg.key_dim], axis=-1)
    q = q.reshape(B, T, cfg.n_k_heads, cfg.head_k_dim)
    k = k.reshape(B, T, cfg.n_k_heads, cfg.head_k_dim)
    v = v.reshape(B, T, cfg.n_v_heads, cfg.head_v_dim)
    beta = mx.sigmoid(dense(params["in_proj_b"], x).astype(mx.float32))
    a = dense(params["in_proj_a"], x).astype(mx.float32)
    g = -mx.exp(params["A_log"].astype(mx.float32)) * nn.softplus(a + params["dt_bias"].astype(mx.float32))
    valid = None if state is None else state.get("valid")
    if valid is not None:
        live = live_mask(valid, T)[..., None]
        g, beta = mx.where(live, g, 0.0), mx.where(live, beta, 0.0)
        conv_state = conv_tail(state["conv"], qkv_in, valid)
    if valid is not None:  # padded tokens: no decay (g = 0), no write (beta = 0), conv tail at the end
        live = live_mask(valid, T)[..., None]
        g, beta = mx.where(live, g, 0.0), mx.where(live, beta, 0.0)
        conv_state = conv_tail(state["conv"], qkv_in, valid)
    o, ssm = gated_delta(q, k, v, g, beta, None if state is None else state["ssm"], chunk_size=cfg.chunk_size)
    z = dense(params["in_proj_z"], x).reshape(B, T, cfg.n_v_heads, cfg.head_v_dim)
    o = gated_rms_norm(o, z, params["norm"]["weight"], cfg.norm_eps, norm_before_gate=True)
    out = dense(params["out_proj"], o.reshape(B, T, cfg.value_dim))
    if state is None:
        return out, None
    return out, {"conv": conv_state.astype(state["conv"].dtype), "ssm": ssm}

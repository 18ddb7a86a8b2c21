"""Multi-head attention with RoPE: MHA / GQA / MQA, full causal or sliding window.

    q, k, v = x Wq, x Wk, x Wv                      (Hq, Hkv, Hkv heads of head_dim; Hkv | Hq)
    q, k = norm(q), norm(k)                         (optional per-head RMSNorm, Qwen3 / OLMo-2)
    q, k = rope(q, pos), rope(k, pos)               (partial rotary: first rope_dims features; or none)
    o = softmax(q k^T / sqrt(head_dim) + mask) v ;  out = o Wo        (ops.attention)

Two registered kinds share these functions: ``attention`` (causal over everything) and
``sliding_attention`` (key visible when q_pos - k_pos < window). Parameters follow the Hugging Face
Llama names (q_proj, k_proj, v_proj, o_proj, q_norm, k_norm).

State: k, v (B, Hkv, max_len, head_dim) in the activation dtype and pos (B,) int32 — the number of
tokens each row has written. New keys are written at pos .. pos+T-1 with ``put_along_axis`` so rows
may sit at different positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from alloy.layers.common import dense
from alloy.layers.registry import LayerSettings, register_mixer
from alloy.ops.attention import attention, causal_mask, visibility_mask
from alloy.ops.norm import rms_norm
from alloy.ops.rope import rope
from alloy.params import init as I


@dataclass(frozen=True)
class AttentionSettings(LayerSettings):
    n_heads: int = 8
    n_kv_heads: int = 0  # 0: same as n_heads (MHA); 1: MQA; otherwise GQA
    head_dim: int = 0  # 0: d_model // n_heads
    window: int = 0  # sliding window in tokens; 0 only for "attention", > 0 for "sliding_attention"
    rope: bool = True  # False: NoPE
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    rope_traditional: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    norm_eps: float = 1e-6

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def rope_dims(self) -> int:
        return int(self.hd * self.partial_rotary_factor) // 2 * 2

    def validate(self):
        if not isinstance(self.n_heads, int) or self.n_heads <= 0:
            raise ValueError(f"n_heads must be a positive int, got {self.n_heads!r}")
        if not isinstance(self.n_kv_heads, int) or self.n_kv_heads < 0:
            raise ValueError(f"n_kv_heads must be a non-negative int (0 = n_heads), got {self.n_kv_heads!r}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_kv_heads {self.kv_heads} must divide n_heads {self.n_heads}")
        if self.head_dim == 0 and self.d_model % self.n_heads:
            raise ValueError(f"n_heads {self.n_heads} must divide d_model {self.d_model} (or set head_dim)")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ValueError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor!r}")
        self.check_window()

    def check_window(self):
        if self.window != 0:
            raise ValueError(f"window must be 0 for attention (use kind sliding_attention), got {self.window!r}")


@dataclass(frozen=True)
class SlidingAttentionSettings(AttentionSettings):
    window: int = 4096

    def check_window(self):
        if not isinstance(self.window, int) or self.window <= 0:
            raise ValueError(f"window must be a positive int for sliding_attention, got {self.window!r}")


def init(key, cfg: AttentionSettings) -> dict:
    k = I.split(key, 4)
    hq, hk, hd = cfg.n_heads, cfg.kv_heads, cfg.hd
    p = {
        "q_proj": I.linear(k[0], cfg.d_model, hq * hd, bias=cfg.qkv_bias),
        "k_proj": I.linear(k[1], cfg.d_model, hk * hd, bias=cfg.qkv_bias),
        "v_proj": I.linear(k[2], cfg.d_model, hk * hd, bias=cfg.qkv_bias),
        "o_proj": I.linear(k[3], hq * hd, cfg.d_model, bias=cfg.o_bias),
    }
    if cfg.qk_norm:
        p["q_norm"] = {"weight": mx.ones((hd,))}
        p["k_norm"] = {"weight": mx.ones((hd,))}
    return p


def init_state(cfg: AttentionSettings, batch: int, max_len: int, dtype=mx.float32) -> dict:
    shape = (batch, cfg.kv_heads, max_len, cfg.hd)
    return {"k": mx.zeros(shape, dtype=dtype), "v": mx.zeros(shape, dtype=dtype),
            "pos": mx.zeros((batch,), dtype=mx.int32)}


def _heads(y, n, hd):
    B, T, _ = y.shape
    return y.reshape(B, T, n, hd).transpose(0, 2, 1, 3)  # (B, n, T, hd)


def apply(params, x, state, cfg: AttentionSettings):
    B, T, _ = x.shape
    hd = cfg.hd
    q = _heads(dense(params["q_proj"], x), cfg.n_heads, hd)
    k = _heads(dense(params["k_proj"], x), cfg.kv_heads, hd)
    v = _heads(dense(params["v_proj"], x), cfg.kv_heads, hd)
    if cfg.qk_norm:
        q = rms_norm(q, params["q_norm"]["weight"], cfg.norm_eps)
        k = rms_norm(k, params["k_norm"]["weight"], cfg.norm_eps)
    offset = 0 if state is None else state["pos"]
    if cfg.rope:
        q = rope(q, offset, cfg.rope_dims, cfg.rope_theta, cfg.rope_traditional)
        k = rope(k, offset, cfg.rope_dims, cfg.rope_theta, cfg.rope_traditional)
    window = cfg.window or None
    if state is None:
        mask = "causal" if window is None else causal_mask(T, window=window)
        o = attention(q, k, v, mask=mask)
        new_state = None
    else:
        pos = state["pos"]
        q_pos = pos[:, None] + mx.arange(T, dtype=mx.int32)[None]  # (B, T)
        idx = q_pos[:, None, :, None]  # (B, 1, T, 1): write slots per row
        kc = mx.put_along_axis(state["k"], idx, k.astype(state["k"].dtype), axis=2)
        vc = mx.put_along_axis(state["v"], idx, v.astype(state["v"].dtype), axis=2)
        k_pos = mx.arange(kc.shape[2], dtype=mx.int32)
        mask = visibility_mask(q_pos, k_pos, window)
        o = attention(q, kc.astype(q.dtype), vc.astype(q.dtype), mask=mask)
        new_state = {"k": kc, "v": vc, "pos": pos + T}
    o = o.transpose(0, 2, 1, 3).reshape(B, T, cfg.n_heads * hd)
    return dense(params["o_proj"], o), new_state


register_mixer("attention", settings=AttentionSettings, init=init, init_state=init_state,
               state="kv", mask="causal")(apply)
register_mixer("sliding_attention", settings=SlidingAttentionSettings, init=init,
               init_state=init_state, state="kv", mask="sliding")(apply)

"""Multi-head latent attention (DeepSeek-V2; Kimi-Linear's full-attention layers, without RoPE).

    q = q_proj(x)  or  q_b_proj(rms_norm(q_a_proj(x)))                (H heads of nope + rope dims)
    [c, k_rot] = kv_a_proj_with_mqa(x);  c = rms_norm(c)              latent (kv_lora_rank) + shared rope key
    [k_nope, v] = kv_b_proj(c)                                        per head: nope dims, v_head_dim
    k = [k_nope, k_rot]  (k_rot shared by all heads)
    out = o_proj(softmax(q k^T / sqrt(nope + rope)) v)

RoPE on the rope dims of q and k_rot is optional (``rope``; Kimi-Linear uses none). The state caches
the compressed latents — c (B, S, kv_lora_rank) and k_rot (B, S, rope dims) — not per-head keys and
values, with pos (B,) int32; new tokens are written at pos .. pos+T-1 (padded tokens land past
pos + valid, where the next call overwrites them and no real query can see them).
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from alloy.layers.common import dense
from alloy.layers.registry import LayerSettings, register_mixer
from alloy.ops.attention import attention, visibility_mask
from alloy.ops.norm import rms_norm
from alloy.ops.rope import rope
from alloy.params import init as I


@dataclass(frozen=True)
class MLASettings(LayerSettings):
    n_heads: int = 8
    q_lora_rank: int = 0  # 0: a plain q_proj
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    rope: bool = False
    rope_theta: float = 10000.0
    bias: bool = False  # q_a_proj / kv_a_proj / o_proj bias (attention_bias)
    norm_eps: float = 1e-6

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def validate(self):
        for f in ("n_heads", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{f} must be a positive int, got {v!r}")
        for f in ("q_lora_rank", "qk_rope_head_dim"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{f} must be a non-negative int, got {v!r}")
        if self.rope and self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even with rope, got {self.qk_rope_head_dim}")


def init(key, cfg: MLASettings) -> dict:
    k = I.split(key, 5)
    D, H = cfg.d_model, cfg.n_heads
    p = {}
    if cfg.q_lora_rank:
        p["q_a_proj"] = I.linear(k[0], D, cfg.q_lora_rank, bias=cfg.bias)
        p["q_a_layernorm"] = {"weight": mx.ones((cfg.q_lora_rank,))}
        p["q_b_proj"] = I.linear(k[1], cfg.q_lora_rank, H * cfg.qk_head_dim)
    else:
        p["q_proj"] = I.linear(k[0], D, H * cfg.qk_head_dim)
    p["kv_a_proj_with_mqa"] = I.linear(k[2], D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.bias)
    p["kv_a_layernorm"] = {"weight": mx.ones((cfg.kv_lora_rank,))}
    p["kv_b_proj"] = I.linear(k[3], cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim))
    p["o_proj"] = I.linear(k[4], H * cfg.v_head_dim, D, bias=cfg.bias)
    return p


def init_state(cfg: MLASettings, batch: int, max_len: int, dtype=mx.float32) -> dict:
    return {"c": mx.zeros((batch, max_len, cfg.kv_lora_rank), dtype=dtype),
            "kr": mx.zeros((batch, max_len, cfg.qk_rope_head_dim), dtype=dtype),
            "pos": mx.zeros((batch,), dtype=mx.int32)}


def _expand(params, c, kr, cfg: MLASettings):
    """Latents (B, S, r), (B, S, rope) -> keys (B, H, S, nope + rope), values (B, H, S, v)."""
    B, S, _ = c.shape
    H = cfg.n_heads
    kv = dense(params["kv_b_proj"], c).reshape(B, S, H, cfg.qk_nope_head_dim + cfg.v_head_dim)
    k_nope, v = mx.split(kv, [cfg.qk_nope_head_dim], axis=-1)
    k = mx.concatenate([k_nope, mx.broadcast_to(kr[:, :, None, :], (B, S, H, cfg.qk_rope_head_dim))], axis=-1)
    return k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


@register_mixer("mla", settings=MLASettings, init=init, init_state=init_state, state="kv", mask="causal")
def apply(params, x, state, cfg: MLASettings):
    B, T, _ = x.shape
    H = cfg.n_heads
    if cfg.q_lora_rank:
        q = dense(params["q_b_proj"], rms_norm(dense(params["q_a_proj"], x), params["q_a_layernorm"]["weight"],
                                               cfg.norm_eps))
    else:
        q = dense(params["q_proj"], x)
    q = q.reshape(B, T, H, cfg.qk_head_dim).transpose(0, 2, 1, 3)
    c, kr = mx.split(dense(params["kv_a_proj_with_mqa"], x), [cfg.kv_lora_rank], axis=-1)
    c = rms_norm(c, params["kv_a_layernorm"]["weight"], cfg.norm_eps)
    offset = 0 if state is None else state["pos"]
    if cfg.rope and cfg.qk_rope_head_dim:
        q_nope, q_rot = mx.split(q, [cfg.qk_nope_head_dim], axis=-1)
        q = mx.concatenate([q_nope, rope(q_rot, offset, cfg.qk_rope_head_dim, cfg.rope_theta)], axis=-1)
        kr = rope(kr[:, None], offset, cfg.qk_rope_head_dim, cfg.rope_theta)[:, 0]
    scale = cfg.qk_head_dim ** -0.5
    if state is None:
        k, v = _expand(params, c, kr, cfg)
        o = attention(q, k, v, scale=scale, mask="causal")
        new_state = None
    else:
        pos = state["pos"]
        q_pos = pos[:, None] + mx.arange(T, dtype=mx.int32)[None]
        idx = q_pos[..., None]  # (B, T, 1)
        cc = mx.put_along_axis(state["c"], idx, c.astype(state["c"].dtype), axis=1)
        kc = mx.put_along_axis(state["kr"], idx, kr.astype(state["kr"].dtype), axis=1)
        k, v = _expand(params, cc.astype(x.dtype), kc.astype(x.dtype), cfg)
        o = attention(q, k, v, scale=scale, mask=visibility_mask(q_pos, mx.arange(cc.shape[1], dtype=mx.int32)))
        n = T if state.get("valid") is None else state["valid"]
        new_state = {"c": cc, "kr": kc, "pos": pos + n}
    o = o.transpose(0, 2, 1, 3).reshape(B, T, H * cfg.v_head_dim)
    return dense(params["o_proj"], o), new_state

"""Lightning attention (MiniMax-01): linear attention with a fixed per-head exponential decay.

    [q, k, v] = silu(qkv_proj(x))                               per head, head_dim each
    S_t = exp(-lambda_h) S_{t-1} + k_t v_t^T ;  o_t = S_t^T q_t   (per head; lambda_h = slope_rate[h])
    out = out_proj( sigmoid(output_gate(x)) * rms_norm(o) )    (norm over all heads together)

The recurrence is the SSD recurrence with dt = 1, A = -lambda, B = k, C = q, x = v, so prefill runs
the chunked SSD op (``alloy.ops.ssd``) with one group per head. Parameters follow the Hugging Face
``MiniMaxLightningAttention`` names; ``slope_rate`` (H,) float32 holds the decays (MiniMax derives
them from the head and layer index). State: ssm (B, H, head_dim, head_dim) float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from alloy.layers.common import dense, live_mask
from alloy.layers.registry import LayerSettings, register_mixer
from alloy.ops.norm import rms_norm
from alloy.ops.ssd import ssd
from alloy.params import init as I


@dataclass(frozen=True)
class LightningSettings(LayerSettings):
    n_heads: int = 8
    head_dim: int = 0  # 0: d_model // n_heads
    chunk_size: int = 64
    norm_eps: float = 1e-6

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def validate(self):
        if not isinstance(self.n_heads, int) or self.n_heads < 1:
            raise ValueError(f"n_heads must be a positive int, got {self.n_heads!r}")
        if self.head_dim == 0 and self.d_model % self.n_heads:
            raise ValueError(f"n_heads {self.n_heads} must divide d_model {self.d_model} (or set head_dim)")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {self.chunk_size!r}")


def default_slopes(n_heads: int, layer_frac: float = 0.0) -> mx.array:
    """MiniMax's decays: (2^(-8/H))^(h+1) * (1 - layer_frac + 1e-5), layer_frac = layer / (L - 1)."""
    base = 2.0 ** (-8.0 / n_heads)
    return (base ** mx.arange(1, n_heads + 1, dtype=mx.float32)) * (1.0 - layer_frac + 1e-5)


def init(key, cfg: LightningSettings) -> dict:
    k = I.split(key, 3)
    H, hd, D = cfg.n_heads, cfg.hd, cfg.d_model
    return {"qkv_proj": I.linear(k[0], D, 3 * H * hd), "output_gate": I.linear(k[1], D, H * hd),
            "norm": {"weight": mx.ones((H * hd,))}, "out_proj": I.linear(k[2], H * hd, D),
            "slope_rate": default_slopes(H)}


def init_state(cfg: LightningSettings, batch: int, max_len: int, dtype=mx.float32) -> dict:
    return {"ssm": mx.zeros((batch, cfg.n_heads, cfg.hd, cfg.hd), dtype=mx.float32)}


@register_mixer("lightning", settings=LightningSettings, init=init, init_state=init_state, state="ssm",
                mask="none")
def apply(params, x, state, cfg: LightningSettings):
    B, T, _ = x.shape
    H, hd = cfg.n_heads, cfg.hd
    qkv = nn.silu(dense(params["qkv_proj"], x)).reshape(B, T, H, 3 * hd)
    q, k, v = mx.split(qkv, 3, axis=-1)
    dt = mx.ones((B, T, H), dtype=mx.float32)
    valid = None if state is None else state.get("valid")
    if valid is not None:  # padded tokens: no decay and no write
        dt = mx.where(live_mask(valid, T)[..., None], dt, 0.0)
    A = -params["slope_rate"].astype(mx.float32)
    o, ssm_state = ssd(v, dt, A, k, q, None, None if state is None else state["ssm"], chunk_size=cfg.chunk_size)
    o = rms_norm(o.reshape(B, T, H * hd), params["norm"]["weight"], cfg.norm_eps)
    o = mx.sigmoid(dense(params["output_gate"], x).astype(mx.float32)).astype(o.dtype) * o
    out = dense(params["out_proj"], o)
    return out, (None if state is None else {"ssm": ssm_state})

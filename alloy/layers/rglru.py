"""Griffin / RecurrentGemma recurrent block with the Real-Gated Linear Recurrent Unit
(De et al. 2024, "Griffin: Mixing Gated Linear Recurrences with Local Attention").

    y = gelu_tanh(linear_y(u));  x = conv_1d(linear_x(u))            (depthwise, with bias, no activation)
    i_t = sigmoid(x_t W_i + b_i),  r_t = sigmoid(x_t W_r + b_r)       (block-diagonal per head)
    log a_t = -c * r_t * softplus(Lambda)                              c = 8
    h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t * x_t)                    (the multiplier is 1 at position 0)
    out = linear_out(h * y)

Parameters follow the Hugging Face names (linear_x, linear_y, linear_out, conv_1d,
recurrent_param, input_gate_weight / _bias, recurrent_gate_weight / _bias). State: conv
(B, K-1, W), h (B, W) float32 and pos (B,) int32 (position 0 starts a sequence).
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from alloy.layers.common import conv_tail, dense, live_mask
from alloy.layers.registry import LayerSettings, register_mixer
from alloy.ops.conv import causal_conv1d
from alloy.ops.linear_scan import linear_scan
from alloy.params import init as I


@dataclass(frozen=True)
class RGLRUSettings(LayerSettings):
    width: int = 0  # lru_width; 0: d_model
    n_heads: int = 8  # block-diagonal gate blocks
    conv_width: int = 4
    c: float = 8.0

    @property
    def w(self) -> int:
        return self.width or self.d_model

    def validate(self):
        if not isinstance(self.width, int) or self.width < 0:
            raise ValueError(f"width must be a non-negative int (0 = d_model), got {self.width!r}")
        if not isinstance(self.n_heads, int) or self.n_heads < 1 or self.w % self.n_heads:
            raise ValueError(f"n_heads must divide width {self.w}, got {self.n_heads!r}")
        if not isinstance(self.conv_width, int) or self.conv_width < 1:
            raise ValueError(f"conv_width must be a positive int, got {self.conv_width!r}")


def init(key, cfg: RGLRUSettings) -> dict:
    k = I.split(key, 7)
    W, H = cfg.w, cfg.n_heads
    bw = W // H
    # Lambda so that a = sigmoid(Lambda)^c is in [0.9, 0.999] (the paper's init), stored as softplus^-1
    a = I.uniform(k[4], (W,), 0.9 ** 2, 0.999 ** 2)
    return {
        "linear_y": I.linear(k[0], cfg.d_model, W, bias=True),
        "linear_x": I.linear(k[1], cfg.d_model, W, bias=True),
        "linear_out": I.linear(k[2], W, cfg.d_model, bias=True),
        "conv_1d": I.conv1d(k[3], W, cfg.conv_width, bias=True),
        "recurrent_param": I.inverse_softplus(-mx.log(a) / cfg.c),
        "input_gate_weight": I.normal(k[5], (H, bw, bw), bw ** -0.5),
        "input_gate_bias": mx.zeros((H, bw)),
        "recurrent_gate_weight": I.normal(k[6], (H, bw, bw), bw ** -0.5),
        "recurrent_gate_bias": mx.zeros((H, bw)),
    }


def init_state(cfg: RGLRUSettings, batch: int, max_len: int, dtype=mx.float32) -> dict:
    return {"conv": mx.zeros((batch, cfg.conv_width - 1, cfg.w), dtype=dtype),
            "h": mx.zeros((batch, cfg.w), dtype=mx.float32), "pos": mx.zeros((batch,), dtype=mx.int32)}


def _gate(x, w, b, H):
    B, T, W = x.shape
    xh = x.reshape(B, T, H, W // H)
    return mx.sigmoid((mx.einsum("bthi,hij->bthj", xh, w) + b).reshape(B, T, W).astype(mx.float32))


@register_mixer("rglru", settings=RGLRUSettings, init=init, init_state=init_state, state="ssm", mask="none")
def apply(params, u, state, cfg: RGLRUSettings):
    B, T, _ = u.shape
    y = nn.gelu_approx(dense(params["linear_y"], u))
    x_in = dense(params["linear_x"], u)
    x, conv_state = causal_conv1d(x_in, params["conv_1d"]["weight"], params["conv_1d"]["bias"],
                                  None if state is None else state["conv"])
    i_gate = _gate(x, params["input_gate_weight"], params["input_gate_bias"], cfg.n_heads)
    r_gate = _gate(x, params["recurrent_gate_weight"], params["recurrent_gate_bias"], cfg.n_heads)
    log_a = -cfg.c * r_gate * nn.softplus(params["recurrent_param"].astype(mx.float32))
    pos0 = mx.zeros((B,), mx.int32) if state is None else state["pos"]
    positions = pos0[:, None] + mx.arange(T, dtype=mx.int32)[None]
    mult = mx.where((positions == 0)[..., None], 1.0, mx.sqrt(1.0 - mx.exp(2.0 * log_a)))
    xs = x.astype(mx.float32) * i_gate * mult
    valid = None if state is None else state.get("valid")
    if valid is not None:  # padded tokens: no decay, no input
        live = live_mask(valid, T)[..., None]
        log_a, xs = mx.where(live, log_a, 0.0), mx.where(live, xs, 0.0)
        conv_state = conv_tail(state["conv"], x_in, valid)
    h, h_last = linear_scan(log_a, xs, None if state is None else state["h"])
    out = dense(params["linear_out"], (h.astype(u.dtype) * y))
    if state is None:
        return out, None
    n = T if valid is None else valid
    return out, {"conv": conv_state.astype(state["conv"].dtype), "h": h_last, "pos": pos0 + n}

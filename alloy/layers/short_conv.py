"""Gated short convolution (the "conv" operator of LFM2, Liquid AI 2025).

    [b, c, x] = in_proj(u)                      each d_model
    y = c * causal_conv1d(b * x)                depthwise, kernel L (3 in LFM2), no activation
    out = out_proj(y)

Parameters follow the Hugging Face ``Lfm2ShortConv`` names (in_proj, conv, out_proj). State: conv
(B, L-1, d_model), the last L-1 gated inputs. An optional state entry ``valid`` (B,) int32 takes the
conv tail at each row's true end (right-padded batches).
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from alloy.layers.common import conv_tail, dense
from alloy.layers.registry import LayerSettings, register_mixer
from alloy.ops.conv import causal_conv1d
from alloy.params import init as I


@dataclass(frozen=True)
class ShortConvSettings(LayerSettings):
    kernel: int = 3
    bias: bool = False

    def validate(self):
        if not isinstance(self.kernel, int) or self.kernel < 1:
            raise ValueError(f"kernel must be a positive int, got {self.kernel!r}")


def init(key, cfg: ShortConvSettings) -> dict:
    k = I.split(key, 3)
    D = cfg.d_model
    return {"in_proj": I.linear(k[0], D, 3 * D, bias=cfg.bias),
            "conv": I.conv1d(k[1], D, cfg.kernel, bias=cfg.bias),
            "out_proj": I.linear(k[2], D, D, bias=cfg.bias)}


def init_state(cfg: ShortConvSettings, batch: int, max_len: int, dtype=mx.float32) -> dict:
    return {"conv": mx.zeros((batch, cfg.kernel - 1, cfg.d_model), dtype=dtype)}


@register_mixer("short_conv", settings=ShortConvSettings, init=init, init_state=init_state, state="ssm",
                mask="none")
def apply(params, x, state, cfg: ShortConvSettings):
    b, c, xs = mx.split(dense(params["in_proj"], x), 3, axis=-1)
    bx = b * xs
    y, conv_state = causal_conv1d(bx, params["conv"]["weight"], params["conv"].get("bias"),
                                  None if state is None else state["conv"])
    out = dense(params["out_proj"], c * y)
    if state is None:
        return out, None
    if state.get("valid") is not None:
        conv_state = conv_tail(state["conv"], bx, state["valid"])
    return out, {"conv": conv_state.astype(state["conv"].dtype)}

"""Position-wise feed-forward: gated (SwiGLU and kin) or plain.

    gated:  out = down( act(gate(x)) * up(x) )        (Shazeer 2020; Llama / Qwen / Mistral)
    plain:  out = down( act(up(x)) )                   (GPT-2 style; relu2 for Nemotron-H)

Parameters follow the Hugging Face Llama names (gate_proj, up_proj, down_proj).
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from alloy import metal
from alloy.layers.common import dense, matmul_t, plain_linear
from alloy.layers.registry import LayerSettings, register_ffn
from alloy.ops.activations import ACTIVATIONS, activation, swiglu, swiglu_packed
from alloy.params import init as I


@dataclass(frozen=True)
class MLPSettings(LayerSettings):
    d_ff: int = 0  # 0: 8/3 * d_model rounded up to a multiple of 64 (SwiGLU at ~4x-MLP FLOPs)
    activation: str = "silu"
    gated: bool = True
    bias: bool = False

    @property
    def ff(self) -> int:
        return self.d_ff or -(-8 * self.d_model // 3 // 64) * 64

    def validate(self):
        if not isinstance(self.d_ff, int) or self.d_ff < 0:
            raise ValueError(f"d_ff must be a non-negative int (0 = auto), got {self.d_ff!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")


def init(key, cfg: MLPSettings) -> dict:
    k = I.split(key, 3)
    p = {}
    if cfg.gated:
        p["gate_proj"] = I.linear(k[0], cfg.d_model, cfg.ff, bias=cfg.bias)
    p["up_proj"] = I.linear(k[1], cfg.d_model, cfg.ff, bias=cfg.bias)
    p["down_proj"] = I.linear(k[2], cfg.ff, cfg.d_model, bias=cfg.bias)
    return p


# Gated SiLU MLPs through `alloy.ops.swiglu(fused=True)` (one elementwise pass each way, float32
# inside). The toy train step's profile on an H100 shows autodiff's chain as ~5 launches per MLP over
# (tokens, d_ff) bf16 arrays (a Sigmoid, three Multiplies, one fused kernel; docs/benchmarks.md,
# session 6). Session 7, H100: the MLX-ops form of the fused gate (a custom VJP over float32 ops) made
# the toy step slower (162.7 vs ~147 ms, peak memory 30.2 vs 24.9 GB); on a GPU it is now the
# `alloy.metal.swiglu` kernels: with them the toy step took 110.9 / 111.3 ms vs 112.8 / 115.6 without
# (same job), peak memory 27.9 vs 29.4 GB. Taken on a GPU only (`_fused_gate`): elsewhere the MLX
# ops are what was measured, and the CPU path stays as it was.
FUSED_GATE = True


def _fused_gate() -> bool:
    return FUSED_GATE and metal.backend() is not None


# With the fused gate and at least PACKED_MIN_ROWS tokens, gate_proj and up_proj run as one matmul
# against their weights stacked (a (2F, D) copy per call, ~6 MB bf16 for the toy MLP) and the packed
# SwiGLU kernels read its (rows, 2F) output: in the backward dx is one matmul instead of two and a
# sum, and the two weight gradients one. Decode-sized calls keep the two matmuls (the copy of the
# weights would cost more than it saves).
PACKED_GATE_UP = True
PACKED_MIN_ROWS = 1024


def _gate_up_packed(params, x):
    """x @ [W_gate; W_up]^T (+ [b_gate; b_up]): (..., 2F), gate then up."""
    g, u = params["gate_proj"], params["up_proj"]
    y = matmul_t(x, mx.concatenate([g["weight"], u["weight"]], axis=0))
    if "bias" in g:
        y = y + mx.concatenate([g["bias"], u["bias"]])
    return y


@register_ffn("mlp", settings=MLPSettings, init=init)
def apply(params, x, state, cfg: MLPSettings):
    if cfg.gated and cfg.activation == "silu" and _fused_gate():
        g, u = params["gate_proj"], params["up_proj"]
        if (PACKED_GATE_UP and x.size // x.shape[-1] >= PACKED_MIN_ROWS and plain_linear(g) and plain_linear(u)
                and ("bias" in g) == ("bias" in u)):
            return dense(params["down_proj"], swiglu_packed(_gate_up_packed(params, x))), state
        h = swiglu(dense(g, x), dense(u, x), fused=True)
    else:
        h = dense(params["up_proj"], x)
        act = activation(cfg.activation)
        h = act(dense(params["gate_proj"], x)) * h if cfg.gated else act(h)
    return dense(params["down_proj"], h), state

"""Position-wise feed-forward: gated (SwiGLU and kin) or plain.

    gated:  out = down( act(gate(x)) * up(x) )        (Shazeer 2020; Llama / Qwen / Mistral)
    plain:  out = down( act(up(x)) )                   (GPT-2 style; relu2 for Nemotron-H)

Parameters follow the Hugging Face Llama names (gate_proj, up_proj, down_proj).
"""
from __future__ import annotations

from dataclasses import dataclass

from alloy import metal
from alloy.layers.common import dense
from alloy.layers.registry import LayerSettings, register_ffn
from alloy.ops.activations import ACTIVATIONS, activation, swiglu
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


@register_ffn("mlp", settings=MLPSettings, init=init)
def apply(params, x, state, cfg: MLPSettings):
    h = dense(params["up_proj"], x)
    if cfg.gated and cfg.activation == "silu" and _fused_gate():
        h = swiglu(dense(params["gate_proj"], x), h, fused=True)
    else:
        act = activation(cfg.activation)
        h = act(dense(params["gate_proj"], x)) * h if cfg.gated else act(h)
    return dense(params["down_proj"], h), state

"""Mamba-2 mixer (Dao & Gu 2024, "Transformers are SSMs", the SSD layer).

    [z, xBC, dt] = in_proj(u)                         z, x: d_inner; B, C: groups*d_state; dt: heads
    xBC = silu(causal_conv1d(xBC))                    carried conv tail of d_conv-1 inputs
    dt  = softplus(dt + dt_bias);  A = -exp(A_log)
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T ;  y_t = C_t h_t + D x_t      (per head, ops.ssd)
    out = out_proj(rms_norm(y * silu(z)))            (grouped, gate before norm)

Parameters follow the Hugging Face ``Mamba2Mixer`` names. State: conv (B, d_conv-1, conv_dim) and
ssm (B, heads, head_dim, d_state) float32. An optional state entry ``valid`` (B,) int32 marks the
first valid[b] tokens of this call as real: padded tokens get dt = 0 (decay 1, no input, the SSM
state passes through) and the conv tail is taken at each row's true end.
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from alloy.layers.common import conv_tail, decode_linear, dense, dense_split, live_mask
from alloy.layers.registry import LayerSettings, register_mixer
from alloy.ops.conv import causal_conv1d, causal_conv1d_split
from alloy.ops.conv import kernel_applies as conv_kernel_applies
from alloy.ops.norm import gated_rms_norm
from alloy.ops.ssd import mamba2_step, mamba2_step_kernel_applies, ssd
from alloy.params import init as I
from alloy.params.tree import unstack


@dataclass(frozen=True)
class Mamba2Settings(LayerSettings):
    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    head_dim: int = 64
    n_groups: int = 1
    chunk_size: int = 256
    conv_bias: bool = True
    bias: bool = False  # in_proj / out_proj bias
    norm_eps: float = 1e-5
    norm_before_gate: bool = False
    rms_norm: bool = True  # False: out_proj(y * silu(z)) with no norm (Falcon-H1's mamba_rms_norm=false)
    dt_clamp_min: float = 0.0  # dt = clip(softplus(.), min, max): HF's time_step_limit (Zamba2: (1e-3, inf))
    dt_clamp_max: float = 0.0  # 0: no upper clamp
    A_init_range: tuple = (1.0, 16.0)
    dt_min: float = 1e-3
    dt_max: float = 0.1

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def n_heads(self) -> int:
        return self.d_inner // self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_groups * self.d_state

    def validate(self):
        for f in ("d_state", "d_conv", "expand", "head_dim", "n_groups", "chunk_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{f} must be a positive int, got {v!r}")
        if self.d_inner % self.head_dim:
            raise ValueError(f"head_dim {self.head_dim} must divide d_inner = expand*d_model = {self.d_inner}")
        if self.n_heads % self.n_groups:
            raise ValueError(f"n_groups {self.n_groups} must divide n_heads {self.n_heads}")
        lo, hi = self.A_init_range
        if not 0 < lo <= hi:
            raise ValueError(f"A_init_range must be 0 < lo <= hi, got {self.A_init_range}")


def init(key, cfg: Mamba2Settings) -> dict:
    k = I.split(key, 5)
    d_in_proj = 2 * cfg.d_inner + 2 * cfg.n_groups * cfg.d_state + cfg.n_heads
    lo, hi = cfg.A_init_range
    return {
        "in_proj": I.linear(k[0], cfg.d_model, d_in_proj, bias=cfg.bias),
        "conv1d": I.conv1d(k[1], cfg.conv_dim, cfg.d_conv, bias=cfg.conv_bias),
        "dt_bias": I.dt_bias(k[2], cfg.n_heads, cfg.dt_min, cfg.dt_max),
        "A_log": mx.log(I.uniform(k[3], (cfg.n_heads,), lo, hi)),
        "D": mx.ones((cfg.n_heads,)),
        **({"norm": {"weight": mx.ones((cfg.d_inner,))}} if cfg.rms_norm else {}),
        "out_proj": I.linear(k[4], cfg.d_inner, cfg.d_model, bias=cfg.bias),
    }


def init_state(cfg: Mamba2Settings, batch: int, max_len: int, dtype=mx.float32) -> dict:
    return {
        "conv": mx.zeros((batch, cfg.d_conv - 1, cfg.conv_dim), dtype=dtype),
        "ssm": mx.zeros((batch, cfg.n_heads, cfg.head_dim, cfg.d_state), dtype=mx.float32),
    }


def decode_block(params, h, norm_weight, eps, state, cfg: Mamba2Settings):
    """Fused inference residual block at T = 1 on a GPU: h + mixer(rms_norm(h)) in three launches —
    RMSNorm + in_proj, conv + dt + SSD step + gate (`ops.ssd.mamba2_step`), group norm + out_proj +
    residual (`_fused_decode`). None (the stack runs the general path) for prompts, padded rows or
    without a GPU kernel backend."""
    if not _fused_applies(params, h, state, cfg):
        return None
    return _fused_decode(params, h, state, cfg, norm_weight, eps, residual=h)


def stack_prepare(layers: list, cfg: Mamba2Settings):
    """(stacked, layers) for the persistent whole-stack decode kernel (`alloy.metal.mamba2_stack`):
    stacked = {"win" (L, DP, D), "wout" (L, D, DI), "cw" (L, CD, K), "cb"?, "dtb", "alog", "dsk"
    (L, H), "nw" (L, D), "gw" (L, DI) float32}, and ``layers`` (the stack's per-depth params,
    {"norm", "mixer"}) with in_proj / out_proj weights replaced by views of the stacks, so the two
    share one copy. None where the kernel cannot take the layers: quantized or LoRA'd projections,
    projection biases, the norm before the gate."""
    mixers = [lp["mixer"] for lp in layers]
    if (not mixers or cfg.norm_before_gate or cfg.bias
            or any("scales" in m["in_proj"] or "scales" in m["out_proj"] or "lora_A" in m["in_proj"]
                   or "lora_A" in m["out_proj"] for m in mixers)
            or mixers[0]["in_proj"]["weight"].dtype not in (mx.float16, mx.bfloat16, mx.float32)):
        return None
    f32 = mx.float32
    stacked = {
        "win": mx.stack([m["in_proj"]["weight"] for m in mixers]),
        "wout": mx.stack([m["out_proj"]["weight"] for m in mixers]),
        "cw": mx.stack([m["conv1d"]["weight"].reshape(cfg.conv_dim, cfg.d_conv) for m in mixers]),
        "dtb": mx.stack([m["dt_bias"] for m in mixers]),
        "alog": mx.stack([m["A_log"] for m in mixers]),
        "dsk": mx.stack([m["D"] for m in mixers]),
        "nw": mx.stack([lp["norm"]["weight"].astype(f32) for lp in layers]),
        "gw": (mx.stack([m["norm"]["weight"].astype(f32) for m in mixers]) if cfg.rms_norm
               else mx.zeros((len(mixers), 1), dtype=f32)),
    }
    if cfg.conv_bias:
        stacked["cb"] = mx.stack([m["conv1d"]["bias"] for m in mixers])
    mx.eval(stacked)
    views = {"in_proj": unstack(stacked["win"]), "out_proj": unstack(stacked["wout"])}
    layers = [{**lp, "mixer": {**lp["mixer"], **{n: {**lp["mixer"][n], "weight": v[i]} for n, v in views.items()}}}
              for i, lp in enumerate(layers)]
    return stacked, layers


def stack_decode(stacked: dict, h, states: list, norm_eps: float, cfg: Mamba2Settings, tag: int = 0):
    """One decode token through every layer in one persistent launch (CUDA); None elsewhere or
    for padded rows / more batch rows than the kernel takes (the stack then runs layer by layer).
    ``tag``: distinct per stretch of one model (see `alloy.metal.mamba2_stack.launch`)."""
    from alloy.metal import mamba2_stack as K

    norm_groups = cfg.n_groups if cfg.rms_norm else 0
    if (h.shape[1] != 1 or any("valid" in s for s in states)
            or not K.applies(stacked, h[:, 0], h.dtype, cfg.d_state, norm_groups)):
        return None
    out, convs, ssms = K.launch(stacked, h[:, 0], [s["conv"] for s in states], [s["ssm"] for s in states],
                                d_state=cfg.d_state, norm_groups=norm_groups, eps=norm_eps, norm_eps=cfg.norm_eps,
                                dt_lim=(cfg.dt_clamp_min, cfg.dt_clamp_max or float("inf")), tag=tag)
    return out[:, None], [{"conv": c, "ssm": s} for c, s in zip(convs, ssms)]


# x, B, C come out of the conv as three arrays (`causal_conv1d_split`: one launch on a GPU, each
# contiguous, so no slicing copies before the SSD kernels and no concatenation of their gradients);
# off: one conv output sliced with mx.split (the A/B of docs/benchmarks.md, session 7).
SPLIT_CONV = True

# in_proj as three products (z, xBC, dt each contiguous: no packing copies before the conv and norm
# kernels; their gradients accumulate in one chain of GEMMs instead of a concatenation) for calls of
# at least SPLIT_IN_PROJ_MIN_ROWS tokens; decode-sized calls keep one product and slice it.
SPLIT_IN_PROJ = True
SPLIT_IN_PROJ_MIN_ROWS = 1024

# On the conv kernel path, dt rides with xBC: in_proj as two products (z, then xBC and dt as one) and
# the conv passes dt's columns through (`causal_conv1d_split(tail=n_heads)`), its gradient kernel
# writing dt's cotangent into dxBC's last columns: no 24-column product of its own, whose weight
# gradient (K = B * T) cuBLAS ran as a split-K GEMM at ~1% of the tensor cores (H100 toy step profile:
# 9 x 0.09-0.13 ms, plus the 24-wide forward product, 24 us, and its dx GEMM, 36 us). Toy step (40
# pipelined steps, same job): 69.4 / 69.9 ms on vs 69.5 off, within the run-to-run noise; peak memory
# 27.82 vs 28.64 GB (docs/benchmarks.md session 12).
DT_IN_CONV = True


@register_mixer("mamba2", settings=Mamba2Settings, init=init, init_state=init_state, state="ssm",
                mask="none", residual_block=decode_block, stack_decode=(stack_prepare, stack_decode))
def apply(params, x, state, cfg: Mamba2Settings):
    Bsz, T, _ = x.shape
    gn = cfg.n_groups * cfg.d_state
    if _fused_applies(params, x, state, cfg):
        return _fused_decode(params, x, state, cfg)
    split = SPLIT_IN_PROJ and Bsz * T >= SPLIT_IN_PROJ_MIN_ROWS
    dt_in_conv = split and SPLIT_CONV and DT_IN_CONV and conv_kernel_applies(x, params["conv1d"]["weight"])
    if dt_in_conv:
        z, xBCdt = dense_split(params["in_proj"], x, (cfg.d_inner, cfg.conv_dim + cfg.n_heads))
        xBC = xBCdt[..., :cfg.conv_dim]  # (read only by conv_tail below)
    elif split:
        z, xBC, dt = dense_split(params["in_proj"], x, (cfg.d_inner, cfg.conv_dim, cfg.n_heads))
    else:
        z, xBC, dt = mx.split(dense(params["in_proj"], x), [cfg.d_inner, 2 * cfg.d_inner + 2 * gn], axis=-1)
    valid = None if state is None else state.get("valid")
    conv_args = (xBCdt if dt_in_conv else xBC, params["conv1d"]["weight"], params["conv1d"].get("bias"),
                 None if state is None else state["conv"])
    if dt_in_conv:
        (xs, Bm, Cm, dt), conv_state = causal_conv1d_split(*conv_args, activation="silu", widths=(cfg.d_inner, gn, gn),
                                                           tail=cfg.n_heads)
    elif SPLIT_CONV:
        (xs, Bm, Cm), conv_state = causal_conv1d_split(*conv_args, activation="silu", widths=(cfg.d_inner, gn, gn))
    else:
        xBC_out, conv_state = causal_conv1d(*conv_args, activation="silu")
        xs, Bm, Cm = mx.split(xBC_out, [cfg.d_inner, cfg.d_inner + gn], axis=-1)
    xs = xs.reshape(Bsz, T, cfg.n_heads, cfg.head_dim)
    Bm = Bm.reshape(Bsz, T, cfg.n_groups, cfg.d_state)
    Cm = Cm.reshape(Bsz, T, cfg.n_groups, cfg.d_state)
    dt = nn.softplus(dt.astype(mx.float32) + params["dt_bias"].astype(mx.float32))
    if cfg.dt_clamp_min > 0.0 or cfg.dt_clamp_max > 0.0:
        dt = mx.clip(dt, cfg.dt_clamp_min or None, cfg.dt_clamp_max or None)
    if valid is not None:
        dt = mx.where(live_mask(valid, T)[..., None], dt, 0.0)
        conv_state = conv_tail(state["conv"], xBC, valid)
    A = -mx.exp(params["A_log"].astype(mx.float32))
    y, ssm_state = ssd(xs, dt, A, Bm, Cm, params["D"], None if state is None else state["ssm"],
                       chunk_size=cfg.chunk_size)
    y = y.reshape(Bsz, T, cfg.d_inner)
    if cfg.rms_norm:
        y = gated_rms_norm(y, z, params["norm"]["weight"], cfg.norm_eps,
                           group_size=cfg.d_inner // cfg.n_groups, norm_before_gate=cfg.norm_before_gate)
    else:
        y = (y.astype(mx.float32) * nn.silu(z.astype(mx.float32))).astype(y.dtype)
    out = dense(params["out_proj"], y)
    if state is None:
        return out, None
    return out, {"conv": conv_state.astype(state["conv"].dtype), "ssm": ssm_state}


def _fused_applies(params, x, state, cfg: Mamba2Settings) -> bool:
    """The fused one-token GPU path applies: a decode step of unpadded rows (gate before the norm,
    as the step kernel computes it) on a GPU kernel backend."""
    return (x.shape[1] == 1 and state is not None and "valid" not in state and not cfg.norm_before_gate
            and mamba2_step_kernel_applies(x, params["conv1d"]["weight"]))


def _fused_decode(params, x, state, cfg: Mamba2Settings, norm_weight=None, eps: float = 0.0, residual=None):
    """The GPU decode path, three launches per layer: [RMSNorm +] in_proj (`decode_linear`), conv +
    dt + SSD step + gate (`ops.ssd.mamba2_step`), group norm + out_proj [+ residual]
    (`decode_linear`) — batch-1 decode is bound by launches and graph nodes, not bytes. Same math as
    the general path above (with ``norm_weight`` / ``residual``: the stack's pre-norm and residual)."""
    Bsz = x.shape[0]
    zxbcdt = decode_linear(params["in_proj"], x, norm_weight, 0 if norm_weight is None else 1, eps,
                           out_shape=(Bsz, params["in_proj"]["weight"].shape[0]))
    lim = (cfg.dt_clamp_min, cfg.dt_clamp_max or float("inf"))
    y, conv_state, ssm_state = mamba2_step(
        zxbcdt, params["conv1d"]["weight"], params["conv1d"].get("bias"), state["conv"],
        params["dt_bias"], params["A_log"], params["D"], lim, state["ssm"])
    out = decode_linear(params["out_proj"], y, params["norm"]["weight"] if cfg.rms_norm else None,
                        cfg.n_groups if cfg.rms_norm else 0, cfg.norm_eps, out_shape=(Bsz, 1, cfg.d_model),
                        residual=residual)
    return out, {"conv": conv_state, "ssm": ssm_state}

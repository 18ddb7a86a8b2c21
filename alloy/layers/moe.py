"""Mixture-of-experts FFN: a router picks top-k experts per token; a shared expert may add in.

    s = softmax(x Wr^T)  or  sigmoid(x Wr^T)                     router scores (float32)
    idx = top_k(s + b)                                           b: optional selection-only bias
    w = s[idx];  w = w / sum(w) if norm_topk_prob;  w = w * routed_scaling_factor
    y = sum_j w_j E_idx_j(x)  (+ sigmoid(x Wg^T) * E_shared(x))  experts: SwiGLU or relu^2 / plain

Experts are stored stacked, ``experts.{gate,up,down}_proj.weight`` of shape (E, F, D) / (E, D, F),
and run with ``mx.gather_mm`` so each token touches only its k experts. ``moe_ref`` computes every
expert densely and is the specification for tests.
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from alloy.layers.common import dense
from alloy.layers.registry import LayerSettings, register_ffn
from alloy.ops.activations import ACTIVATIONS, activation
from alloy.params import init as I


@dataclass(frozen=True)
class MoESettings(LayerSettings):
    n_experts: int = 8
    top_k: int = 2
    d_ff: int = 0  # per expert; 0: d_model
    activation: str = "silu"
    gated: bool = True
    scoring: str = "softmax"  # "softmax" | "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    router_bias: bool = False  # a learned/corrected bias used only to select experts (DeepSeek-V3 style)
    shared_d_ff: int = 0  # 0: no shared expert
    shared_gate: bool = False  # sigmoid gate on the shared expert (Qwen2-MoE / Qwen3-Next)
    n_group: int = 1  # group-limited routing (DeepSeek-V3 style): experts in n_group groups, a group
    topk_group: int = 1  # scores by its top-2 experts, and only the best topk_group groups are eligible

    @property
    def ff(self) -> int:
        return self.d_ff or self.d_model

    def validate(self):
        for f in ("n_experts", "top_k"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{f} must be a positive int, got {v!r}")
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k {self.top_k} exceeds n_experts {self.n_experts}")
        if self.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {self.scoring!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        for f in ("d_ff", "shared_d_ff"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{f} must be a non-negative int, got {v!r}")
        if not isinstance(self.n_group, int) or self.n_group < 1 or self.n_experts % self.n_group:
            raise ValueError(f"n_group must be a positive int dividing n_experts {self.n_experts}, got {self.n_group!r}")
        if not isinstance(self.topk_group, int) or not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group must be in [1, n_group={self.n_group}], got {self.topk_group!r}")
        if self.shared_gate and not self.shared_d_ff:
            raise ValueError("shared_gate needs a shared expert (shared_d_ff > 0)")


def init(key, cfg: MoESettings) -> dict:
    k = I.split(key, 8)
    E, F, D = cfg.n_experts, cfg.ff, cfg.d_model
    experts = {}
    if cfg.gated:
        experts["gate_proj"] = {"weight": I.normal(k[0], (E, F, D))}
    experts["up_proj"] = {"weight": I.normal(k[1], (E, F, D))}
    experts["down_proj"] = {"weight": I.normal(k[2], (E, D, F))}
    p = {"router": {"weight": I.normal(k[3], (E, D))}}
    if cfg.router_bias:
        p["router"]["bias"] = mx.zeros((E,))
    p["experts"] = experts
    if cfg.shared_d_ff:
        sh = {}
        if cfg.gated:
            sh["gate_proj"] = I.linear(k[4], D, cfg.shared_d_ff)
        sh["up_proj"] = I.linear(k[5], D, cfg.shared_d_ff)
        sh["down_proj"] = I.linear(k[6], cfg.shared_d_ff, D)
        p["shared_expert"] = sh
        if cfg.shared_gate:
            p["shared_expert_gate"] = I.linear(k[7], D, 1)
    return p


def route(params, x, cfg: MoESettings):
    """x (N, D) -> (idx (N, k) int32, weights (N, k) float32)."""
    logits = (x @ params["router"]["weight"].T).astype(mx.float32)
    scores = mx.softmax(logits, axis=-1) if cfg.scoring == "softmax" else mx.sigmoid(logits)
    sel = scores + params["router"]["bias"].astype(mx.float32) if cfg.router_bias else scores
    if cfg.n_group > 1:  # keep the topk_group groups with the best top-2 sums
        N, G = sel.shape[0], cfg.n_group
        grouped = sel.reshape(N, G, cfg.n_experts // G)
        group_score = mx.sort(grouped, axis=-1)[..., -2:].sum(-1)  # (N, G)
        kth = mx.sort(group_score, axis=-1)[:, G - cfg.topk_group][:, None]
        keep = mx.stop_gradient(group_score >= kth)  # ties at the threshold may keep an extra group
        sel = mx.where(mx.repeat(keep, cfg.n_experts // G, axis=1), sel, -mx.inf)
    idx = mx.stop_gradient(mx.argpartition(-sel, kth=cfg.top_k - 1, axis=-1)[:, : cfg.top_k])
    w = mx.take_along_axis(scores, idx, axis=-1)
    if cfg.norm_topk_prob:
        w = w / w.sum(-1, keepdims=True)
    return idx.astype(mx.int32), w * cfg.routed_scaling_factor


def _shared(params, x, cfg):
    sh = params["shared_expert"]
    act = activation(cfg.activation)
    h = dense(sh["up_proj"], x)
    h = act(dense(sh["gate_proj"], x)) * h if cfg.gated else act(h)
    y = dense(sh["down_proj"], h)
    if cfg.shared_gate:
        y = mx.sigmoid(dense(params["shared_expert_gate"], x)) * y
    return y


def moe_ref(params, x, cfg: MoESettings):
    """Dense specification: every expert on every token, weighted by the routing. x (N, D)."""
    idx, w = route(params, x, cfg)
    dense_w = (mx.arange(cfg.n_experts)[None, None, :] == idx[..., None]).astype(mx.float32)
    dense_w = (dense_w * w[..., None]).sum(1)  # (N, E)
    ex = params["experts"]
    act = activation(cfg.activation)
    up = mx.einsum("nd,efd->nef", x, ex["up_proj"]["weight"])
    h = act(mx.einsum("nd,efd->nef", x, ex["gate_proj"]["weight"])) * up if cfg.gated else act(up)
    y = mx.einsum("nef,edf->ned", h, ex["down_proj"]["weight"])
    y = (y * dense_w[..., None].astype(y.dtype)).sum(1)
    if cfg.shared_d_ff:
        y = y + _shared(params, x, cfg)
    return y


def _gather_mm(a, w, idx):
    """a (N, k|1, 1, in) x w (E, out, in)[idx] -> (N, k, 1, out). MLX's CPU gather_mm is
    float32-only, so other dtypes go through float32 there (a static dtype/device fact)."""
    if a.dtype != mx.float32 and mx.default_device() == mx.cpu:
        return mx.gather_mm(a.astype(mx.float32), w.astype(mx.float32).swapaxes(-1, -2),
                            rhs_indices=idx).astype(a.dtype)
    return mx.gather_mm(a, w.swapaxes(-1, -2), rhs_indices=idx)


@register_ffn("moe", settings=MoESettings, init=init)
def apply(params, x, state, cfg: MoESettings):
    shape = x.shape
    xf = x.reshape(-1, shape[-1])
    idx, w = route(params, xf, cfg)
    ex = params["experts"]
    act = activation(cfg.activation)
    xe = xf[:, None, None, :]  # (N, 1, 1, D): gathered against each token's k experts
    up = _gather_mm(xe, ex["up_proj"]["weight"], idx)
    h = act(_gather_mm(xe, ex["gate_proj"]["weight"], idx)) * up if cfg.gated else act(up)
    y = _gather_mm(h, ex["down_proj"]["weight"], idx)[:, :, 0]  # (N, k, D)
    y = (y * w[..., None].astype(y.dtype)).sum(1)
    if cfg.shared_d_ff:
        y = y + _shared(params, xf, cfg)
    return y.reshape(shape), state

"""Mixture-of-experts FFN: a router picks top-k experts per token; a shared expert may add in.

    s = softmax | sigmoid | sqrt(softplus) (x Wr^T)              router scores (float32)
    idx = top_k(s + b)                                           b: optional selection-only bias
    w = s[idx];  w = w / sum(w) if norm_topk_prob;  w = w * routed_scaling_factor
    y = sum_j w_j E_idx_j(x)  (+ sigmoid(x Wg^T) * E_shared(x))  experts: SwiGLU or relu^2 / plain

``swiglu_limit`` L > 0 (DeepSeek-V4) clips a gated expert's pre-activations, routed and shared:
gate <= L, -L <= up <= L. ``hash_moe`` (DeepSeek-V4's first layers) selects by a frozen table
instead, idx = tid2eid[token id] ((vocab, top_k) int32, stored in the params, never trained: the
optimizers leave integer leaves alone), and weights the chosen experts by the router's scores.

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
    scoring: str = "softmax"  # "softmax" | "sigmoid" | "sqrtsoftplus"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    router_bias: bool = False  # a learned/corrected bias used only to select experts (DeepSeek-V3 style)
    shared_d_ff: int = 0  # 0: no shared expert
    shared_gate: bool = False  # sigmoid gate on the shared expert (Qwen2-MoE / Qwen3-Next)
    n_group: int = 1  # group-limited routing (DeepSeek-V3 style): experts in n_group groups, a group
    topk_group: int = 1  # scores by its top-2 experts, and only the best topk_group groups are eligible
    swiglu_limit: float = 0.0  # > 0: clip gated experts' gate (above) and up (both sides) at this value
    latent_dim: int = 0  # > 0: routed experts work in a latent width (Nemotron-H): fc1 D -> L, experts, fc2 L -> D

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
        if self.scoring not in SCORING:
            raise ValueError(f"scoring must be one of {sorted(SCORING)}, got {self.scoring!r}")
        if isinstance(self.swiglu_limit, bool) or not isinstance(self.swiglu_limit, (int, float)) \
                or self.swiglu_limit < 0:
            raise ValueError(f"swiglu_limit must be a number >= 0 (0 = off), got {self.swiglu_limit!r}")
        if self.swiglu_limit and not self.gated:
            raise ValueError("swiglu_limit clips gated experts only (gated must be true)")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        for f in ("d_ff", "shared_d_ff", "latent_dim"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{f} must be a non-negative int, got {v!r}")
        if not isinstance(self.n_group, int) or self.n_group < 1 or self.n_experts % self.n_group:
            raise ValueError(f"n_group must be a positive int dividing n_experts {self.n_experts}, got {self.n_group!r}")
        if not isinstance(self.topk_group, int) or not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group must be in [1, n_group={self.n_group}], got {self.topk_group!r}")
        if self.shared_gate and not self.shared_d_ff:
            raise ValueError("shared_gate needs a shared expert (shared_d_ff > 0)")


@dataclass(frozen=True)
class HashMoESettings(MoESettings):
    vocab_size: int = 0  # the tid2eid table's rows; 0: filled in with the model's vocab_size

    def validate(self):
        super().validate()
        if not isinstance(self.vocab_size, int) or self.vocab_size < 0:
            raise ValueError(f"vocab_size must be a non-negative int (0 = the model's), got {self.vocab_size!r}")
        if self.router_bias or self.n_group != 1:
            raise ValueError("hash_moe selects experts by token id: router_bias and n_group do not apply")


SCORING = {"softmax": lambda a: mx.softmax(a, axis=-1), "sigmoid": mx.sigmoid,
           "sqrtsoftplus": lambda a: mx.sqrt(mx.logaddexp(a, 0.0))}


def init(key, cfg: MoESettings) -> dict:
    k = I.split(key, 10)
    E, F, D = cfg.n_experts, cfg.ff, cfg.d_model
    X = cfg.latent_dim or D  # the experts' input / output width
    experts = {}
    if cfg.gated:
        experts["gate_proj"] = {"weight": I.normal(k[0], (E, F, X))}
    experts["up_proj"] = {"weight": I.normal(k[1], (E, F, X))}
    experts["down_proj"] = {"weight": I.normal(k[2], (E, X, F))}
    p = {"router": {"weight": I.normal(k[3], (E, D))}}
    if cfg.latent_dim:
        p["fc1_latent_proj"] = I.linear(k[8], D, X)
        p["fc2_latent_proj"] = I.linear(k[9], X, D)
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


def init_hash(key, cfg: HashMoESettings) -> dict:
    """``init`` plus ``tid2eid``: top_k distinct random experts per token id."""
    k1, k2 = I.split(key, 2)
    p = init(k1, cfg)
    order = mx.argsort(mx.random.uniform(shape=(cfg.vocab_size or 1, cfg.n_experts), key=k2), axis=-1)
    p["tid2eid"] = order[:, : cfg.top_k].astype(mx.int32)
    return p


def route(params, x, cfg: MoESettings, tokens=None):
    """x (N, D) -> (idx (N, k) int32, weights (N, k) float32); ``tokens`` (N,) for hash_moe."""
    logits = (x @ params["router"]["weight"].T).astype(mx.float32)
    scores = SCORING[cfg.scoring](logits)
    if "tid2eid" in params:
        if tokens is None:
            raise ValueError("hash_moe routes by token id: apply needs tokens=")
        idx = mx.stop_gradient(params["tid2eid"])[tokens.reshape(-1)].astype(mx.int32)
        return idx, _weights(scores, idx, cfg)
    sel = scores + params["router"]["bias"].astype(mx.float32) if cfg.router_bias else scores
    if cfg.n_group > 1:  # keep the topk_group groups with the best top-2 sums
        N, G = sel.shape[0], cfg.n_group
        grouped = sel.reshape(N, G, cfg.n_experts // G)
        group_score = mx.sort(grouped, axis=-1)[..., -2:].sum(-1)  # (N, G)
        kth = mx.sort(group_score, axis=-1)[:, G - cfg.topk_group][:, None]
        keep = mx.stop_gradient(group_score >= kth)  # ties at the threshold may keep an extra group
        sel = mx.where(mx.repeat(keep, cfg.n_experts // G, axis=1), sel, -mx.inf)
    idx = mx.stop_gradient(mx.argpartition(-sel, kth=cfg.top_k - 1, axis=-1)[:, : cfg.top_k]).astype(mx.int32)
    return idx, _weights(scores, idx, cfg)


def _weights(scores, idx, cfg):
    w = mx.take_along_axis(scores, idx, axis=-1)
    if cfg.norm_topk_prob:
        w = w / w.sum(-1, keepdims=True)
    return w * cfg.routed_scaling_factor


def _glu(act, gate, up, cfg):
    """act(gate) * up, with DeepSeek-V4's clipping when swiglu_limit is set."""
    if cfg.swiglu_limit:
        L = cfg.swiglu_limit
        gate, up = mx.minimum(gate, L), mx.clip(up, -L, L)
    return act(gate) * up


def _shared(params, x, cfg):
    sh = params["shared_expert"]
    act = activation(cfg.activation)
    h = dense(sh["up_proj"], x)
    h = _glu(act, dense(sh["gate_proj"], x), h, cfg) if cfg.gated else act(h)
    y = dense(sh["down_proj"], h)
    if cfg.shared_gate:
        y = mx.sigmoid(dense(params["shared_expert_gate"], x)) * y
    return y


def moe_ref(params, x, cfg: MoESettings, tokens=None):
    """Dense specification: every expert on every token, weighted by the routing. x (N, D)."""
    idx, w = route(params, x, cfg, tokens)
    dense_w = (mx.arange(cfg.n_experts)[None, None, :] == idx[..., None]).astype(mx.float32)
    dense_w = (dense_w * w[..., None]).sum(1)  # (N, E)
    ex = params["experts"]
    act = activation(cfg.activation)
    xl = dense(params["fc1_latent_proj"], x) if cfg.latent_dim else x
    up = mx.einsum("nd,efd->nef", xl, ex["up_proj"]["weight"])
    h = _glu(act, mx.einsum("nd,efd->nef", xl, ex["gate_proj"]["weight"]), up, cfg) if cfg.gated else act(up)
    y = mx.einsum("nef,edf->ned", h, ex["down_proj"]["weight"])
    y = (y * dense_w[..., None].astype(y.dtype)).sum(1)
    if cfg.latent_dim:
        y = dense(params["fc2_latent_proj"], y)
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


def apply(params, x, state, cfg: MoESettings, tokens=None):
    shape = x.shape
    xf = x.reshape(-1, shape[-1])
    idx, w = route(params, xf, cfg, tokens)
    ex = params["experts"]
    act = activation(cfg.activation)
    xl = dense(params["fc1_latent_proj"], xf) if cfg.latent_dim else xf
    xe = xl[:, None, None, :]  # (N, 1, 1, D|L): gathered against each token's k experts
    up = _gather_mm(xe, ex["up_proj"]["weight"], idx)
    h = _glu(act, _gather_mm(xe, ex["gate_proj"]["weight"], idx), up, cfg) if cfg.gated else act(up)
    y = _gather_mm(h, ex["down_proj"]["weight"], idx)[:, :, 0]  # (N, k, D|L)
    y = (y * w[..., None].astype(y.dtype)).sum(1)
    if cfg.latent_dim:
        y = dense(params["fc2_latent_proj"], y)
    if cfg.shared_d_ff:
        y = y + _shared(params, xf, cfg)
    return y.reshape(shape), state


register_ffn("moe", settings=MoESettings, init=init)(apply)
register_ffn("hash_moe", settings=HashMoESettings, init=init_hash, tokens=True)(apply)

"""Shared transformer blocks reused at several depths with per-call adapters (Zamba / Zamba2).

At each call site j (a depth listed in ``at``), block b = j mod n_blocks runs on the concatenation of
the current hidden state and the original embeddings, and its output, projected by a per-call
linear, is added to the input of that depth's mixer:

    u = rms_norm([h, e0])                                       (B, T, 2D)
    a = attention_b(u; q/k/v + per-call low-rank adapters)      (B, T, D), its own KV state per call
    m = mlp_b(rms_norm(a); gate/up + per-call adapters)
    t = linear_j(m)
    h = h + mixer_i(rms_norm(h + t))                            (the stack, at depth i = at[j])

The block weights are stored once (``params["shared_blocks"][b]``); per-call parts live with the
depth (``params["layers"][i]["shared"]``: ``adapters`` as ``lora_A`` / ``lora_B`` leaves on the
targeted linears, and ``linear``). This is data in the config (``ModelConfig.shared``), not a
fork of the stack.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import mlx.core as mx

from alloy.layers import attention as attn_layer
from alloy.layers import mlp as mlp_layer
from alloy.layers.common import dense
from alloy.ops.norm import rms_norm
from alloy.params import init as I
from alloy.params.tree import merge

ATTN_TARGETS = ("q_proj", "k_proj", "v_proj")
MLP_TARGETS = ("gate_proj", "up_proj")


@dataclass(frozen=True)
class SharedBlocks:
    n_blocks: int
    at: tuple  # depths with a call, in order; call j uses block j % n_blocks
    attention: attn_layer.AttentionSettings  # d_model = 2 * model d_model (concat), d_out = model d_model
    mlp: mlp_layer.MLPSettings
    adapter_rank: int = 0  # 0: no adapters
    adapt: tuple = ATTN_TARGETS + MLP_TARGETS
    norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, d: Mapping, d_model: int, n_layers: int) -> "SharedBlocks":
        if not isinstance(d, Mapping):
            raise ValueError(f"shared must be a mapping, got {type(d).__name__}")
        allowed = {"n_blocks", "at", "attention", "mlp", "adapter_rank", "adapt", "norm_eps"}
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise ValueError(f"shared: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
        for k in ("n_blocks", "at", "attention", "mlp"):
            if k not in d:
                raise ValueError(f"shared: missing field {k!r}")
        a = dict(d["attention"])
        a.setdefault("d_out", d_model)
        try:
            att = attn_layer.AttentionSettings(d_model=2 * d_model, **a)
            mlp = mlp_layer.MLPSettings(d_model=d_model, **dict(d["mlp"]))
        except (TypeError, ValueError) as e:
            raise ValueError(f"shared: {e}") from None
        out = cls(int(d["n_blocks"]), tuple(d["at"]), att, mlp, int(d.get("adapter_rank", 0)),
                  tuple(d.get("adapt", ATTN_TARGETS + MLP_TARGETS)), float(d.get("norm_eps", 1e-5)))
        out.check(n_layers)
        return out

    def check(self, n_layers: int) -> None:
        if self.n_blocks < 1:
            raise ValueError(f"shared.n_blocks must be >= 1, got {self.n_blocks}")
        if list(self.at) != sorted(set(self.at)) or any(not 0 <= i < n_layers for i in self.at):
            raise ValueError(f"shared.at must be increasing depths in [0, {n_layers}), got {list(self.at)}")
        bad = sorted(set(self.adapt) - set(ATTN_TARGETS + MLP_TARGETS))
        if bad:
            raise ValueError(f"shared.adapt: unknown target(s) {bad}; allowed {list(ATTN_TARGETS + MLP_TARGETS)}")
        if self.adapter_rank < 0:
            raise ValueError(f"shared.adapter_rank must be >= 0, got {self.adapter_rank}")

    def to_dict(self) -> dict:
        a = self.attention.to_dict()
        return {"n_blocks": self.n_blocks, "at": list(self.at), "attention": a, "mlp": self.mlp.to_dict(),
                "adapter_rank": self.adapter_rank, "adapt": list(self.adapt), "norm_eps": self.norm_eps}

    def calls(self) -> dict[int, tuple[int, int]]:
        """depth -> (call index j, block index b)."""
        return {i: (j, j % self.n_blocks) for j, i in enumerate(self.at)}


def init_block(key, sh: SharedBlocks) -> dict:
    k = I.split(key, 2)
    D = sh.mlp.d_model
    return {"norm": {"weight": mx.ones((2 * D,))}, "attn": attn_layer.init(k[0], sh.attention),
            "ffn_norm": {"weight": mx.ones((D,))}, "mlp": mlp_layer.init(k[1], sh.mlp)}


def init_call(key, sh: SharedBlocks, block: dict) -> dict:
    """Per-call params: adapters (B = 0, so a fresh call equals the bare block) and the linear."""
    D = sh.mlp.d_model
    keys = iter(I.split(key, len(sh.adapt) + 1))
    adapters = {"attn": {}, "mlp": {}}
    if sh.adapter_rank:
        for name in sh.adapt:
            part = "attn" if name in ATTN_TARGETS else "mlp"
            w = block[part][name]["weight"]
            adapters[part][name] = {"lora_A": I.normal(next(keys), (sh.adapter_rank, w.shape[1])),
                                    "lora_B": mx.zeros((w.shape[0], sh.adapter_rank))}
    return {"adapters": adapters, "linear": I.linear(next(keys), D, D)}


def init_call_state(sh: SharedBlocks, batch: int, max_len: int, dtype) -> dict:
    return attn_layer.init_state(sh.attention, batch, max_len, dtype)


def apply_call(block: dict, call: dict, h, e0, state, sh: SharedBlocks):
    """-> (t (B, T, D) to add to the mixer input, new attention state or None)."""
    u = rms_norm(mx.concatenate([h, e0.astype(h.dtype)], axis=-1), block["norm"]["weight"], sh.norm_eps)
    a, new_state = attn_layer.apply(merge(block["attn"], call["adapters"]["attn"]), u, state, sh.attention)
    a = rms_norm(a, block["ffn_norm"]["weight"], sh.norm_eps)
    m, _ = mlp_layer.apply(merge(block["mlp"], call["adapters"]["mlp"]), a, None, sh.mlp)
    return dense(call["linear"], m), new_state

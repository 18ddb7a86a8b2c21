"""Hybrid families with linear-attention / MoE parts: Qwen3-Next (and more to come)."""
from __future__ import annotations

import re

import mlx.core as mx

from alloy.convert.families import _rope_theta, _unsupported
from alloy.convert.registry import Converter, register_converter, stack_experts, split_fused_experts, unstack_experts

# -- Qwen3-Next -----------------------------------------------------------------------------------
# Zero-centred RMSNorms: HF stores w and multiplies by (1 + w); Alloy stores (1 + w).
_OFFSET_NORMS = re.compile(r"(^model\.norm|\.input_layernorm|\.post_attention_layernorm|\.q_norm|\.k_norm)\.weight$")


def _shift_norms(flat: dict, delta: float) -> dict:
    return {k: (v.astype(mx.float32) + delta).astype(v.dtype) if _OFFSET_NORMS.search(k) else v
            for k, v in flat.items()}


def _gdn_dims(hf: dict):
    nk, nv = hf["linear_num_key_heads"], hf["linear_num_value_heads"]
    return nk, nv, hf["linear_key_head_dim"], hf["linear_value_head_dim"], nv // nk


def _qwen3_next_load(flat: dict, hf: dict) -> dict:
    nk, nv, hk, hv, r = _gdn_dims(hf)
    out = {}
    for key, w in split_fused_experts(stack_experts(_shift_norms(flat, 1.0))).items():
        if key.endswith(".in_proj_qkvz.weight"):
            pre, D = key[: -len("in_proj_qkvz.weight")], w.shape[-1]
            g = w.reshape(nk, 2 * hk + 2 * r * hv, D)  # per key-head group: [q, k, v (r heads), z (r heads)]
            q, k, v, z = (g[:, a:b].reshape(-1, D) for a, b in
                          ((0, hk), (hk, 2 * hk), (2 * hk, 2 * hk + r * hv), (2 * hk + r * hv, 2 * hk + 2 * r * hv)))
            out[pre + "in_proj_qkv.weight"] = mx.concatenate([q, k, v], axis=0)
            out[pre + "in_proj_z.weight"] = z
        elif key.endswith(".in_proj_ba.weight"):
            pre, D = key[: -len("in_proj_ba.weight")], w.shape[-1]
            g = w.reshape(nk, 2 * r, D)  # per group: [b (r), a (r)]
            out[pre + "in_proj_b.weight"] = g[:, :r].reshape(-1, D)
            out[pre + "in_proj_a.weight"] = g[:, r:].reshape(-1, D)
        else:
            out[key] = w
    return out


def _qwen3_next_save(flat: dict, cfg) -> dict:
    gdn = next((s for _, k, s in cfg.mixers if k == "gated_deltanet"), None)
    out = {}
    for key, w in flat.items():
        if gdn is not None and key.endswith(".in_proj_qkv.weight"):
            nk, hk, r, hv = gdn.n_k_heads, gdn.head_k_dim, gdn.n_v_heads // gdn.n_k_heads, gdn.head_v_dim
            pre, D = key[: -len("in_proj_qkv.weight")], w.shape[-1]
            q, k, v = mx.split(w, [nk * hk, 2 * nk * hk], axis=0)
            z = flat[pre + "in_proj_z.weight"]
            parts = [a.reshape(nk, -1, D) for a in (q, k, v, z)]
            out[pre + "in_proj_qkvz.weight"] = mx.concatenate(parts, axis=1).reshape(-1, D)
            b, a = flat[pre + "in_proj_b.weight"], flat[pre + "in_proj_a.weight"]
            out[pre + "in_proj_ba.weight"] = mx.concatenate([b.reshape(nk, r, D), a.reshape(nk, r, D)],
                                                             axis=1).reshape(-1, D)
        elif re.search(r"\.in_proj_(z|b|a)\.weight$", key) and gdn is not None:
            continue
        else:
            out[key] = w
    return unstack_experts(_shift_norms(out, -1.0))


def _qwen3_next_config(hf: dict) -> dict:
    _unsupported(hf, "hidden_act", lambda v: v == "silu")
    L, D = hf["num_hidden_layers"], hf["hidden_size"]
    types = hf.get("layer_types") or ["linear_attention" if (i + 1) % hf.get("full_attention_interval", 4)
                                      else "full_attention" for i in range(L)]
    if len(types) != L:
        raise ValueError(f"qwen3_next: layer_types has {len(types)} entries, num_hidden_layers is {L}")
    bad = sorted(set(types) - {"linear_attention", "full_attention"})
    if bad:
        raise ValueError(f"qwen3_next: unsupported layer_types {bad}")
    if "full_attention" in types:
        raise ValueError("qwen3_next: full_attention layers need the gated attention mixer, "
                         "which this build does not have yet")
    nk, nv, hk, hv, _ = _gdn_dims(hf)
    if nv % nk:
        raise ValueError(f"qwen3_next: linear_num_key_heads {nk} must divide linear_num_value_heads {nv}")
    eps = hf.get("rms_norm_eps", 1e-6)
    sparse = set()
    if hf.get("num_experts", 0) > 0:
        step = hf.get("decoder_sparse_step", 1)
        only = set(hf.get("mlp_only_layers") or [])
        sparse = {i for i in range(L) if i not in only and (i + 1) % step == 0}
    ffns = {}
    if sparse:
        ffns["moe"] = {"n_experts": hf["num_experts"], "top_k": hf["num_experts_per_tok"],
                       "d_ff": hf["moe_intermediate_size"], "norm_topk_prob": bool(hf.get("norm_topk_prob", True)),
                       "shared_d_ff": hf.get("shared_expert_intermediate_size") or 0,
                       "shared_gate": bool(hf.get("shared_expert_intermediate_size"))}
    if len(sparse) < L:
        ffns["mlp"] = {"d_ff": hf["intermediate_size"]}
    _rope_theta(hf)  # validates rope settings even when no attention layer uses them
    return {
        "name": "qwen3_next", "vocab_size": hf["vocab_size"], "d_model": D,
        "layer_types": ["gated_deltanet" for _ in types],
        "ffn_types": ["moe" if i in sparse else "mlp" for i in range(L)],
        "mixers": {"gated_deltanet": {"n_k_heads": nk, "n_v_heads": nv, "head_k_dim": hk, "head_v_dim": hv,
                                      "d_conv": hf.get("linear_conv_kernel_dim", 4), "norm_eps": eps}},
        "ffns": ffns, "norm_eps": eps, "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }


def _qwen3_next_to_hf(cfg) -> dict | None:
    kinds = {cfg.mixer(i)[0] for i in range(cfg.n_layers)}
    if kinds != {"gated_deltanet"} or len(cfg.mixers) != 1:
        return None
    g = cfg.mixers[0][2]
    if g.conv_bias or g.norm_eps != cfg.norm_eps:
        return None
    ffn_kinds = [cfg.ffn(i) for i in range(cfg.n_layers)]
    if any(f is None or f[0] not in ("moe", "mlp") for f in ffn_kinds):
        return None
    moe = next((f[1] for f in ffn_kinds if f[0] == "moe"), None)
    mlp = next((f[1] for f in ffn_kinds if f[0] == "mlp"), None)
    if len(cfg.ffns) > 2 or (mlp is not None and (mlp.activation != "silu" or not mlp.gated or mlp.bias)):
        return None
    hf = {"model_type": "qwen3_next", "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
          "num_hidden_layers": cfg.n_layers, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
          "tie_word_embeddings": cfg.tie_embeddings, "layer_types": ["linear_attention"] * cfg.n_layers,
          "linear_num_key_heads": g.n_k_heads, "linear_num_value_heads": g.n_v_heads,
          "linear_key_head_dim": g.head_k_dim, "linear_value_head_dim": g.head_v_dim,
          "linear_conv_kernel_dim": g.d_conv, "intermediate_size": mlp.ff if mlp else cfg.d_model,
          "num_experts": 0, "mlp_only_layers": [], "decoder_sparse_step": 1}
    if moe is not None:
        if (moe.scoring != "softmax" or moe.router_bias or moe.routed_scaling_factor != 1.0 or not moe.gated
                or moe.activation != "silu" or not moe.shared_d_ff or not moe.shared_gate):
            return None
        hf.update({"num_experts": moe.n_experts, "num_experts_per_tok": moe.top_k,
                   "moe_intermediate_size": moe.ff, "norm_topk_prob": moe.norm_topk_prob,
                   "shared_expert_intermediate_size": moe.shared_d_ff,
                   "mlp_only_layers": [i for i, f in enumerate(ffn_kinds) if f[0] == "mlp"]})
    return hf


register_converter(Converter(
    ("qwen3_next",), _qwen3_next_config,
    (("model.embed_tokens.", "embed_tokens."),
     ("model.layers.{i}.input_layernorm.", "layers.{i}.norm."),
     ("model.layers.{i}.linear_attn.", "layers.{i}.mixer.", ("gated_deltanet",)),
     ("model.layers.{i}.self_attn.", "layers.{i}.mixer.", ("attention",)),
     ("model.layers.{i}.post_attention_layernorm.", "layers.{i}.ffn_norm."),
     ("model.layers.{i}.mlp.gate.", "layers.{i}.ffn.router."),
     ("model.layers.{i}.mlp.", "layers.{i}.ffn."),
     ("model.norm.", "norm_f."),
     ("lm_head.", "lm_head.")),
    frozenset({"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "intermediate_size", "hidden_act", "rms_norm_eps", "rope_parameters", "rope_theta",
               "rope_scaling", "partial_rotary_factor", "attention_bias", "layer_types", "full_attention_interval",
               "linear_conv_kernel_dim", "linear_key_head_dim", "linear_num_key_heads", "linear_num_value_heads",
               "linear_value_head_dim", "decoder_sparse_step", "mlp_only_layers", "moe_intermediate_size",
               "norm_topk_prob", "num_experts", "num_experts_per_tok", "shared_expert_intermediate_size",
               "router_aux_loss_coef", "output_router_logits"}),
    _qwen3_next_to_hf, "Qwen3NextForCausalLM", drop=(r"rotary_emb\.inv_freq$",),
    load_hook=_qwen3_next_load, save_hook=_qwen3_next_save))

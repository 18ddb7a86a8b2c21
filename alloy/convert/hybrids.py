"""Hybrid families with linear-attention / MoE parts: Qwen3-Next (and more to come)."""
from __future__ import annotations

import re

import mlx.core as mx

from alloy.convert.families import (_attention_from_hf, _check_time_step_limit, _rope_parameters, _rope_theta,
                                    _unsupported)
from alloy.convert.registry import (Converter, decoder_rules, fuse_experts, register_converter, stack_experts,
                                    split_fused_experts, unstack_experts)

# -- Qwen3-Next -----------------------------------------------------------------------------------
# Zero-centred RMSNorms: HF stores w and multiplies by (1 + w); Alloy stores (1 + w).
_OFFSET_NORMS = re.compile(r"(^model\.(language_model\.)?norm|\.input_layernorm|\.post_attention_layernorm|\.q_norm|\.k_norm)\.weight$")


def _shift_norms(flat: dict, delta: float) -> dict:
    return {k: (v.astype(mx.float32) + delta).astype(v.dtype) if _OFFSET_NORMS.search(k) else v
            for k, v in flat.items()}


def _gdn_dims(hf: dict):
    nk, nv = hf["linear_num_key_heads"], hf["linear_num_value_heads"]
    return nk, nv, hf["linear_key_head_dim"], hf["linear_value_head_dim"], nv // nk


def _qwen_rope(hf: dict) -> float:
    """Qwen3.5 describes M-RoPE sections for images and video; for text all three position streams
    are the same token index, which makes M-RoPE exactly RoPE — so those keys are accepted here."""
    rp = dict(hf.get("rope_parameters") or {})
    for k in ("mrope_section", "mrope_interleaved"):
        rp.pop(k, None)
    return _rope_theta({**hf, "rope_parameters": rp})


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
            nk, hk, r = gdn.n_k_heads, gdn.head_k_dim, gdn.n_v_heads // gdn.n_k_heads
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
    theta = _qwen_rope(hf)  # validates rope settings even when no attention layer uses them
    mixers = {}
    if "linear_attention" in types:
        mixers["gated_deltanet"] = {"n_k_heads": nk, "n_v_heads": nv, "head_k_dim": hk, "head_v_dim": hv,
                                    "d_conv": hf.get("linear_conv_kernel_dim", 4), "norm_eps": eps}
    if "full_attention" in types:
        mixers["attention"] = _attention_from_hf(
            hf, theta=theta, qkv_bias=bool(hf.get("attention_bias")), o_bias=bool(hf.get("attention_bias")),
            qk_norm=True, output_gate=True, norm_eps=eps)
    return {
        "name": hf["model_type"], "vocab_size": hf["vocab_size"], "d_model": D,
        "layer_types": ["gated_deltanet" if t == "linear_attention" else "attention" for t in types],
        "ffn_types": ["moe" if i in sparse else "mlp" for i in range(L)],
        "mixers": mixers,
        "ffns": ffns, "norm_eps": eps, "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }


_QWEN_RENAME = decoder_rules({"linear_attn": ("gated_deltanet",), "self_attn": ("attention",)},
                             extra=(("model.layers.{i}.mlp.gate.", "layers.{i}.ffn.router."),))


def _qwen3_next_to_hf(cfg) -> dict | None:
    kinds = [cfg.mixer_kind(i) for i in range(cfg.n_layers)]
    if set(kinds) - {"gated_deltanet", "attention"} or "gated_deltanet" not in kinds or len(cfg.mixers) > 2:
        return None
    g = next(s for _, k, s in cfg.mixers if k == "gated_deltanet")
    a = next((s for _, k, s in cfg.mixers if k == "attention"), None)
    if g.conv_bias or g.norm_eps != cfg.norm_eps:
        return None
    if a is not None and (not a.output_gate or not a.qk_norm or a.norm_eps != cfg.norm_eps or a.scale
                          or a.qkv_bias != a.o_bias or not a.rope or a.rope_traditional):
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
          "tie_word_embeddings": cfg.tie_embeddings,
          "layer_types": ["linear_attention" if k == "gated_deltanet" else "full_attention" for k in kinds],
          "linear_num_key_heads": g.n_k_heads, "linear_num_value_heads": g.n_v_heads,
          "linear_key_head_dim": g.head_k_dim, "linear_value_head_dim": g.head_v_dim,
          "linear_conv_kernel_dim": g.d_conv, "intermediate_size": mlp.ff if mlp else cfg.d_model,
          "num_experts": 0, "mlp_only_layers": [], "decoder_sparse_step": 1}
    if a is not None:
        hf.update({"num_attention_heads": a.n_heads, "num_key_value_heads": a.kv_heads, "head_dim": a.hd,
                   "attention_bias": a.qkv_bias,
                   "rope_parameters": {**_rope_parameters(a),
                                       "partial_rotary_factor": a.partial_rotary_factor}})
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
    _QWEN_RENAME,
    frozenset({"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "intermediate_size", "hidden_act", "rms_norm_eps", "rope_parameters", "rope_theta",
               "rope_scaling", "partial_rotary_factor", "attention_bias", "layer_types", "full_attention_interval",
               "linear_conv_kernel_dim", "linear_key_head_dim", "linear_num_key_heads", "linear_num_value_heads",
               "linear_value_head_dim", "decoder_sparse_step", "mlp_only_layers", "moe_intermediate_size",
               "norm_topk_prob", "num_experts", "num_experts_per_tok", "shared_expert_intermediate_size",
               "router_aux_loss_coef", "output_router_logits"}),
    _qwen3_next_to_hf, "Qwen3NextForCausalLM", drop=(r"rotary_emb\.inv_freq$",),
    load_hook=_qwen3_next_load, save_hook=_qwen3_next_save))


# -- Jamba: Mamba-1 (dt/B/C RMSNorm) + attention (no positions) + MoE ---------------------------
def _jamba_kinds(hf: dict, L: int):
    ap, ao = hf.get("attn_layer_period", 8), hf.get("attn_layer_offset", 4)
    ep, eo = hf.get("expert_layer_period", 2), hf.get("expert_layer_offset", 1)
    mixers = ["attention" if i % ap == ao else "mamba1" for i in range(L)]
    ffns = ["moe" if hf.get("num_experts", 1) > 1 and i % ep == eo else "mlp" for i in range(L)]
    return mixers, ffns


def _jamba_config(hf: dict) -> dict:
    _unsupported(hf, "hidden_act", lambda v: v == "silu")
    _unsupported(hf, "sliding_window", lambda v: v is None)
    L, D = hf["num_hidden_layers"], hf["hidden_size"]
    eps = hf.get("rms_norm_eps", 1e-6)
    kinds, ffn_kinds = _jamba_kinds(hf, L)
    rank = hf.get("mamba_dt_rank", "auto")
    mixers = {}
    if "mamba1" in kinds:
        mixers["mamba1"] = {"d_state": hf.get("mamba_d_state", 16), "d_conv": hf.get("mamba_d_conv", 4),
                            "expand": hf.get("mamba_expand", 2),
                            "dt_rank": -(-D // 16) if rank == "auto" else int(rank),
                            "conv_bias": bool(hf.get("mamba_conv_bias", True)),
                            "bias": bool(hf.get("mamba_proj_bias", False)), "dt_bc_norm": True,
                            "dt_bc_norm_eps": eps}
    if "attention" in kinds:
        mixers["attention"] = _attention_from_hf({**hf, "head_dim": None}, rope=False)
    ffns = {}
    if "moe" in ffn_kinds:
        ffns["moe"] = {"n_experts": hf["num_experts"], "top_k": hf.get("num_experts_per_tok", 2),
                       "d_ff": hf["intermediate_size"], "norm_topk_prob": False}
    if "mlp" in ffn_kinds:
        ffns["mlp"] = {"d_ff": hf["intermediate_size"]}
    return {"name": "jamba", "vocab_size": hf["vocab_size"], "d_model": D, "layer_types": kinds,
            "ffn_types": ffn_kinds, "mixers": mixers, "ffns": ffns, "norm_eps": eps,
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False))}


def _jamba_to_hf(cfg) -> dict | None:
    kinds = [cfg.mixer_kind(i) for i in range(cfg.n_layers)]
    ffn_kinds = [cfg.ffn_kind(i) for i in range(cfg.n_layers)]
    if set(kinds) - {"mamba1", "attention"} or "mamba1" not in kinds or set(ffn_kinds) - {"moe", "mlp"}:
        return None
    m = next(s for _, k, s in cfg.mixers if k == "mamba1")
    if not m.dt_bc_norm or m.dt_bc_norm_eps != cfg.norm_eps or len(cfg.mixers) > 2 or len(cfg.ffns) > 2:
        return None
    a = next((s for _, k, s in cfg.mixers if k == "attention"), None)
    if a is not None and (a.rope or a.qk_norm or a.qkv_bias or a.o_bias or a.hd * a.n_heads != cfg.d_model):
        return None
    moe = next((s for _, k, s in cfg.ffns if k == "moe"), None)
    mlp = next((s for _, k, s in cfg.ffns if k == "mlp"), None)
    ff = {s.ff for s in (moe, mlp) if s is not None}
    if len(ff) != 1 or (moe and (moe.norm_topk_prob or moe.shared_d_ff or moe.scoring != "softmax"
                                 or moe.router_bias or moe.routed_scaling_factor != 1.0)):
        return None
    # Jamba describes its layout by (period, offset); find ones that reproduce it.
    def period(flags):
        for p in range(1, cfg.n_layers + 1):
            for o in range(p):
                if [i % p == o for i in range(cfg.n_layers)] == flags:
                    return p, o
        return None
    ap = period([k == "attention" for k in kinds]) if "attention" in kinds else (cfg.n_layers + 1, cfg.n_layers)
    ep = period([k == "moe" for k in ffn_kinds]) if "moe" in ffn_kinds else (cfg.n_layers + 1, cfg.n_layers)
    if ap is None or ep is None:
        return None
    hf = {"model_type": "jamba", "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
          "num_hidden_layers": cfg.n_layers, "intermediate_size": ff.pop(), "hidden_act": "silu",
          "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
          "attn_layer_period": ap[0], "attn_layer_offset": ap[1], "expert_layer_period": ep[0],
          "expert_layer_offset": ep[1], "num_experts": moe.n_experts if moe else 1,
          "num_experts_per_tok": moe.top_k if moe else 1, "mamba_d_state": m.d_state, "mamba_d_conv": m.d_conv,
          "mamba_expand": m.expand, "mamba_dt_rank": m.rank, "mamba_conv_bias": m.conv_bias,
          "mamba_proj_bias": m.bias, "num_attention_heads": a.n_heads if a else 1,
          "num_key_value_heads": a.kv_heads if a else 1}
    return hf


register_converter(Converter(
    ("jamba",), _jamba_config,
    decoder_rules({"mamba": ("mamba1",), "self_attn": ("attention",)}, ffn_norm="pre_ff_layernorm",
                  ffn="feed_forward", final="final_layernorm"),
    frozenset({"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "intermediate_size", "hidden_act", "rms_norm_eps", "attn_layer_period", "attn_layer_offset",
               "expert_layer_period", "expert_layer_offset", "num_experts", "num_experts_per_tok",
               "mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_dt_rank", "mamba_conv_bias",
               "mamba_proj_bias", "use_mamba_kernels", "router_aux_loss_coef", "output_router_logits",
               "sliding_window", "num_logits_to_keep"}),
    _jamba_to_hf, "JambaForCausalLM",
    load_hook=lambda flat, hf: stack_experts(flat), save_hook=lambda flat, cfg: unstack_experts(flat)))


# -- Nemotron-H: Mamba-2, attention (no positions), relu^2 MLP and MoE as separate layers ----------
_NEMOTRON_KINDS = {"linear_attention": ("mamba2", "none"), "full_attention": ("attention", "none"),
                   "mlp": ("none", "mlp"), "moe": ("none", "moe")}


def _nemotron_h_config(hf: dict) -> dict:
    D = hf["hidden_size"]
    types = hf.get("layers_block_type")
    if types is None:
        pat = hf.get("hybrid_override_pattern", "")
        types = [{"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}.get(c, c) for c in pat]
    L = hf.get("num_hidden_layers") or len(types)
    if len(types) != L:
        raise ValueError(f"nemotron_h: {len(types)} layer types for num_hidden_layers {L}")
    bad = sorted(set(types) - set(_NEMOTRON_KINDS))
    if bad:
        raise ValueError(f"nemotron_h: unsupported layer types {bad}")
    _unsupported(hf, "mamba_hidden_act", lambda v: v == "silu")
    _unsupported(hf, "sliding_window", lambda v: v is None)
    _check_time_step_limit(hf)
    eps = hf.get("layer_norm_epsilon", 1e-5)
    act = hf.get("mlp_hidden_act", "relu2")
    mixers, ffns = {}, {}
    if "linear_attention" in types:
        expand = hf.get("expand", 2)
        heads, hd = hf["mamba_num_heads"], hf["mamba_head_dim"]
        if heads * hd != expand * D:
            raise ValueError(f"nemotron_h: mamba_num_heads*mamba_head_dim = {heads * hd} must equal expand*hidden_size = {expand * D}")
        mixers["mamba2"] = {"d_state": hf["ssm_state_size"], "d_conv": hf.get("conv_kernel", 4), "expand": expand,
                            "head_dim": hd, "n_groups": hf.get("n_groups", 1), "chunk_size": hf.get("chunk_size", 256),
                            "conv_bias": bool(hf.get("use_conv_bias", True)), "bias": bool(hf.get("use_bias", False)),
                            "norm_eps": eps}
    if "full_attention" in types:
        mixers["attention"] = _attention_from_hf(hf, rope=False, qkv_bias=bool(hf.get("attention_bias")),
                                                 o_bias=bool(hf.get("attention_bias")))
    if "mlp" in types:
        ffns["mlp"] = {"d_ff": hf["intermediate_size"], "activation": act, "gated": False,
                       "bias": bool(hf.get("mlp_bias", False))}
    if "moe" in types:
        if bool(hf.get("mlp_bias", False)):
            raise ValueError("nemotron_h: mlp_bias with MoE layers is not supported")
        ffns["moe"] = {"n_experts": hf["n_routed_experts"], "top_k": hf["num_experts_per_tok"],
                       "d_ff": hf["moe_intermediate_size"], "activation": act, "gated": False, "scoring": "sigmoid",
                       "norm_topk_prob": bool(hf.get("norm_topk_prob", True)),
                       "routed_scaling_factor": float(hf.get("routed_scaling_factor", 1.0)), "router_bias": True,
                       "shared_d_ff": hf.get("moe_shared_expert_intermediate_size", 0) if hf.get("n_shared_experts", 1) else 0,
                       "n_group": hf.get("n_group", 1), "topk_group": hf.get("topk_group", 1),
                       "latent_dim": hf.get("moe_latent_size") or 0}
    return {"name": "nemotron_h", "vocab_size": hf["vocab_size"], "d_model": D,
            "layer_types": [_NEMOTRON_KINDS[t][0] for t in types],
            "ffn_types": [_NEMOTRON_KINDS[t][1] for t in types], "mixers": mixers, "ffns": ffns, "norm_eps": eps,
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False))}


def _nemotron_h_to_hf(cfg) -> dict | None:
    inv = {v: k for k, v in _NEMOTRON_KINDS.items()}
    pairs = [(cfg.mixer_kind(i), cfg.ffn_kind(i)) for i in range(cfg.n_layers)]
    if any(p not in inv for p in pairs) or not any(p[1] != "none" for p in pairs):
        return None
    if len(cfg.mixers) > 2 or len(cfg.ffns) > 2:
        return None
    hf = {"model_type": "nemotron_h", "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
          "num_hidden_layers": cfg.n_layers, "layers_block_type": [inv[p] for p in pairs],
          "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings}
    for _, kind, s in cfg.mixers:
        if kind == "mamba2":
            if s.norm_eps != cfg.norm_eps or s.norm_before_gate:
                return None
            hf.update({"ssm_state_size": s.d_state, "conv_kernel": s.d_conv, "expand": s.expand,
                       "mamba_num_heads": s.n_heads, "mamba_head_dim": s.head_dim, "n_groups": s.n_groups,
                       "chunk_size": s.chunk_size, "use_conv_bias": s.conv_bias, "use_bias": s.bias})
        else:
            if s.rope or s.qk_norm or s.qkv_bias != s.o_bias:
                return None
            hf.update({"num_attention_heads": s.n_heads, "num_key_value_heads": s.kv_heads, "head_dim": s.hd,
                       "attention_bias": s.qkv_bias})
    acts = set()
    for _, kind, s in cfg.ffns:
        if s.gated:
            return None
        acts.add(s.activation)
        if kind == "mlp":
            hf.update({"intermediate_size": s.ff, "mlp_bias": s.bias})
        else:
            if s.scoring != "sigmoid" or not s.router_bias or s.shared_gate:
                return None
            hf.update({"n_routed_experts": s.n_experts, "num_experts_per_tok": s.top_k,
                       "moe_intermediate_size": s.ff, "norm_topk_prob": s.norm_topk_prob,
                       "routed_scaling_factor": s.routed_scaling_factor, "n_group": s.n_group,
                       "topk_group": s.topk_group, "moe_latent_size": s.latent_dim or None,
                       "moe_shared_expert_intermediate_size": s.shared_d_ff, "n_shared_experts": int(bool(s.shared_d_ff))})
    if len(acts) > 1:
        return None
    hf["mlp_hidden_act"] = acts.pop() if acts else "relu2"
    return hf


register_converter(Converter(
    ("nemotron_h",), _nemotron_h_config,
    tuple((hf.replace("model.", prefix, 1), *rest) for prefix in ("backbone.", "model.") for hf, *rest in (
        ("model.embeddings.", "embed_tokens."),
        ("model.layers.{i}.norm.", "layers.{i}.norm.", ("mamba2", "attention")),
        ("model.layers.{i}.norm.", "layers.{i}.ffn_norm.", ("none",)),
        ("model.layers.{i}.mixer.", "layers.{i}.mixer.", ("mamba2", "attention")),
        ("model.layers.{i}.mixer.", "layers.{i}.ffn.", ("none",)),
        ("model.layers.{i}.mixer.gate.e_score_correction_bias", "layers.{i}.ffn.router.bias", ("none",)),
        ("model.layers.{i}.mixer.gate.", "layers.{i}.ffn.router.", ("none",)),
        ("model.layers.{i}.mixer.shared_experts.", "layers.{i}.ffn.shared_expert.", ("none",)),
        ("model.norm_f.", "norm_f."))) + (("lm_head.", "lm_head."),),
    frozenset({"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "intermediate_size", "layer_norm_epsilon", "layers_block_type", "hybrid_override_pattern",
               "mamba_head_dim", "mamba_hidden_act", "mamba_num_heads", "mamba_proj_bias", "mamba_ssm_cache_dtype",
               "mlp_bias", "mlp_hidden_act", "ssm_state_size", "n_groups", "chunk_size", "conv_kernel", "expand",
               "use_bias", "use_conv_bias", "use_mamba_kernels", "time_step_limit", "attention_bias", "sliding_window",
               "moe_intermediate_size", "moe_latent_size", "moe_shared_expert_intermediate_size",
               "moe_shared_expert_overlap", "mtp_layers_block_type", "n_group", "n_routed_experts", "n_shared_experts",
               "norm_topk_prob", "num_experts_per_tok", "num_nextn_predict_layers", "output_router_logits",
               "routed_scaling_factor", "topk_group", "num_logits_to_keep"}),
    _nemotron_h_to_hf, "NemotronHForCausalLM",
    load_hook=lambda flat, hf: stack_experts(flat), save_hook=lambda flat, cfg: unstack_experts(flat)))



# -- Qwen3.5 (dense and MoE; text-only, and the multimodal wrapper used text-only) ---------------
_QWEN35_TEXT_FIELDS = frozenset({
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "hidden_act", "rms_norm_eps", "rope_parameters", "rope_theta", "rope_scaling",
    "partial_rotary_factor", "attention_bias", "layer_types", "full_attention_interval", "linear_conv_kernel_dim",
    "linear_key_head_dim", "linear_num_key_heads", "linear_num_value_heads", "linear_value_head_dim",
    "moe_intermediate_size", "norm_topk_prob", "num_experts", "num_experts_per_tok", "shared_expert_intermediate_size",
    "router_aux_loss_coef", "output_router_logits", "decoder_sparse_step", "mlp_only_layers"})


def _qwen35_load(flat: dict, hf: dict) -> dict:
    return split_fused_experts(stack_experts(_shift_norms(flat, 1.0)))


def _qwen35_save(flat: dict, cfg) -> dict:
    return unstack_experts(_shift_norms(flat, -1.0))


def _qwen35_to_hf(model_type: str):
    def to_hf(cfg):
        hf = _qwen3_next_to_hf(cfg)
        if hf is None:
            return None
        moe = hf["num_experts"] > 0
        if moe != model_type.startswith("qwen3_5_moe"):
            return None
        if moe and (hf["mlp_only_layers"] or hf["decoder_sparse_step"] != 1):
            return None
        hf["model_type"] = model_type
        for k in ("mlp_only_layers", "decoder_sparse_step") + (() if moe else ("num_experts",)):
            hf.pop(k)
        return hf
    return to_hf


for _mt, _arch in (("qwen3_5_text", "Qwen3_5ForCausalLM"), ("qwen3_5_moe_text", "Qwen3_5MoeForCausalLM")):
    register_converter(Converter(
        (_mt,), _qwen3_next_config, _QWEN_RENAME, _QWEN35_TEXT_FIELDS, _qwen35_to_hf(_mt), _arch,
        drop=(r"rotary_emb\.inv_freq$",), load_hook=_qwen35_load, save_hook=_qwen35_save))


def _wrapper_config(hf: dict) -> dict:
    text = dict(hf.get("text_config") or {})
    if not text:
        raise ValueError(f"{hf['model_type']}: config has no text_config")
    text.setdefault("model_type", hf["model_type"] + "_text")
    if "tie_word_embeddings" in hf:
        text["tie_word_embeddings"] = hf["tie_word_embeddings"]
    from alloy.convert.registry import COMMON_FIELDS
    unknown = sorted(set(text) - COMMON_FIELDS - _QWEN35_TEXT_FIELDS)
    if unknown:
        raise ValueError(f"{hf['model_type']}: text_config field(s) {unknown} are not understood by the converter")
    return _qwen3_next_config(text)


for _mt in ("qwen3_5", "qwen3_5_moe"):
    register_converter(Converter(
        (_mt,), _wrapper_config,
        tuple((hf.replace("model.", "model.language_model.", 1), *rest) for hf, *rest in _QWEN_RENAME[:-1])
        + (_QWEN_RENAME[-1],),
        frozenset({"text_config", "vision_config", "image_token_id", "video_token_id", "vision_start_token_id",
                   "vision_end_token_id"}),
        None, "", drop=(r"^model\.visual\.", r"^mtp\.", r"rotary_emb\.inv_freq$"),
        load_hook=_qwen35_load))


# -- Granite-MoE-Hybrid: Mamba-2 + attention, MoE with a shared MLP, scalar multipliers ----------
_GRANITE_MOE = re.compile(r"^(?P<pre>model\.layers\.\d+\.)(?P<mod>block_sparse_moe|shared_mlp)\.(?P<rest>.+)$")


def _granite_load(flat: dict, hf: dict) -> dict:
    moe = hf.get("num_local_experts", 0) > 0
    out = {}
    for k, v in flat.items():
        m = _GRANITE_MOE.match(k)
        if not m:
            out[k] = v
            continue
        pre, mod, rest = m["pre"], m["mod"], m["rest"]
        base = pre + "block_sparse_moe." + ("experts." if mod == "block_sparse_moe" else
                                            ("shared_expert." if moe else ""))
        if rest == "input_linear.weight":  # fused [gate | up] along the output rows
            F = v.shape[-2] // 2
            out[base + "gate_proj.weight"] = v[..., :F, :]
            out[base + "up_proj.weight"] = v[..., F:, :]
        elif rest == "output_linear.weight":
            out[base + "down_proj.weight"] = v
        elif rest == "router.layer.weight":
            out[pre + "block_sparse_moe.router.weight"] = v
        else:
            out[k] = v
    return out


def _granite_save(flat: dict, cfg) -> dict:
    out = {}
    for k, v in flat.items():
        m = re.match(r"^(?P<pre>model\.layers\.\d+\.)block_sparse_moe\.(?P<rest>.+)$", k)
        if not m:
            out[k] = v
            continue
        pre, rest = m["pre"], m["rest"]
        if rest == "router.weight":
            out[pre + "block_sparse_moe.router.layer.weight"] = v
            continue
        sub = re.match(r"^(experts\.|shared_expert\.)?(gate_proj|up_proj|down_proj)\.weight$", rest)
        if sub is None:
            raise ValueError(f"granitemoehybrid export: no Hugging Face name for {k}")
        mod = "block_sparse_moe." if sub[1] == "experts." else "shared_mlp."
        if sub[2] == "gate_proj":
            up = flat[k.replace("gate_proj", "up_proj")]
            out[pre + mod + "input_linear.weight"] = mx.concatenate([v, up], axis=-2)
        elif sub[2] == "down_proj":
            out[pre + mod + "output_linear.weight"] = v
    return out


def _granite_config(hf: dict) -> dict:
    _unsupported(hf, "hidden_act", lambda v: v == "silu")
    _unsupported(hf, "position_embedding_type", lambda v: v in (None, "rope", "nope"))
    _check_time_step_limit(hf)
    D, L = hf["hidden_size"], hf["num_hidden_layers"]
    types = hf.get("layer_types") or hf.get("layers_block_type") or ["mamba"] * L
    types = ["mamba2" if t in ("mamba", "linear_attention") else "attention" if t in ("attention", "full_attention")
             else t for t in types]
    bad = sorted(set(types) - {"mamba2", "attention"})
    if bad or len(types) != L:
        raise ValueError(f"granitemoehybrid: layer_types must be {L} of mamba/attention, got {hf.get('layer_types')!r}")
    eps = hf.get("rms_norm_eps", 1e-6)
    heads = hf["num_attention_heads"]
    expand = hf.get("mamba_expand", 2)
    mixers = {}
    if "mamba2" in types:
        if hf["mamba_n_heads"] * hf["mamba_d_head"] != expand * D:
            raise ValueError("granitemoehybrid: mamba_n_heads*mamba_d_head must equal mamba_expand*hidden_size")
        mixers["mamba2"] = {"d_state": hf["mamba_d_state"], "d_conv": hf.get("mamba_d_conv", 4), "expand": expand,
                            "head_dim": hf["mamba_d_head"], "n_groups": hf.get("mamba_n_groups", 1),
                            "chunk_size": hf.get("mamba_chunk_size", 256),
                            "conv_bias": bool(hf.get("mamba_conv_bias", True)),
                            "bias": bool(hf.get("mamba_proj_bias", False)), "norm_eps": eps}
    if "attention" in types:
        hd = D // heads
        mixers["attention"] = {"n_heads": heads, "n_kv_heads": hf.get("num_key_value_heads") or heads, "head_dim": hd,
                               "rope": hf.get("position_embedding_type") == "rope", "rope_theta": _rope_theta(hf),
                               "qkv_bias": bool(hf.get("attention_bias")), "o_bias": bool(hf.get("attention_bias")),
                               "scale": float(hf.get("attention_multiplier", hd ** -0.5))}
    if hf.get("num_local_experts", 0) > 0:
        ffns = {"moe": {"n_experts": hf["num_local_experts"], "top_k": hf["num_experts_per_tok"],
                        "d_ff": hf["intermediate_size"], "norm_topk_prob": True,
                        "shared_d_ff": hf.get("shared_intermediate_size", 0)}}
    else:
        ffns = {"mlp": {"d_ff": hf.get("shared_intermediate_size") or hf["intermediate_size"]}}
    return {"name": "granitemoehybrid", "vocab_size": hf["vocab_size"], "d_model": D, "layer_types": types,
            "ffn_types": [next(iter(ffns))] * L, "mixers": mixers, "ffns": ffns, "norm_eps": eps,
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "embedding_multiplier": float(hf.get("embedding_multiplier", 1.0)),
            "residual_multiplier": float(hf.get("residual_multiplier", 1.0)),
            "logits_scaling": float(hf.get("logits_scaling", 1.0))}


def _granite_to_hf(cfg) -> dict | None:
    kinds = [cfg.mixer_kind(i) for i in range(cfg.n_layers)]
    if set(kinds) - {"mamba2", "attention"} or len(cfg.mixers) > 2 or len(cfg.ffns) != 1:
        return None
    if len(set(cfg.ffn_types)) != 1 or cfg.ffn_types[0] == "none":
        return None
    fkind, f = cfg.ffns[0][1], cfg.ffns[0][2]
    hf = {"model_type": "granitemoehybrid", "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
          "num_hidden_layers": cfg.n_layers, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
          "tie_word_embeddings": cfg.tie_embeddings, "embedding_multiplier": cfg.embedding_multiplier,
          "residual_multiplier": cfg.residual_multiplier, "logits_scaling": cfg.logits_scaling,
          "layer_types": ["mamba" if k == "mamba2" else "attention" for k in kinds]}
    if fkind == "moe":
        if (f.scoring != "softmax" or not f.norm_topk_prob or f.router_bias or f.shared_gate or not f.shared_d_ff
                or not f.gated or f.activation != "silu" or f.routed_scaling_factor != 1.0):
            return None
        hf.update({"num_local_experts": f.n_experts, "num_experts_per_tok": f.top_k, "intermediate_size": f.ff,
                   "shared_intermediate_size": f.shared_d_ff})
    else:
        if not f.gated or f.activation != "silu" or f.bias:
            return None
        hf.update({"num_local_experts": 0, "intermediate_size": f.ff, "shared_intermediate_size": f.ff})
    for _, kind, s in cfg.mixers:
        if kind == "mamba2":
            if s.norm_eps != cfg.norm_eps or s.norm_before_gate:
                return None
            hf.update({"mamba_d_state": s.d_state, "mamba_d_conv": s.d_conv, "mamba_expand": s.expand,
                       "mamba_n_heads": s.n_heads, "mamba_d_head": s.head_dim, "mamba_n_groups": s.n_groups,
                       "mamba_chunk_size": s.chunk_size, "mamba_conv_bias": s.conv_bias, "mamba_proj_bias": s.bias})
        else:
            if s.qk_norm or s.qkv_bias != s.o_bias or s.hd * s.n_heads != cfg.d_model or s.output_gate:
                return None
            hf.update({"num_attention_heads": s.n_heads, "num_key_value_heads": s.kv_heads,
                       "attention_bias": s.qkv_bias, "attention_multiplier": s.scale or s.hd ** -0.5,
                       "position_embedding_type": "rope" if s.rope else None,
                       "rope_parameters": _rope_parameters(s)})
    return hf


register_converter(Converter(
    ("granitemoehybrid",), _granite_config,
    decoder_rules({"mamba": ("mamba2",), "self_attn": ("attention",)}, ffn="block_sparse_moe"),
    frozenset({"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "intermediate_size", "hidden_act", "rms_norm_eps", "rope_parameters", "rope_theta", "rope_scaling",
               "attention_bias", "attention_multiplier", "embedding_multiplier", "residual_multiplier",
               "logits_scaling", "layer_types", "layers_block_type", "mamba_chunk_size", "mamba_conv_bias",
               "mamba_d_conv", "mamba_d_head", "mamba_d_state", "mamba_expand", "mamba_n_groups", "mamba_n_heads",
               "mamba_proj_bias", "num_experts_per_tok", "num_local_experts", "shared_intermediate_size",
               "router_aux_loss_coef", "output_router_logits", "position_embedding_type", "time_step_limit"}),
    _granite_to_hf, "GraniteMoeHybridForCausalLM", drop=(r"rotary_emb\.inv_freq$",),
    load_hook=_granite_load, save_hook=_granite_save))


# -- Falcon-H1: attention and Mamba-2 in parallel in every layer, muP multipliers ----------------
# Every Falcon-H1 multiplier is linear in a projection, so it is folded into that projection's
# weights on load (exact up to rounding) and the Alloy model is a plain parallel hybrid; export
# writes the folded weights with multipliers of 1.
def _falcon_dims(hf: dict):
    D = hf["hidden_size"]
    d_ssm = hf.get("mamba_d_ssm") or int(hf.get("mamba_expand", 2) * D)
    gn = hf.get("mamba_n_groups", 1) * hf["mamba_d_state"]
    return D, d_ssm, gn, hf["mamba_n_heads"]


def _falcon_load(flat: dict, hf: dict) -> dict:
    D, d_ssm, gn, H = _falcon_dims(hf)
    zx = hf.get("ssm_multipliers") or [1.0] * 5
    mup = mx.concatenate([mx.full((n,), float(m)) for n, m in
                          zip((d_ssm, d_ssm, gn, gn, H), zx)])
    a_in, k_mul = float(hf.get("attention_in_multiplier", 1.0)), float(hf.get("key_multiplier", 1.0))
    a_out, s_in = float(hf.get("attention_out_multiplier", 1.0)), float(hf.get("ssm_in_multiplier", 1.0))
    s_out = float(hf.get("ssm_out_multiplier", 1.0))
    g_mul, d_mul = (float(v) for v in (hf.get("mlp_multipliers") or [1.0, 1.0]))
    scale = {  # (suffix, weight factor, bias factor)
        ".mamba.in_proj.weight": s_in * mup[:, None], ".mamba.in_proj.bias": mup,
        ".mamba.out_proj.weight": s_out, ".mamba.out_proj.bias": s_out,
        ".self_attn.q_proj.weight": a_in, ".self_attn.v_proj.weight": a_in,
        ".self_attn.k_proj.weight": a_in * k_mul, ".self_attn.k_proj.bias": k_mul,
        ".self_attn.o_proj.weight": a_out, ".self_attn.o_proj.bias": a_out,
        ".feed_forward.gate_proj.weight": g_mul, ".feed_forward.gate_proj.bias": g_mul,
        ".feed_forward.down_proj.weight": d_mul, ".feed_forward.down_proj.bias": d_mul,
    }
    out = {}
    for k, v in flat.items():
        f = next((f for suf, f in scale.items() if k.endswith(suf)), None)
        out[k] = v if f is None else (v.astype(mx.float32) * f).astype(v.dtype)
    return out


def _falcon_h1_config(hf: dict) -> dict:
    _unsupported(hf, "hidden_act", lambda v: v == "silu")
    _check_time_step_limit(hf)
    D, d_ssm, gn, H = _falcon_dims(hf)
    expand = d_ssm // D
    if expand * D != d_ssm or H * hf["mamba_d_head"] != d_ssm:
        raise ValueError(f"falcon_h1: mamba_d_ssm {d_ssm} must be a multiple of hidden_size {D} and equal "
                         f"mamba_n_heads*mamba_d_head = {H * hf['mamba_d_head']}")
    L = hf["num_hidden_layers"]
    eps = hf.get("rms_norm_eps", 1e-5)
    proj_bias = bool(hf.get("projectors_bias", False))
    if proj_bias != bool(hf.get("mamba_proj_bias", False)):
        raise ValueError("falcon_h1: projectors_bias and mamba_proj_bias must agree")
    if bool(hf.get("attention_bias", False)):
        raise ValueError("falcon_h1: attention_bias is not supported")
    branches = {
        "mamba": {"kind": "mamba2", "d_state": hf["mamba_d_state"], "d_conv": hf.get("mamba_d_conv", 4),
                  "expand": expand, "head_dim": hf["mamba_d_head"], "n_groups": hf.get("mamba_n_groups", 1),
                  "chunk_size": hf.get("mamba_chunk_size", 256), "conv_bias": bool(hf.get("mamba_conv_bias", True)),
                  "bias": proj_bias, "norm_eps": eps, "rms_norm": bool(hf.get("mamba_rms_norm", False)),
                  "norm_before_gate": bool(hf.get("mamba_norm_before_gate", True))},
        "self_attn": {"kind": "attention", **_attention_from_hf(hf)},
    }
    return {"name": "falcon_h1", "vocab_size": hf["vocab_size"], "d_model": D, "layer_types": ["hybrid"] * L,
            "ffn_types": ["mlp"] * L, "mixers": {"hybrid": {"kind": "parallel", "branches": branches}},
            "ffns": {"mlp": {"d_ff": hf["intermediate_size"], "bias": bool(hf.get("mlp_bias", False))}},
            "norm_eps": eps, "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "embedding_multiplier": float(hf.get("embedding_multiplier", 1.0)),
            "logits_scaling": 1.0 / float(hf.get("lm_head_multiplier", 1.0))}


def _falcon_h1_to_hf(cfg) -> dict | None:
    if len(cfg.mixers) != 1 or cfg.mixers[0][1] != "parallel" or set(cfg.ffn_types) != {"mlp"} or len(cfg.ffns) != 1:
        return None
    br = {n: (k, s) for n, k, s in cfg.mixers[0][2].branches}
    if set(br) != {"mamba", "self_attn"} or br["mamba"][0] != "mamba2" or br["self_attn"][0] != "attention":
        return None
    m, a, f = br["mamba"][1], br["self_attn"][1], cfg.ffns[0][2]
    if (a.qkv_bias or a.o_bias or a.qk_norm or a.output_gate or a.scale or not a.rope or a.rope_traditional
            or a.partial_rotary_factor != 1.0 or m.norm_eps != cfg.norm_eps or not f.gated or f.activation != "silu"
            or cfg.residual_multiplier != 1.0):
        return None
    return {"model_type": "falcon_h1", "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layers, "intermediate_size": f.ff, "mlp_bias": f.bias, "hidden_act": "silu",
            "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
            "num_attention_heads": a.n_heads, "num_key_value_heads": a.kv_heads, "head_dim": a.hd,
            "rope_parameters": _rope_parameters(a),
            "mamba_d_state": m.d_state, "mamba_d_conv": m.d_conv, "mamba_expand": m.expand, "mamba_d_ssm": m.d_inner,
            "mamba_n_heads": m.n_heads, "mamba_d_head": m.head_dim, "mamba_n_groups": m.n_groups,
            "mamba_chunk_size": m.chunk_size, "mamba_conv_bias": m.conv_bias, "mamba_proj_bias": m.bias,
            "projectors_bias": m.bias, "mamba_rms_norm": m.rms_norm, "mamba_norm_before_gate": m.norm_before_gate,
            "embedding_multiplier": cfg.embedding_multiplier, "lm_head_multiplier": 1.0 / cfg.logits_scaling}


register_converter(Converter(
    ("falcon_h1",), _falcon_h1_config,
    decoder_rules({}, ffn_norm="pre_ff_layernorm", ffn="feed_forward", final="final_layernorm",
                  extra=(("model.layers.{i}.mamba.", "layers.{i}.mixer.mamba."),
                         ("model.layers.{i}.self_attn.", "layers.{i}.mixer.self_attn."))),
    frozenset({"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "intermediate_size", "hidden_act", "rms_norm_eps", "rope_parameters", "rope_theta",
               "rope_scaling", "attention_bias", "mlp_bias", "projectors_bias", "attention_in_multiplier",
               "attention_out_multiplier", "key_multiplier", "embedding_multiplier", "lm_head_multiplier",
               "mlp_multipliers", "ssm_in_multiplier", "ssm_out_multiplier", "ssm_multipliers", "mamba_chunk_size",
               "mamba_conv_bias", "mamba_d_conv", "mamba_d_head", "mamba_d_ssm", "mamba_d_state", "mamba_expand",
               "mamba_n_groups", "mamba_n_heads", "mamba_norm_before_gate", "mamba_proj_bias", "mamba_rms_norm",
               "time_step_limit", "num_logits_to_keep", "mamba_use_mlp"}),
    _falcon_h1_to_hf, "FalconH1ForCausalLM", drop=(r"rotary_emb\.inv_freq$",), load_hook=_falcon_load))


# -- Zamba2: Mamba-2 stack + shared attention/MLP blocks with per-call LoRA adapters ------------
_Z2_SHARED = re.compile(r"^model\.layers\.(?P<i>\d+)\.shared_transformer\.(?P<rest>.+)$")
_Z2_ADAPTER = re.compile(r"^(?P<part>self_attn\.linear_(?P<qkv>[qkv])_adapter_list|feed_forward\.gate_up_proj_adapter_list)"
                         r"\.(?P<j>\d+)\.(?P<ab>[01])\.weight$")


def _z2_hybrid_ids(hf: dict) -> list[int]:
    ids = hf.get("hybrid_layer_ids")
    if ids is None:
        ids = [i for i, t in enumerate(hf.get("layers_block_type") or []) if t == "hybrid"]
    return list(ids)


def _zamba2_load(flat: dict, hf: dict) -> dict:
    ids = _z2_hybrid_ids(hf)
    n = hf.get("num_mem_blocks", 1)
    owner = {i: j % n for j, i in enumerate(ids)}  # depth -> block index
    first = {b: ids[b] for b in range(min(n, len(ids)))}  # the depth that stores block b's weights
    out = {}
    for k, v in flat.items():
        m = _Z2_SHARED.match(k)
        if not m:
            out[k] = v
            continue
        i, rest = int(m["i"]), m["rest"]
        b = owner.get(i)
        if b is None:
            raise ValueError(f"zamba2: {k} sits at depth {i}, which is not a hybrid layer {ids}")
        if first[b] != i:
            continue  # a tied copy of block b
        a = _Z2_ADAPTER.match(rest)
        if a:
            call = ids[int(a["j"])]
            lr = "lora_A" if a["ab"] == "0" else "lora_B"
            base = f"layers.{call}.shared.adapters."
            if a["qkv"]:
                out[f"{base}attn.{a['qkv']}_proj.{lr}"] = v
            elif lr == "lora_A":
                out[f"{base}mlp.gate_proj.lora_A"] = out[f"{base}mlp.up_proj.lora_A"] = v
            else:
                F = v.shape[0] // 2
                out[f"{base}mlp.gate_proj.lora_B"], out[f"{base}mlp.up_proj.lora_B"] = v[:F], v[F:]
            continue
        blk = f"shared_blocks.{b}."
        if rest == "feed_forward.gate_up_proj.weight":
            F = v.shape[0] // 2
            out[blk + "mlp.gate_proj.weight"], out[blk + "mlp.up_proj.weight"] = v[:F], v[F:]
        elif rest.startswith("feed_forward."):
            out[blk + "mlp." + rest[len("feed_forward."):]] = v
        elif rest.startswith("self_attn."):
            out[blk + "attn." + rest[len("self_attn."):]] = v
        elif rest == "input_layernorm.weight":
            out[blk + "norm.weight"] = v
        elif rest == "pre_ff_layernorm.weight":
            out[blk + "ffn_norm.weight"] = v
        else:
            out[k] = v  # left for the strict check to report
    return out


# Zamba / Zamba2 tensor names: hybrid depths nest the Mamba layer under ``mamba_decoder``; the
# load hooks have already moved the shared blocks (and Zamba2's adapters) to their Alloy names.
_ZAMBA_RENAME = (
    ("model.embed_tokens.", "embed_tokens."),
    ("model.layers.{i}.input_layernorm.", "layers.{i}.norm."),
    ("model.layers.{i}.mamba.", "layers.{i}.mixer."),
    ("model.layers.{i}.mamba_decoder.input_layernorm.", "layers.{i}.norm."),
    ("model.layers.{i}.mamba_decoder.mamba.", "layers.{i}.mixer."),
    ("model.layers.{i}.linear.", "layers.{i}.shared.linear."),
    ("shared_blocks.", "shared_blocks."),
    ("model.final_layernorm.", "norm_f."),
    ("lm_head.", "lm_head."),
)


def _zamba2_save(flat: dict, cfg) -> dict:
    sh = cfg.shared
    calls = sh.calls()
    first = {b: sh.at[b] for b in range(min(sh.n_blocks, len(sh.at)))}
    out = {}
    for k, v in flat.items():
        m = re.match(r"^shared_blocks\.(?P<b>\d+)\.(?P<rest>.+)$", k)
        if m:
            pre = f"model.layers.{first[int(m['b'])]}.shared_transformer."
            rest = m["rest"]
            if rest == "mlp.gate_proj.weight":
                out[pre + "feed_forward.gate_up_proj.weight"] = mx.concatenate(
                    [v, flat[k.replace("gate_proj", "up_proj")]], axis=0)
            elif rest == "mlp.up_proj.weight":
                continue
            elif rest.startswith("mlp."):
                out[pre + "feed_forward." + rest[4:]] = v
            elif rest.startswith("attn."):
                out[pre + "self_attn." + rest[5:]] = v
            else:
                out[pre + {"norm.weight": "input_layernorm.weight", "ffn_norm.weight": "pre_ff_layernorm.weight"}[rest]] = v
            continue
        m = re.match(r"^layers\.(?P<i>\d+)\.shared\.adapters\.(?P<part>attn|mlp)\.(?P<name>\w+)\.(?P<lr>lora_[AB])$", k)
        if m:
            i = int(m["i"])
            j, b = calls[i]
            pre = f"model.layers.{first[b]}.shared_transformer."
            ab = "0" if m["lr"] == "lora_A" else "1"
            if m["part"] == "attn":
                out[f"{pre}self_attn.linear_{m['name'][0]}_adapter_list.{j}.{ab}.weight"] = v
            elif m["name"] == "gate_proj":
                val = v if ab == "0" else mx.concatenate([v, flat[k.replace("gate_proj", "up_proj")]], axis=0)
                out[f"{pre}feed_forward.gate_up_proj_adapter_list.{j}.{ab}.weight"] = val
            continue
        m = re.match(r"^model\.layers\.(?P<i>\d+)\.(?P<rest>input_layernorm\..+|mamba\..+)$", k)
        if m and int(m["i"]) in calls:
            out[f"model.layers.{m['i']}.mamba_decoder.{m['rest']}"] = v
            continue
        out[k] = v
    return out


def _zamba2_config(hf: dict) -> dict:
    L, D = hf["num_hidden_layers"], hf["hidden_size"]
    types = hf.get("layers_block_type") or ["mamba"] * L
    types = ["mamba" if t in ("mamba", "linear_attention") else t for t in types]
    bad = sorted(set(types) - {"mamba", "hybrid"})
    if bad or len(types) != L:
        raise ValueError(f"zamba2: layers_block_type must be {L} of mamba/hybrid, got {hf.get('layers_block_type')!r}")
    ids = _z2_hybrid_ids(hf)
    if ids != [i for i, t in enumerate(types) if t == "hybrid"]:
        raise ValueError(f"zamba2: hybrid_layer_ids {ids} disagree with layers_block_type")
    if hf.get("use_long_context"):
        raise ValueError("zamba2: use_long_context (rescaled RoPE) is not supported")
    act = hf.get("hidden_act", "gelu")
    if act not in ("gelu", "silu", "gelu_pytorch_tanh"):
        raise ValueError(f"zamba2: hidden_act {act!r} is not supported")
    heads = hf["num_attention_heads"]
    att_hidden = hf.get("attention_hidden_size") or 2 * D
    if att_hidden != 2 * D:
        raise ValueError(f"zamba2: attention_hidden_size {att_hidden} must be 2 * hidden_size")
    hd = hf.get("attention_head_dim") or att_hidden // heads
    expand = hf.get("mamba_expand", 2)
    if hf["n_mamba_heads"] * hf["mamba_headdim"] != expand * D:
        raise ValueError("zamba2: n_mamba_heads * mamba_headdim must equal mamba_expand * hidden_size")
    eps = hf.get("rms_norm_eps", 1e-5)
    adapt = (("q_proj", "k_proj", "v_proj") if hf.get("use_shared_attention_adapter") else ()) + ("gate_proj", "up_proj")
    bias = bool(hf.get("add_bias_linear", False))
    return {
        "name": "zamba2", "vocab_size": hf["vocab_size"], "d_model": D,
        "layer_types": ["mamba2"] * L, "ffn_types": ["none"] * L,
        "mixers": {"mamba2": {"d_state": hf["mamba_d_state"], "d_conv": hf.get("mamba_d_conv", 4), "expand": expand,
                              "head_dim": hf["mamba_headdim"], "n_groups": hf.get("mamba_ngroups", 1),
                              "chunk_size": hf.get("chunk_size", 256), "conv_bias": bool(hf.get("use_conv_bias", True)),
                              "bias": bias, "norm_eps": 1e-5,
                              "dt_clamp_min": float(hf.get("time_step_min", 0.001))}},
        "shared": {"n_blocks": hf.get("num_mem_blocks", 1), "at": ids,
                   "attention": {"n_heads": heads, "n_kv_heads": hf.get("num_key_value_heads") or heads,
                                 "head_dim": hd, "rope": bool(hf.get("use_mem_rope", False)),
                                 "rope_theta": _rope_theta(hf), "scale": (hd / 2) ** -0.5},
                   "mlp": {"d_ff": hf["intermediate_size"], "bias": bias,
                           "activation": {"gelu": "gelu", "silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}[act]},
                   "adapter_rank": hf.get("adapter_rank", 128), "adapt": list(adapt), "norm_eps": eps},
        "norm_eps": eps, "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
    }


def _zamba2_to_hf(cfg) -> dict | None:
    sh = cfg.shared
    if sh is None or set(cfg.layer_types) != {"mamba2"} or set(cfg.ffn_types) != {"none"} or len(cfg.mixers) != 1:
        return None
    m, a, f = cfg.mixers[0][2], sh.attention, sh.mlp
    if set(sh.adapt) not in ({"gate_proj", "up_proj"}, {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}):
        return None
    if (not sh.adapter_rank or a.qk_norm or a.qkv_bias or a.o_bias or a.output_gate or a.scale != (a.hd / 2) ** -0.5
            or not f.gated or f.activation not in ("gelu", "silu", "gelu_tanh") or m.norm_eps != 1e-5
            or m.rms_norm is False or m.norm_before_gate or m.dt_clamp_max or m.bias != f.bias):
        return None
    return {"model_type": "zamba2", "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layers, "intermediate_size": f.ff, "rms_norm_eps": sh.norm_eps,
            "hidden_act": {"gelu": "gelu", "silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}[f.activation],
            "layers_block_type": ["hybrid" if i in sh.at else "mamba" for i in range(cfg.n_layers)],
            "hybrid_layer_ids": list(sh.at), "num_mem_blocks": sh.n_blocks, "adapter_rank": sh.adapter_rank,
            "use_shared_attention_adapter": "q_proj" in sh.adapt, "num_attention_heads": a.n_heads,
            "num_key_value_heads": a.kv_heads, "attention_head_dim": a.hd, "attention_hidden_size": 2 * cfg.d_model,
            "use_mem_rope": a.rope, "rope_parameters": _rope_parameters(a),
            "mamba_d_state": m.d_state, "mamba_d_conv": m.d_conv, "mamba_expand": m.expand,
            "mamba_headdim": m.head_dim, "n_mamba_heads": m.n_heads, "mamba_ngroups": m.n_groups,
            "chunk_size": m.chunk_size, "use_conv_bias": m.conv_bias, "add_bias_linear": m.bias,
            "time_step_min": m.dt_clamp_min, "tie_word_embeddings": cfg.tie_embeddings}


register_converter(Converter(
    ("zamba2",), _zamba2_config,
    _ZAMBA_RENAME + (("layers.{i}.shared.adapters.", "layers.{i}.shared.adapters."),),
    frozenset({"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "intermediate_size", "hidden_act", "rms_norm_eps", "rope_parameters", "rope_theta", "rope_scaling",
               "layers_block_type", "hybrid_layer_ids", "num_mem_blocks", "adapter_rank", "use_shared_attention_adapter",
               "use_shared_mlp_adapter", "attention_head_dim", "attention_hidden_size", "kv_channels",
               "num_query_groups", "use_mem_rope", "use_long_context", "mamba_d_state", "mamba_d_conv", "mamba_expand",
               "mamba_headdim", "n_mamba_heads", "mamba_ngroups", "chunk_size", "use_conv_bias", "add_bias_linear",
               "use_mamba_kernels", "use_mem_eff_path", "num_logits_to_keep", "time_step_limit"}),
    _zamba2_to_hf, "Zamba2ForCausalLM", drop=(r"rotary_emb\.inv_freq$",),
    load_hook=_zamba2_load, save_hook=_zamba2_save))


# -- Zamba (v1): multi-head Mamba-1 stack + one shared attention/MLP block -----------------------
def _zamba_load(flat: dict, hf: dict) -> dict:
    ids = [i for i, t in enumerate(_zamba_types(hf)) if t == "hybrid"]
    out = {}
    for k, v in flat.items():
        m = re.match(r"^model\.layers\.(?P<i>\d+)\.shared_transf\.(?P<rest>.+)$", k)
        if m:
            if not ids or int(m["i"]) != ids[0]:
                continue  # tied copies of the one shared block
            rest = m["rest"]
            rest = {"input_layernorm.weight": "norm.weight", "pre_ff_layernorm.weight": "ffn_norm.weight"}.get(rest, rest)
            out["shared_blocks.0." + rest.replace("self_attn.", "attn.").replace("feed_forward.", "mlp.")] = v
            continue
        if k.endswith(".in_proj.weight") and ".mamba" in k:  # rows interleave [x_c, z_c] per channel
            v = mx.concatenate([v[0::2], v[1::2]], axis=0)
        elif k.endswith(("mamba.A_log", "mamba.D", "mamba.dt_proj_bias")):
            v = v.reshape(-1, *v.shape[2:])  # (H, dh, ...) -> (H*dh, ...)
        for a, b in (("x_proj_weight", "x_proj.weight"), ("dt_proj_weight", "dt_proj.weight"),
                     ("dt_proj_bias", "dt_proj.bias")):
            if k.endswith(a):
                k = k[: -len(a)] + b
        out[k] = v
    return out


def _zamba_save(flat: dict, cfg) -> dict:
    m = cfg.mixers[0][2]
    H, first = m.n_heads, cfg.shared.at[0]
    out = {}
    for k, v in flat.items():
        s = re.match(r"^shared_blocks\.0\.(?P<rest>.+)$", k)
        if s:
            rest = {"norm.weight": "input_layernorm.weight", "ffn_norm.weight": "pre_ff_layernorm.weight"}.get(
                s["rest"], s["rest"])
            rest = rest.replace("attn.", "self_attn.", 1) if rest.startswith("attn.") else \
                rest.replace("mlp.", "feed_forward.", 1) if rest.startswith("mlp.") else rest
            out[f"model.layers.{first}.shared_transf.{rest}"] = v
            continue
        d = re.match(r"^model\.layers\.(?P<i>\d+)\.(?P<rest>input_layernorm\..+|mamba\..+)$", k)
        if d and int(d["i"]) in cfg.shared.at:
            k = f"model.layers.{d['i']}.mamba_decoder.{d['rest']}"
        if k.endswith(".in_proj.weight"):
            xr, zr = mx.split(v, 2, axis=0)
            v = mx.stack([xr, zr], axis=1).reshape(v.shape)
        elif k.endswith(("mamba.A_log", "mamba.D", "mamba.dt_proj.bias")):
            v = v.reshape(H, -1, *v.shape[1:])
        for b, a in (("x_proj.weight", "x_proj_weight"), ("dt_proj.weight", "dt_proj_weight"),
                     ("dt_proj.bias", "dt_proj_bias")):
            if k.endswith(b):
                k = k[: -len(b)] + a
        out[k] = v
    return out


def _zamba_types(hf: dict) -> list[str]:
    L = hf["num_hidden_layers"]
    types = hf.get("layers_block_type")
    if types is None:
        p, o = hf.get("attn_layer_period", 6), hf.get("attn_layer_offset", 4)
        types = ["hybrid" if i % p == o else "mamba" for i in range(L)]
    types = ["mamba" if t in ("mamba", "linear_attention") else t for t in types]
    bad = sorted(set(types) - {"mamba", "hybrid"})
    if bad or len(types) != L:
        raise ValueError(f"zamba: layers_block_type must be {L} of mamba/hybrid, got {hf.get('layers_block_type')!r}")
    return types


def _zamba_config(hf: dict) -> dict:
    types = _zamba_types(hf)
    L, D = len(types), hf["hidden_size"]
    _unsupported(hf, "hidden_mamba_act", lambda v: v == "silu")
    act = hf.get("hidden_act", "gelu")
    if act not in ("gelu", "silu"):
        raise ValueError(f"zamba: hidden_act {act!r} is not supported")
    heads = hf["num_attention_heads"]
    att_hidden = hf.get("attention_hidden_size") or 2 * D
    if att_hidden != 2 * D:
        raise ValueError(f"zamba: attention_hidden_size {att_hidden} must be 2 * hidden_size")
    hd = hf.get("attention_head_dim") or att_hidden // heads
    rank = hf.get("mamba_dt_rank", "auto")
    eps = hf.get("rms_norm_eps", 1e-5)
    return {
        "name": "zamba", "vocab_size": hf["vocab_size"], "d_model": D,
        "layer_types": ["mamba1"] * L, "ffn_types": ["none"] * L,
        "mixers": {"mamba1": {"d_state": hf.get("mamba_d_state", 16), "d_conv": hf.get("mamba_d_conv", 4),
                              "expand": hf.get("mamba_expand", 2), "dt_rank": -(-D // 16) if rank == "auto" else int(rank),
                              "conv_bias": bool(hf.get("mamba_conv_bias", True)),
                              "bias": bool(hf.get("mamba_proj_bias", False)), "n_heads": hf.get("n_mamba_heads", 1)}},
        "shared": {"n_blocks": 1, "at": [i for i, t in enumerate(types) if t == "hybrid"],
                   "attention": {"n_heads": heads, "n_kv_heads": hf.get("num_key_value_heads") or heads,
                                 "head_dim": hd, "rope": False, "scale": (hd / 2) ** -0.5},
                   "mlp": {"d_ff": hf["intermediate_size"], "activation": act}, "adapter_rank": 0, "adapt": [],
                   "norm_eps": eps},
        "norm_eps": eps, "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
    }


def _zamba_to_hf(cfg) -> dict | None:
    sh = cfg.shared
    if sh is None or sh.n_blocks != 1 or sh.adapter_rank or set(cfg.layer_types) != {"mamba1"} \
            or set(cfg.ffn_types) != {"none"} or len(cfg.mixers) != 1 or not sh.at:
        return None
    m, a, f = cfg.mixers[0][2], sh.attention, sh.mlp
    if (m.dt_bc_norm or a.rope or a.qk_norm or a.qkv_bias or a.o_bias or a.output_gate
            or a.scale != (a.hd / 2) ** -0.5 or not f.gated or f.bias or f.activation not in ("gelu", "silu")):
        return None
    return {"model_type": "zamba", "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layers, "intermediate_size": f.ff, "hidden_act": f.activation,
            "hidden_mamba_act": "silu", "rms_norm_eps": sh.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
            "layers_block_type": ["hybrid" if i in sh.at else "mamba" for i in range(cfg.n_layers)],
            "num_attention_heads": a.n_heads, "num_key_value_heads": a.kv_heads, "attention_head_dim": a.hd,
            "attention_hidden_size": 2 * cfg.d_model, "mamba_d_state": m.d_state, "mamba_d_conv": m.d_conv,
            "mamba_expand": m.expand, "mamba_dt_rank": m.rank, "mamba_conv_bias": m.conv_bias,
            "mamba_proj_bias": m.bias, "n_mamba_heads": m.n_heads}


register_converter(Converter(
    ("zamba",), _zamba_config,
    _ZAMBA_RENAME,
    frozenset({"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "intermediate_size", "hidden_act", "hidden_mamba_act", "rms_norm_eps", "layers_block_type",
               "attn_layer_period", "attn_layer_offset", "attention_head_dim", "attention_hidden_size",
               "mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_dt_rank", "mamba_conv_bias", "mamba_proj_bias",
               "n_mamba_heads", "use_mamba_kernels", "num_logits_to_keep"}),
    _zamba_to_hf, "ZambaForCausalLM", load_hook=_zamba_load, save_hook=_zamba_save))


# -- RecurrentGemma (Griffin): RG-LRU recurrent blocks + local MQA attention ---------------------
_RG_NORMS = re.compile(r"(\.temporal_pre_norm|\.channel_pre_norm|^model\.final_norm)\.weight$")


def _rg_shift(flat: dict, delta: float) -> dict:
    return {k: (v.astype(mx.float32) + delta).astype(v.dtype) if _RG_NORMS.search(k) else v for k, v in flat.items()}


def _bf16_round(x: float) -> float:
    """RecurrentGemma keeps its embedding normaliser sqrt(d) as a bfloat16 buffer."""
    return float(mx.array(x, dtype=mx.bfloat16).astype(mx.float32).item())


def _recurrent_gemma_config(hf: dict) -> dict:
    L, D = hf["num_hidden_layers"], hf["hidden_size"]
    blocks = hf.get("block_types") or ["recurrent", "recurrent", "attention"]
    types = [blocks[i % len(blocks)] for i in range(L)]
    bad = sorted(set(types) - {"recurrent", "attention"})
    if bad:
        raise ValueError(f"recurrent_gemma: unsupported block_types {bad}")
    act = hf.get("hidden_activation", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise ValueError(f"recurrent_gemma: hidden_activation {act!r} is not supported")
    heads = hf["num_attention_heads"]
    mixers = {}
    if "recurrent" in types:
        mixers["rglru"] = {"width": hf.get("lru_width") or D, "n_heads": heads,
                           "conv_width": hf.get("conv1d_width", 4)}
    if "attention" in types:
        mixers["sliding_attention"] = _attention_from_hf(
            hf, default_partial=0.5, window=hf["attention_window_size"],
            qkv_bias=bool(hf.get("attention_bias", False)), o_bias=True)
    return {"name": "recurrent_gemma", "vocab_size": hf["vocab_size"], "d_model": D,
            "layer_types": ["rglru" if t == "recurrent" else "sliding_attention" for t in types],
            "ffn_types": ["mlp"] * L, "mixers": mixers,
            "ffns": {"mlp": {"d_ff": hf["intermediate_size"] // 2, "activation": "gelu_tanh", "bias": True}},
            "norm_eps": hf.get("rms_norm_eps", 1e-6), "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
            "embedding_multiplier": _bf16_round(D ** 0.5),
            "logits_soft_cap": float(hf.get("logits_soft_cap") or 0.0)}


def _recurrent_gemma_to_hf(cfg) -> dict | None:
    kinds = [cfg.mixer_kind(i) for i in range(cfg.n_layers)]
    if set(kinds) - {"rglru", "sliding_attention"} or set(cfg.ffn_types) != {"mlp"} or len(cfg.ffns) != 1:
        return None
    if cfg.embedding_multiplier != _bf16_round(cfg.d_model ** 0.5) or cfg.residual_multiplier != 1.0:
        return None
    f = cfg.ffns[0][2]
    if f.activation != "gelu_tanh" or not f.bias or not f.gated:
        return None
    period = next((p for p in range(1, cfg.n_layers + 1)
                   if all(kinds[i] == kinds[i % p] for i in range(cfg.n_layers))), cfg.n_layers)
    hf = {"model_type": "recurrent_gemma", "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
          "num_hidden_layers": cfg.n_layers, "intermediate_size": 2 * f.ff, "hidden_activation": "gelu_pytorch_tanh",
          "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
          "logits_soft_cap": cfg.logits_soft_cap or None,
          "block_types": ["recurrent" if k == "rglru" else "attention" for k in kinds[:period]]}
    for _, kind, s in cfg.mixers:
        if kind == "rglru":
            hf.update({"lru_width": s.w, "conv1d_width": s.conv_width})
            heads = s.n_heads
        else:
            if s.qk_norm or s.output_gate or s.scale or not s.o_bias or not s.rope:
                return None
            hf.update({"num_attention_heads": s.n_heads, "num_key_value_heads": s.kv_heads, "head_dim": s.hd,
                       "attention_window_size": s.window, "attention_bias": s.qkv_bias,
                       "rope_parameters": {**_rope_parameters(s),
                                           "partial_rotary_factor": s.partial_rotary_factor}})
            heads = s.n_heads
    if hf.setdefault("num_attention_heads", heads) != heads:
        return None
    return hf


register_converter(Converter(
    ("recurrent_gemma",), _recurrent_gemma_config,
    (("model.embed_tokens.", "embed_tokens."),
     ("model.layers.{i}.temporal_pre_norm.", "layers.{i}.norm."),
     *((f"model.layers.{{i}}.temporal_block.rg_lru.{n}", f"layers.{{i}}.mixer.{n}", ("rglru",))
       for n in ("recurrent_param", "input_gate_weight", "input_gate_bias", "recurrent_gate_weight",
                 "recurrent_gate_bias")),
     ("model.layers.{i}.temporal_block.", "layers.{i}.mixer."),
     ("model.layers.{i}.channel_pre_norm.", "layers.{i}.ffn_norm."),
     ("model.layers.{i}.mlp_block.", "layers.{i}.ffn."),
     ("model.final_norm.", "norm_f."),
     ("lm_head.", "lm_head.")),
    frozenset({"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "intermediate_size", "hidden_activation", "rms_norm_eps", "rope_parameters",
               "rope_theta", "rope_scaling", "partial_rotary_factor", "attention_bias", "attention_window_size",
               "block_types", "conv1d_width", "lru_width", "logits_soft_cap", "w_init_variance_scale",
               "final_w_init_variance_scale", "embeddings_scale_by_sqrt_dim"}),
    _recurrent_gemma_to_hf, "RecurrentGemmaForCausalLM", drop=(r"rotary_emb\.inv_freq$",),
    load_hook=lambda flat, hf: _rg_shift(flat, 1.0), save_hook=lambda flat, cfg: _rg_shift(flat, -1.0)))


# -- MiniMax (MiniMax-Text-01 style): lightning attention + softmax attention, MoE, scaled residuals -
def _minimax_config(hf: dict) -> dict:
    _unsupported(hf, "hidden_act", lambda v: v == "silu")
    _unsupported(hf, "sliding_window", lambda v: v is None)
    L, D = hf["num_hidden_layers"], hf["hidden_size"]
    types = hf.get("layer_types") or ["full_attention"] * L
    bad = sorted(set(types) - {"linear_attention", "full_attention"})
    if bad or len(types) != L:
        raise ValueError(f"minimax: layer_types must be {L} of linear_attention/full_attention, got {types!r}")
    heads = hf["num_attention_heads"]
    hd = hf.get("head_dim") or D // heads
    mixers, scales = {}, {}
    for i, t in enumerate(types):
        if t == "linear_attention":  # each lightning layer has its own decays: one name per depth
            mixers[f"lightning_{i}"] = {"kind": "lightning", "n_heads": heads, "head_dim": hd,
                                        "chunk_size": hf.get("block_size", 256)}
            scales[f"lightning_{i}"] = [hf.get("linear_attn_alpha_factor", 1), hf.get("linear_attn_beta_factor", 1)]
    if "full_attention" in types:
        mixers["attention"] = _attention_from_hf(hf)
        scales["attention"] = [hf.get("full_attn_alpha_factor", 1), hf.get("full_attn_beta_factor", 1)]
    scales["ffn"] = [hf.get("mlp_alpha_factor", 1), hf.get("mlp_beta_factor", 1)]
    return {"name": "minimax", "vocab_size": hf["vocab_size"], "d_model": D,
            "layer_types": [f"lightning_{i}" if t == "linear_attention" else "attention" for i, t in enumerate(types)],
            "ffn_types": ["moe"] * L, "mixers": mixers,
            "ffns": {"moe": {"n_experts": hf["num_local_experts"], "top_k": hf["num_experts_per_tok"],
                             "d_ff": hf["intermediate_size"], "norm_topk_prob": True}},
            "norm_eps": hf.get("rms_norm_eps", 1e-5), "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "block_style": "norm_residual", "residual_scales": scales}


def _minimax_load(flat: dict, hf: dict) -> dict:
    out = {}
    for k, v in stack_experts(flat).items():
        if re.search(r"\.self_attn\.(query_decay|key_decay|diagonal_decay)$", k):
            continue  # derived from slope_rate
        if k.endswith(".self_attn.slope_rate"):
            v = v.reshape(-1).astype(mx.float32)
        out[k] = v
    return out


def _minimax_save(flat: dict, cfg) -> dict:
    out = {}
    for k, v in flat.items():
        if k.endswith(".slope_rate"):
            v = v.reshape(-1, 1, 1)
        out[k] = v
    return unstack_experts(out)


def _minimax_to_hf(cfg) -> dict | None:
    if cfg.block_style != "norm_residual" or set(cfg.ffn_types) != {"moe"} or len(cfg.ffns) != 1:
        return None
    kinds = [cfg.mixer_kind(i) for i in range(cfg.n_layers)]
    if set(kinds) - {"lightning", "attention"}:
        return None
    scales = dict(cfg.residual_scales)
    moe = cfg.ffns[0][2]
    if not moe.norm_topk_prob or moe.scoring != "softmax" or moe.shared_d_ff or moe.router_bias or not moe.gated:
        return None
    light = [cfg.mixer(i)[1] for i in range(cfg.n_layers) if kinds[i] == "lightning"]
    lsc = {tuple(scales[cfg.layer_types[i]]) for i in range(cfg.n_layers) if kinds[i] == "lightning"}
    if len(lsc) > 1 or len({(s.n_heads, s.hd, s.chunk_size) for s in light}) > 1:
        return None
    a = next((s for _, k, s in cfg.mixers if k == "attention"), None)
    if a is not None and (a.qk_norm or a.qkv_bias or a.o_bias or a.output_gate or a.scale or not a.rope
                          or a.partial_rotary_factor != 1.0):
        return None
    ref = light[0] if light else a
    hf = {"model_type": "minimax", "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
          "num_hidden_layers": cfg.n_layers, "intermediate_size": moe.ff, "hidden_act": "silu",
          "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
          "layer_types": ["linear_attention" if k == "lightning" else "full_attention" for k in kinds],
          "num_local_experts": moe.n_experts, "num_experts_per_tok": moe.top_k,
          "num_attention_heads": ref.n_heads, "head_dim": ref.hd,
          "mlp_alpha_factor": scales["ffn"][0], "mlp_beta_factor": scales["ffn"][1]}
    if light:
        (la, lb), = lsc
        hf.update({"block_size": light[0].chunk_size, "linear_attn_alpha_factor": la, "linear_attn_beta_factor": lb})
    if a is not None:
        if a.n_heads != ref.n_heads or a.hd != ref.hd:
            return None
        hf.update({"num_key_value_heads": a.kv_heads, "rope_parameters": _rope_parameters(a),
                   "full_attn_alpha_factor": scales["attention"][0], "full_attn_beta_factor": scales["attention"][1]})
    return hf


register_converter(Converter(
    ("minimax",), _minimax_config,
    decoder_rules({"self_attn": None}, ffn="block_sparse_moe",
                  extra=(("model.layers.{i}.block_sparse_moe.gate.", "layers.{i}.ffn.router."),
                         *((f"model.layers.{{i}}.block_sparse_moe.experts.{a}.", f"layers.{{i}}.ffn.experts.{b}.")
                           for a, b in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))))),
    frozenset({"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "intermediate_size", "hidden_act", "rms_norm_eps", "rope_parameters", "rope_theta",
               "rope_scaling", "partial_rotary_factor", "layer_types", "block_size", "sliding_window",
               "full_attn_alpha_factor", "full_attn_beta_factor", "linear_attn_alpha_factor",
               "linear_attn_beta_factor", "mlp_alpha_factor", "mlp_beta_factor", "num_local_experts",
               "num_experts_per_tok", "router_aux_loss_coef", "router_jitter_noise", "output_router_logits"}),
    _minimax_to_hf, "MiniMaxForCausalLM", drop=(r"rotary_emb\.inv_freq$",),
    load_hook=_minimax_load, save_hook=_minimax_save))


# -- Kimi-Linear: Kimi Delta Attention layers + DeepSeek-style MoE (MLA layers not yet) ----------
_KDA_MOVED = ("A_log", "dt_bias", "f_a_proj.weight", "f_b_proj.weight")


def _kimi_load(flat: dict, hf: dict) -> dict:
    out = {}
    for k, v in stack_experts(flat).items():
        m = re.match(r"^(?P<pre>model\.layers\.\d+\.self_attn\.)(?P<rest>.+)$", k)
        if not m:
            out[k] = v
            continue
        pre, rest = m["pre"], m["rest"]
        if rest in ("k_conv1d.weight", "v_conv1d.weight"):
            continue  # joined with q_conv1d below
        if rest == "q_conv1d.weight":
            out[pre + "conv1d.weight"] = mx.concatenate(
                [v, flat[pre + "k_conv1d.weight"], flat[pre + "v_conv1d.weight"]], axis=0)
        elif rest in _KDA_MOVED:
            out[pre + "forget_gate." + rest] = v.reshape(-1) if rest == "A_log" else v
        else:
            out[k] = v
    return out


def _kimi_save(flat: dict, cfg) -> dict:
    out = {}
    for k, v in flat.items():
        m = re.match(r"^(?P<pre>model\.layers\.\d+\.self_attn\.)(?P<rest>.+)$", k)
        if m and m["rest"] == "conv1d.weight":
            for name, part in zip(("q", "k", "v"), mx.split(v, 3, axis=0)):
                out[m["pre"] + f"{name}_conv1d.weight"] = part
        elif m and m["rest"].startswith("forget_gate."):
            rest = m["rest"][len("forget_gate."):]
            out[m["pre"] + rest] = v.reshape(1, 1, -1, 1) if rest == "A_log" else v
        else:
            out[k] = v
    return unstack_experts(out)


def _kimi_config(hf: dict) -> dict:
    _unsupported(hf, "hidden_act", lambda v: v == "silu")
    L, D = hf["num_hidden_layers"], hf["hidden_size"]
    types = hf.get("layer_types") or ["linear_attention"] * L
    if set(types) - {"linear_attention", "full_attention"} or len(types) != L:
        raise ValueError(f"kimi_linear: layer_types must be {L} of linear_attention/full_attention, got {types!r}")
    mlp_types = hf.get("mlp_layer_types") or ["dense"] * L
    if set(mlp_types) - {"dense", "sparse"} or len(mlp_types) != L:
        raise ValueError(f"kimi_linear: mlp_layer_types must be {L} of dense/sparse, got {mlp_types!r}")
    ffns = {}
    if "dense" in mlp_types:
        ffns["mlp"] = {"d_ff": hf["intermediate_size"]}
    if "sparse" in mlp_types:
        ffns["moe"] = {"n_experts": hf["num_experts"], "top_k": hf["num_experts_per_token"],
                       "d_ff": hf["moe_intermediate_size"], "scoring": "sigmoid", "router_bias": True,
                       "norm_topk_prob": bool(hf.get("moe_renormalize", True)),
                       "routed_scaling_factor": float(hf.get("routed_scaling_factor", 1.0)),
                       "shared_d_ff": hf["moe_intermediate_size"] * hf.get("num_shared_experts", 0),
                       "n_group": hf.get("num_expert_group", 1), "topk_group": hf.get("topk_group", 1)}
    mixers = {}
    if "linear_attention" in types:
        mixers["kda"] = {"n_heads": hf["linear_num_heads"], "head_dim": hf["linear_head_dim"],
                         "d_conv": hf.get("linear_conv_kernel_dim", 4), "norm_eps": hf.get("rms_norm_eps", 1e-5)}
    if "full_attention" in types:  # multi-head latent attention without positions (NoPE)
        _rope_theta(hf)
        mixers["mla"] = {"n_heads": hf["num_attention_heads"], "q_lora_rank": hf.get("q_lora_rank") or 0,
                         "kv_lora_rank": hf["kv_lora_rank"], "qk_nope_head_dim": hf["qk_nope_head_dim"],
                         "qk_rope_head_dim": hf["qk_rope_head_dim"], "v_head_dim": hf["v_head_dim"],
                         "rope": False, "bias": bool(hf.get("attention_bias", False))}
    return {"name": "kimi_linear", "vocab_size": hf["vocab_size"], "d_model": D,
            "layer_types": ["kda" if t == "linear_attention" else "mla" for t in types],
            "ffn_types": ["moe" if t == "sparse" else "mlp" for t in mlp_types],
            "mixers": mixers,
            "ffns": ffns, "norm_eps": hf.get("rms_norm_eps", 1e-5),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False))}


def _kimi_to_hf(cfg) -> dict | None:
    kinds = [cfg.mixer_kind(i) for i in range(cfg.n_layers)]
    if set(kinds) - {"kda", "mla"} or "kda" not in kinds or len(cfg.mixers) > 2:
        return None
    k = next(s for _, kind, s in cfg.mixers if kind == "kda")
    a = next((s for _, kind, s in cfg.mixers if kind == "mla"), None)
    if k.norm_eps != cfg.norm_eps or (a is not None and (a.rope or a.norm_eps != 1e-6)):
        return None
    fk = [cfg.ffn_kind(i) for i in range(cfg.n_layers)]
    if set(fk) - {"mlp", "moe"}:
        return None
    hf = {"model_type": "kimi_linear", "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
          "num_hidden_layers": cfg.n_layers, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
          "tie_word_embeddings": cfg.tie_embeddings,
          "layer_types": ["linear_attention" if t == "kda" else "full_attention" for t in kinds],
          "mlp_layer_types": ["sparse" if f == "moe" else "dense" for f in fk],
          "linear_num_heads": k.n_heads, "linear_head_dim": k.head_dim, "linear_conv_kernel_dim": k.d_conv,
          # the class defaults name Kimi's 163k-token vocabulary; Alloy keeps no special-token ids
          "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
    if a is not None:
        hf.update({"num_attention_heads": a.n_heads, "num_key_value_heads": a.n_heads,
                   "q_lora_rank": a.q_lora_rank or None, "kv_lora_rank": a.kv_lora_rank,
                   "qk_nope_head_dim": a.qk_nope_head_dim, "qk_rope_head_dim": a.qk_rope_head_dim,
                   "qk_head_dim": a.qk_head_dim, "v_head_dim": a.v_head_dim, "attention_bias": a.bias})
    for _, kind, s in cfg.ffns:
        if kind == "mlp":
            if not s.gated or s.activation != "silu" or s.bias:
                return None
            hf["intermediate_size"] = s.ff
        else:
            if (s.scoring != "sigmoid" or not s.router_bias or s.shared_gate or not s.gated
                    or (s.shared_d_ff and s.shared_d_ff % s.ff)):
                return None
            hf.update({"num_experts": s.n_experts, "num_experts_per_token": s.top_k, "moe_intermediate_size": s.ff,
                       "moe_renormalize": s.norm_topk_prob, "routed_scaling_factor": s.routed_scaling_factor,
                       "num_shared_experts": s.shared_d_ff // s.ff, "num_expert_group": s.n_group,
                       "topk_group": s.topk_group})
    hf.setdefault("intermediate_size", cfg.d_model)
    return hf


register_converter(Converter(
    ("kimi_linear",), _kimi_config,
    decoder_rules({"self_attn": None}, ffn="block_sparse_moe",
                  extra=(("model.layers.{i}.mlp.", "layers.{i}.ffn."),
                         ("model.layers.{i}.block_sparse_moe.gate.e_score_correction_bias", "layers.{i}.ffn.router.bias"),
                         ("model.layers.{i}.block_sparse_moe.gate.", "layers.{i}.ffn.router."),
                         ("model.layers.{i}.block_sparse_moe.shared_experts.", "layers.{i}.ffn.shared_expert."),
                         *((f"model.layers.{{i}}.block_sparse_moe.experts.{a}.", f"layers.{{i}}.ffn.experts.{b}.")
                           for a, b in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))))),
    frozenset({"vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "hidden_act", "rms_norm_eps",
               "layer_types", "mlp_layer_types", "linear_num_heads", "linear_head_dim", "linear_conv_kernel_dim",
               "num_experts", "num_experts_per_token", "moe_intermediate_size", "moe_renormalize",
               "routed_scaling_factor", "num_shared_experts", "num_expert_group", "topk_group",
               "output_router_logits", "model_max_length", "pretraining_tp",
               "num_attention_heads", "num_key_value_heads", "head_dim", "kv_lora_rank", "q_lora_rank",
               "qk_head_dim", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "attention_bias",
               "rope_parameters", "rope_theta", "rope_scaling"}),
    _kimi_to_hf, "KimiLinearForCausalLM", load_hook=_kimi_load, save_hook=_kimi_save))


# -- DeepSeek-V4: sliding / HCA / CSA attention, hash-routed and routed MoE, hyper-connections ------
_DSV4_ATTN = {"sliding_attention": "dsv4_sliding", "heavily_compressed_attention": "hca",
              "compressed_sparse_attention": "csa"}
_DSV4_LEGACY_RATIO = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
_DSV4_ROPE_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor", "original_max_position_embeddings",
                   "beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate"}


def _dsv4_rope(hf: dict, label: str, theta: float) -> dict:
    """Alloy rope settings from one of DeepSeek-V4's rope_parameters entries ("main" / "compress").
    YaRN is supported as DeepSeek-V4 applies it (frequencies only: attention_factor 1)."""
    rp = hf.get("rope_parameters") or {}
    nested = isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict)
    if nested:
        sub = dict(rp[label])
    else:  # a flat dict describes the compressed branches' scaling; the sliding layers use plain RoPE
        sub = {k: v for k, v in rp.items() if k not in ("main", "compress")} if label == "compress" else {}
    unknown = sorted(set(sub) - _DSV4_ROPE_KEYS)
    if unknown:
        raise ValueError(f"deepseek_v4: rope_parameters.{label} field(s) {unknown} are not understood")
    rtype = sub.get("rope_type", sub.get("type", "default"))
    out = {"rope_theta": float(sub.get("rope_theta", theta))}
    if rtype == "default":
        return out
    if rtype != "yarn":
        raise ValueError(f"deepseek_v4: rope_parameters.{label}.rope_type {rtype!r} is not supported "
                         "(default and yarn are)")
    af = sub.get("attention_factor", 1.0 if label == "compress" else None)
    if af != 1.0:
        raise ValueError(f"deepseek_v4: rope_parameters.{label}.attention_factor={af!r}: only 1.0 (no cos/sin "
                         "scaling, as DeepSeek-V4's compressed branches use it) is supported")
    factor = sub.get("factor")
    if factor is None:
        factor = hf.get("max_position_embeddings", 1048576) / sub["original_max_position_embeddings"]
    return {**out, "rope_type": "yarn", "rope_factor": float(factor),
            "rope_original_max_position": int(sub["original_max_position_embeddings"]),
            "rope_beta_fast": float(sub.get("beta_fast") or 32), "rope_beta_slow": float(sub.get("beta_slow") or 1)}


def _dsv4_config(hf: dict) -> dict:
    _unsupported(hf, "hidden_act", lambda v: v == "silu")
    _unsupported(hf, "num_key_value_heads", lambda v: v == 1)  # one shared key/value head
    _unsupported(hf, "n_shared_experts", lambda v: v == 1)  # the reference builds exactly one
    _unsupported(hf, "norm_topk_prob", lambda v: v is True)  # the reference always renormalises
    _unsupported(hf, "mlp_bias", lambda v: v is False)
    _unsupported(hf, "scoring_func", lambda v: v in ("sqrtsoftplus", "softmax", "sigmoid"))
    _unsupported(hf, "quantization_config", lambda v: False)
    L, D = hf["num_hidden_layers"], hf["hidden_size"]
    types = hf.get("layer_types")
    if types is None and hf.get("compress_ratios") is not None:
        types = [_DSV4_LEGACY_RATIO.get(r, r) for r in hf["compress_ratios"]]
    if types is None:
        types = (["heavily_compressed_attention"] * min(L, 2)
                 + ["compressed_sparse_attention" if i % 2 else "heavily_compressed_attention" for i in range(max(L - 2, 0))])
    types = list(types)[:L]
    if len(types) != L or set(types) - set(_DSV4_ATTN):
        raise ValueError(f"deepseek_v4: layer_types must be {L} of {sorted(_DSV4_ATTN)}, got {types!r}")
    mlp = hf.get("mlp_layer_types")
    if mlp is None:
        n_hash = hf.get("num_hash_layers", 3)
        mlp = ["hash_moe"] * min(L, n_hash) + ["moe"] * max(0, L - n_hash)
    mlp = list(mlp)[:L]
    if len(mlp) != L or set(mlp) - {"hash_moe", "moe"}:
        raise ValueError(f"deepseek_v4: mlp_layer_types must be {L} of hash_moe/moe, got {mlp!r}")
    rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128, **(hf.get("compress_rates") or {})}
    for legacy, t in (("compress_rate_csa", "compressed_sparse_attention"), ("compress_rate_hca", "heavily_compressed_attention")):
        if hf.get(legacy) is not None:
            rates[t] = hf[legacy]
    bad = sorted(set(rates) - set(_DSV4_ATTN))
    if bad:
        raise ValueError(f"deepseek_v4: compress_rates has unknown layer type(s) {bad}")
    hd = hf.get("head_dim", 512)
    prf = hf.get("partial_rotary_factor")
    rope_dims = int(hd * prf) if prf is not None else (hf.get("qk_rope_head_dim") or hd // 8)
    eps = hf.get("rms_norm_eps", 1e-6)
    common = {"n_heads": hf["num_attention_heads"], "head_dim": hd, "q_lora_rank": hf.get("q_lora_rank", 1024),
              "rope_dims": rope_dims, "window": hf.get("sliding_window", 128), "o_groups": hf.get("o_groups", 8),
              "o_lora_rank": hf.get("o_lora_rank", 1024), "norm_eps": eps}
    main = _dsv4_rope(hf, "main", hf.get("rope_theta", 10000.0))
    comp = _dsv4_rope(hf, "compress", hf.get("compress_rope_theta", 160000.0))
    mixers = {}
    for t in dict.fromkeys(types):
        kind = _DSV4_ATTN[t]
        if kind == "dsv4_sliding":
            mixers[kind] = {**common, **main}
        else:
            mixers[kind] = {**common, **comp, "compress_rate": rates[t]}
        if kind == "csa":
            mixers[kind].update({"index_n_heads": hf.get("index_n_heads", 64), "index_head_dim": hf.get("index_head_dim", 128),
                                 "index_topk": hf.get("index_topk", 512)})
    E, F = hf.get("n_routed_experts", 256), hf.get("moe_intermediate_size", 2048)
    moe = {"n_experts": E, "top_k": hf.get("num_experts_per_tok", 6), "d_ff": F, "shared_d_ff": F,
           "scoring": hf.get("scoring_func", "sqrtsoftplus"), "norm_topk_prob": True,
           "routed_scaling_factor": float(hf.get("routed_scaling_factor", 1.5)),
           "swiglu_limit": float(hf.get("swiglu_limit", 10.0))}
    ffns = {}
    if "hash_moe" in mlp:
        ffns["hash_moe"] = dict(moe)
    if "moe" in mlp:
        ffns["moe"] = {**moe, "router_bias": True}
    return {"name": "deepseek_v4", "vocab_size": hf["vocab_size"], "d_model": D,
            "layer_types": [_DSV4_ATTN[t] for t in types], "ffn_types": mlp, "mixers": mixers, "ffns": ffns,
            "norm_eps": eps, "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "block_style": "hyper",
            "hyper": {"streams": hf.get("hc_mult", 4), "sinkhorn_iters": hf.get("hc_sinkhorn_iters", 20),
                      "eps": float(hf.get("hc_eps", 1e-6))}}


# Tensor names: DeepSeek's own layout (what the Hub checkpoints and transformers' save_pretrained
# write), without the leading "model." that transformers adds to some of them.
_DSV4_INTERNAL = (("embed_tokens.", "embed."), ("lm_head.", "head."), ("hc_head.hc_", "hc_head_"))


def _dsv4_load(flat: dict, hf: dict) -> dict:
    out = {}
    for k, v in flat.items():
        k = k[len("model."):] if k.startswith("model.") else k
        for a, b in _DSV4_INTERNAL:
            k = b + k[len(a):] if k.startswith(a) else k
        out[k] = v.astype(mx.int32) if k.endswith(".tid2eid") else v
    return stack_experts(out)


def _dsv4_save(flat: dict, cfg) -> dict:
    return {k: v.astype(mx.int64) if k.endswith(".tid2eid") else v for k, v in unstack_experts(flat).items()}


_DSV4_RENAME = (
    ("embed.", "embed_tokens."), ("head.", "lm_head."), ("norm.", "norm_f."), ("hc_head_", "hc_head."),
    ("layers.{i}.attn_norm.", "layers.{i}.norm."), ("layers.{i}.ffn_norm.", "layers.{i}.ffn_norm."),
    ("layers.{i}.hc_attn_", "layers.{i}.mixer_hc."), ("layers.{i}.hc_ffn_", "layers.{i}.ffn_hc."),
    ("layers.{i}.attn.attn_sink", "layers.{i}.mixer.sinks"),
    *((f"layers.{{i}}.attn.{a}.", f"layers.{{i}}.mixer.{b}.") for a, b in (
        ("wq_a", "q_a_proj"), ("q_norm", "q_a_norm"), ("wq_b", "q_b_proj"), ("wkv", "kv_proj"), ("norm", "kv_norm"),
        ("wo_a", "o_a_proj"), ("wo_b", "o_b_proj"))),
    *((f"layers.{{i}}.attn.{src}compressor.{a}", f"layers.{{i}}.mixer.compressor.{dst}{b}")
      for src, dst in (("", ""), ("indexer.", "indexer.")) for a, b in (
          ("wkv.", "kv_proj."), ("wgate.", "gate_proj."), ("ape", "position_bias"), ("norm.", "kv_norm."))),
    ("layers.{i}.attn.indexer.wq_b.", "layers.{i}.mixer.compressor.indexer.q_b_proj."),
    ("layers.{i}.attn.indexer.weights_proj.", "layers.{i}.mixer.compressor.indexer.weights_proj."),
    ("layers.{i}.ffn.gate.tid2eid", "layers.{i}.ffn.tid2eid"), ("layers.{i}.ffn.gate.", "layers.{i}.ffn.router."),
    *((f"layers.{{i}}.ffn.{grp}.{a}.", f"layers.{{i}}.ffn.{dst}.{b}.")
      for grp, dst in (("experts", "experts"), ("shared_experts", "shared_expert"))
      for a, b in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj"))),
)


def _dsv4_rope_out(s) -> dict:
    rp = {"rope_type": s.rope_type, "rope_theta": s.rope_theta}
    if s.rope_type == "yarn":
        rp.update({"factor": s.rope_factor, "original_max_position_embeddings": s.rope_original_max_position,
                   "beta_fast": s.rope_beta_fast, "beta_slow": s.rope_beta_slow, "attention_factor": 1.0})
    return rp


def _dsv4_to_hf(cfg) -> dict | None:
    kinds = [cfg.mixer_kind(i) for i in range(cfg.n_layers)]
    fk = [cfg.ffn_kind(i) for i in range(cfg.n_layers)]
    if cfg.block_style != "hyper" or set(kinds) - set(_DSV4_ATTN.values()) or set(fk) - {"moe", "hash_moe"}:
        return None
    if len({n for n in cfg.layer_types}) != len(set(kinds)) or len(cfg.ffns) != len(set(fk)):
        return None  # one settings entry per kind, as the HF config has
    ms = {k: s for _, k, s in cfg.mixers}
    shared_f = ("n_heads", "head_dim", "q_lora_rank", "rope_dims", "window", "o_groups", "o_lora_rank", "norm_eps")
    ref = next(iter(ms.values()))
    if any(getattr(s, f) != getattr(ref, f) for s in ms.values() for f in shared_f) or ref.norm_eps != cfg.norm_eps:
        return None
    comp = [s for k, s in ms.items() if k != "dsv4_sliding"]
    if len({(s.rope_theta, s.rope_type, s.rope_factor, s.rope_original_max_position, s.rope_beta_fast,
             s.rope_beta_slow) for s in comp}) > 1:
        return None
    fs = {k: s for _, k, s in cfg.ffns}
    m0 = next(iter(fs.values()))
    same = ("n_experts", "top_k", "ff", "scoring", "routed_scaling_factor", "swiglu_limit")
    if any(getattr(s, f) != getattr(m0, f) for s in fs.values() for f in same):
        return None
    if any(not s.norm_topk_prob or s.shared_d_ff != s.ff or s.shared_gate or not s.gated or s.activation != "silu"
           or s.n_group != 1 for s in fs.values()) or ("moe" in fs and not fs["moe"].router_bias):
        return None
    hc = dict(cfg.hyper)
    names = {v: k for k, v in _DSV4_ATTN.items()}
    main = _dsv4_rope_out(ms["dsv4_sliding"]) if "dsv4_sliding" in ms else {"rope_type": "default", "rope_theta": 10000.0}
    compress = _dsv4_rope_out(comp[0]) if comp else {"rope_type": "default", "rope_theta": 160000.0}
    prf = ref.rope_dims / ref.head_dim
    hf = {"model_type": "deepseek_v4", "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
          "num_hidden_layers": cfg.n_layers, "num_attention_heads": ref.n_heads, "num_key_value_heads": 1,
          "head_dim": ref.head_dim, "q_lora_rank": ref.q_lora_rank, "partial_rotary_factor": prf,
          "sliding_window": ref.window, "o_groups": ref.o_groups, "o_lora_rank": ref.o_lora_rank,
          "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
          "layer_types": [names[k] for k in kinds], "mlp_layer_types": fk,
          "compress_rates": {names[k]: s.compress_rate for k, s in ms.items() if k != "dsv4_sliding"},
          "rope_theta": main["rope_theta"], "compress_rope_theta": compress["rope_theta"],
          "rope_parameters": {"main": {**main, "partial_rotary_factor": prf},
                              "compress": {**compress, "partial_rotary_factor": prf}},
          "n_routed_experts": m0.n_experts, "num_experts_per_tok": m0.top_k, "moe_intermediate_size": m0.ff,
          "n_shared_experts": 1, "scoring_func": m0.scoring, "norm_topk_prob": True,
          "routed_scaling_factor": m0.routed_scaling_factor, "swiglu_limit": m0.swiglu_limit,
          "hc_mult": hc["streams"], "hc_sinkhorn_iters": hc["sinkhorn_iters"], "hc_eps": hc["eps"]}
    if "csa" in ms:
        c = ms["csa"]
        hf.update({"index_n_heads": c.index_n_heads, "index_head_dim": c.index_head_dim, "index_topk": c.index_topk})
    return hf


register_converter(Converter(
    ("deepseek_v4",), _dsv4_config, _DSV4_RENAME,
    frozenset({"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "q_lora_rank", "partial_rotary_factor", "qk_rope_head_dim", "hidden_act", "rms_norm_eps",
               "layer_types", "compress_ratios", "compress_rates", "compress_rate_csa", "compress_rate_hca",
               "rope_theta", "compress_rope_theta", "rope_parameters", "rope_scaling", "sliding_window",
               "o_groups", "o_lora_rank", "index_n_heads", "index_head_dim", "index_topk",
               "mlp_layer_types", "num_hash_layers", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
               "moe_intermediate_size", "scoring_func", "norm_topk_prob", "routed_scaling_factor", "swiglu_limit",
               "mlp_bias", "attention_bias", "hc_mult", "hc_sinkhorn_iters", "hc_eps",
               # not part of the forward: the multi-token-prediction head (not instantiated by the
               # reference either; its tensors are dropped), router training losses
               "num_nextn_predict_layers", "output_router_logits", "router_aux_loss_coef", "router_jitter_noise",
               "quantization_config"}),
    _dsv4_to_hf, "DeepseekV4ForCausalLM", drop=(r"rotary_emb\.", r"^mtp\."),
    load_hook=_dsv4_load, save_hook=_dsv4_save))

"""Built-in Hugging Face families: attention baselines (Llama, Mistral, Qwen2, Qwen3) and
pure SSM stacks (Mamba, Mamba2). Each maps config fields and tensor names exactly; every HF field
is either used, checked to be a value the math here supports, or listed as irrelevant."""
from __future__ import annotations

import dataclasses
import math

from alloy.convert.registry import Converter, decoder_rules, register_converter


def _unsupported(hf: dict, field: str, ok) -> None:
    v = hf.get(field)
    if v is not None and not ok(v):
        raise ValueError(f"{hf.get('model_type')}: config field {field}={v!r} is not supported")


_ROPE_SCALING_KEYS = {"linear": {"factor"},
                      "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
                      "yarn": {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                               "attention_factor", "mscale", "mscale_all_dim", "truncate"}}


def _rope_fields(hf: dict, scaled: bool = True) -> dict:
    """RoPE settings from ``rope_parameters`` (transformers 5) or ``rope_theta`` / ``rope_scaling``
    (older configs): the base, and for ``linear`` / ``llama3`` scaling its parameters. Any other
    scaling type, or an unknown key, is refused (``scaled=False``: only the default is accepted)."""
    rp = dict(hf.get("rope_parameters") or {})
    rs = dict(hf.get("rope_scaling") or {})
    merged = {**rs, **rp}
    rtype = merged.get("rope_type") or merged.get("type") or "default"
    allowed = {"default"} | (set(_ROPE_SCALING_KEYS) if scaled else set())
    if rtype not in allowed:
        raise ValueError(f"{hf.get('model_type')}: rope_type {rtype!r} is not supported (supported: {sorted(allowed)})")
    extra = sorted(set(merged) - {"rope_theta", "rope_type", "type", "partial_rotary_factor"}
                   - _ROPE_SCALING_KEYS.get(rtype, set()))
    if extra:
        raise ValueError(f"{hf.get('model_type')}: unknown rope_parameters field(s) {extra} for rope_type {rtype!r}")
    out = {"rope_theta": float(merged.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    if rtype == "yarn":
        out.update(_yarn_fields(hf, merged))
        return out
    if rtype != "default":
        out.update({"rope_type": rtype, "rope_factor": float(merged["factor"])})
    if rtype == "llama3":
        out.update({"rope_low_freq_factor": float(merged["low_freq_factor"]),
                    "rope_high_freq_factor": float(merged["high_freq_factor"]),
                    "rope_original_max_position": int(merged["original_max_position_embeddings"])})
    return out


def _yarn_fields(hf: dict, rp: dict) -> dict:
    """YaRN as transformers computes it: frequency ramp between the pairs turning beta_fast and
    beta_slow times over the original context (bounds floored / ceiled unless truncate is false,
    which is refused), and the attention factor (given, or 0.1 * m * ln(factor) + 1 with mscale /
    mscale_all_dim) scaling the rotated q / k dims."""
    if rp.get("truncate", True) is not True:
        raise ValueError(f"{hf.get('model_type')}: rope_parameters truncate=false is not supported")
    orig = int(rp.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
               or hf["max_position_embeddings"])
    factor = rp.get("factor")
    factor = float(factor) if factor is not None else hf["max_position_embeddings"] / orig

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    af = rp.get("attention_factor")
    if af is None:
        m, m_all = rp.get("mscale"), rp.get("mscale_all_dim")
        af = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    return {"rope_type": "yarn", "rope_factor": factor, "rope_original_max_position": orig,
            "rope_beta_fast": float(rp.get("beta_fast") or 32), "rope_beta_slow": float(rp.get("beta_slow") or 1),
            "rope_attention_factor": float(af)}


def _rope_theta(hf: dict) -> float:
    """The RoPE base of a family whose converter supports only the default RoPE."""
    return _rope_fields(hf, scaled=False)["rope_theta"]


def _rope_parameters(a) -> dict:
    """HF ``rope_parameters`` for an Alloy attention settings object (export)."""
    rp = {"rope_theta": a.rope_theta, "rope_type": a.rope_type}
    if a.rope_type != "default":
        rp["factor"] = a.rope_factor
    if a.rope_type == "llama3":
        rp.update({"low_freq_factor": a.rope_low_freq_factor, "high_freq_factor": a.rope_high_freq_factor,
                   "original_max_position_embeddings": a.rope_original_max_position})
    if a.rope_type == "yarn":
        rp.update({"original_max_position_embeddings": a.rope_original_max_position, "beta_fast": a.rope_beta_fast,
                   "beta_slow": a.rope_beta_slow, "attention_factor": a.rope_attention_factor})
    return rp


def _check_time_step_limit(hf: dict) -> None:
    """Mamba-2 dt clamp: only the default (0, inf) — no clamp — is read from time_step_limit."""
    limit = hf.get("time_step_limit", (0.0, float("inf")))
    if tuple(_num(v) for v in limit) != (0.0, float("inf")):
        raise ValueError(f"{hf['model_type']}: time_step_limit {limit!r} is not supported (only (0, inf))")


def _attention_from_hf(hf: dict, *, rope: bool = True, theta: float | None = None,
                       default_partial: float = 1.0, **extra) -> dict:
    """Attention settings from the usual HF fields (heads, KV heads, head_dim, RoPE), plus ``extra``."""
    D, heads = hf["hidden_size"], hf["num_attention_heads"]
    s = {"n_heads": heads, "n_kv_heads": hf.get("num_key_value_heads") or heads,
         "head_dim": hf.get("head_dim") or D // heads}
    if rope:
        rp = hf.get("rope_parameters") or {}
        s.update(_rope_fields(hf) if theta is None else {"rope_theta": theta})
        s["partial_rotary_factor"] = float(rp.get("partial_rotary_factor",
                                                  hf.get("partial_rotary_factor", default_partial)))
    else:
        s["rope"] = False
    return {**s, **extra}


# -- attention baselines --------------------------------------------------------------------------
def _decoder_config(hf: dict, *, qk_norm: bool, qkv_bias: bool, o_bias: bool) -> dict:
    L = hf["num_hidden_layers"]
    D = hf["hidden_size"]
    heads = hf["num_attention_heads"]
    _unsupported(hf, "hidden_act", lambda v: v == "silu")
    _unsupported(hf, "pretraining_tp", lambda v: v == 1)
    attn = {
        "n_heads": heads,
        "n_kv_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": hf.get("head_dim") or D // heads,
        **_rope_fields(hf),
        "partial_rotary_factor": float((hf.get("rope_parameters") or {}).get(
            "partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))),
        "qkv_bias": qkv_bias, "o_bias": o_bias, "qk_norm": qk_norm,
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
    }
    # Which layers slide: Mistral slides everywhere when sliding_window is set; Qwen2/3 name the
    # layer types (or slide from max_window_layers on when use_sliding_window).
    window = hf.get("sliding_window")
    types = hf.get("layer_types")
    if hf.get("model_type") == "mistral":
        slide = [bool(window)] * L
    elif types is not None:
        bad = sorted(set(types) - {"full_attention", "sliding_attention"})
        if bad:
            raise ValueError(f"{hf['model_type']}: unsupported layer_types {bad}")
        if len(types) != L:
            raise ValueError(f"{hf['model_type']}: layer_types has {len(types)} entries, num_hidden_layers is {L}")
        slide = [t == "sliding_attention" for t in types]
    else:
        mwl = hf.get("max_window_layers", L)
        slide = [bool(hf.get("use_sliding_window")) and bool(window) and i >= mwl for i in range(L)]
    if any(slide) and not window:
        raise ValueError(f"{hf['model_type']}: sliding layers requested but sliding_window is {window!r}")
    layer_types = ["sliding_attention" if s else "attention" for s in slide]
    mixers = {}
    if not all(slide):
        mixers["attention"] = dict(attn)
    if any(slide):
        mixers["sliding_attention"] = {**attn, "window": int(window)}
    return {
        "name": hf["model_type"],
        "vocab_size": hf["vocab_size"], "d_model": D,
        "layer_types": layer_types, "ffn_types": ["mlp"] * L,
        "mixers": mixers,
        "ffns": {"mlp": {"d_ff": hf["intermediate_size"], "activation": "silu", "gated": True,
                         "bias": bool(hf.get("mlp_bias", False))}},
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }


_DECODER_RENAME = decoder_rules({"self_attn": None})
_DECODER_FIELDS = frozenset({
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "intermediate_size", "hidden_act", "rms_norm_eps", "rope_parameters", "rope_theta",
    "rope_scaling", "attention_bias", "mlp_bias", "sliding_window", "layer_types", "max_window_layers",
    "use_sliding_window", "partial_rotary_factor",
})


def _decoder_to_hf(model_type: str, qk_norm: bool, qkv_bias: bool | None):
    def to_hf(cfg) -> dict | None:
        kinds = {cfg.mixer_kind(i) for i in range(cfg.n_layers)}
        if not kinds <= {"attention", "sliding_attention"} or set(cfg.ffn_types) != {"mlp"} or len(cfg.ffns) != 1:
            return None
        settings = [cfg.mixer(i)[1] for i in range(cfg.n_layers)]
        a = settings[0]
        mlp = cfg.ffns[0][2]
        if any(_rope_parameters(s) != _rope_parameters(a) or (s.n_heads, s.kv_heads, s.hd, s.qk_norm, s.qkv_bias,
               s.o_bias, s.rope, s.partial_rotary_factor, s.rope_traditional)
               != (a.n_heads, a.kv_heads, a.hd, a.qk_norm, a.qkv_bias, a.o_bias, a.rope,
                   a.partial_rotary_factor, a.rope_traditional) for s in settings):
            return None
        if (a.qk_norm != qk_norm or not a.rope or a.rope_traditional or a.partial_rotary_factor != 1.0
                or mlp.activation != "silu" or not mlp.gated):
            return None
        if qkv_bias is not None and (a.qkv_bias != qkv_bias or a.o_bias):
            return None
        if qkv_bias is None and a.qkv_bias != a.o_bias:
            return None
        windows = {s.window for s in settings}
        if model_type == "mistral" and (len(windows) != 1 or 0 in windows):
            return None
        if model_type == "llama" and windows != {0}:
            return None
        hf = {
            "model_type": model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": a.n_heads,
            "num_key_value_heads": a.kv_heads, "head_dim": a.hd, "intermediate_size": mlp.ff,
            "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
            "rope_parameters": _rope_parameters(a),
            "tie_word_embeddings": cfg.tie_embeddings, "mlp_bias": mlp.bias,
        }
        if model_type == "llama":
            hf["attention_bias"] = a.qkv_bias
        if model_type == "mistral":
            hf["sliding_window"] = windows.pop()
        if model_type in ("qwen2", "qwen3"):
            slide = [s.window > 0 for s in settings]
            if len({s.window for s in settings if s.window}) > 1:
                return None
            hf["layer_types"] = ["sliding_attention" if s else "full_attention" for s in slide]
            hf["sliding_window"] = next((s.window for s in settings if s.window), None)
            hf["use_sliding_window"] = any(slide)
            if model_type == "qwen3":
                hf["attention_bias"] = a.qkv_bias
        return hf

    return to_hf


register_converter(Converter(
    ("llama",), lambda hf: _decoder_config(hf, qk_norm=False, qkv_bias=bool(hf.get("attention_bias")),
                                           o_bias=bool(hf.get("attention_bias"))),
    _DECODER_RENAME, _DECODER_FIELDS, _decoder_to_hf("llama", False, None), "LlamaForCausalLM",
    drop=(r"rotary_emb\.inv_freq$",)))
register_converter(Converter(
    ("mistral",), lambda hf: _decoder_config(hf, qk_norm=False, qkv_bias=False, o_bias=False),
    _DECODER_RENAME, _DECODER_FIELDS, _decoder_to_hf("mistral", False, False), "MistralForCausalLM",
    drop=(r"rotary_emb\.inv_freq$",)))
register_converter(Converter(
    ("qwen2",), lambda hf: _decoder_config(hf, qk_norm=False, qkv_bias=True, o_bias=False),
    _DECODER_RENAME, _DECODER_FIELDS, _decoder_to_hf("qwen2", False, True), "Qwen2ForCausalLM",
    drop=(r"rotary_emb\.inv_freq$",)))
register_converter(Converter(
    ("qwen3",), lambda hf: _decoder_config(hf, qk_norm=True, qkv_bias=bool(hf.get("attention_bias")),
                                           o_bias=bool(hf.get("attention_bias"))),
    _DECODER_RENAME, _DECODER_FIELDS, _decoder_to_hf("qwen3", True, None), "Qwen3ForCausalLM",
    drop=(r"rotary_emb\.inv_freq$",)))


# -- pure SSM stacks ------------------------------------------------------------------------------
_SSM_RENAME = (
    ("backbone.embeddings.", "embed_tokens."),
    ("backbone.layers.{i}.norm.", "layers.{i}.norm."),
    ("backbone.layers.{i}.mixer.", "layers.{i}.mixer."),
    ("backbone.norm_f.", "norm_f."),
    ("lm_head.", "lm_head."),
)


def _expand(hf: dict, inner: int) -> int:
    D = hf["hidden_size"]
    if inner % D:
        raise ValueError(f"{hf['model_type']}: intermediate size {inner} is not a multiple of hidden_size {D}")
    return inner // D


def _mamba_config(hf: dict) -> dict:
    _unsupported(hf, "hidden_act", lambda v: v == "silu")
    D = hf["hidden_size"]
    inner = hf.get("intermediate_size") or hf.get("expand", 2) * D
    rank = hf.get("time_step_rank", "auto")
    rank = math.ceil(D / 16) if rank == "auto" else int(rank)
    L = hf["num_hidden_layers"]
    return {
        "name": hf["model_type"], "vocab_size": hf["vocab_size"], "d_model": D,
        "layer_types": ["mamba1"] * L, "ffn_types": ["none"] * L,
        "mixers": {"mamba1": {"d_state": hf["state_size"], "d_conv": hf["conv_kernel"],
                              "expand": _expand(hf, inner), "dt_rank": rank,
                              "conv_bias": bool(hf.get("use_conv_bias", True)),
                              "bias": bool(hf.get("use_bias", False))}},
        "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
    }


def _mamba_to_hf(cfg) -> dict | None:
    if set(cfg.layer_types) != {"mamba1"} or set(cfg.ffn_types) != {"none"} or cfg.mixer_kind(0) != "mamba1":
        return None
    m = cfg.mixer(0)[1]
    if m.dt_bc_norm or m.n_heads != 1:
        return None
    return {"model_type": "mamba", "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layers, "state_size": m.d_state, "conv_kernel": m.d_conv,
            "expand": m.expand, "intermediate_size": m.d_inner, "time_step_rank": m.rank,
            "use_conv_bias": m.conv_bias, "use_bias": m.bias, "layer_norm_epsilon": cfg.norm_eps,
            "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings}


def _falcon_mamba_config(hf: dict) -> dict:
    cfg = _mamba_config(hf)
    cfg["name"] = "falcon_mamba"
    cfg["mixers"]["mamba1"].update({"dt_bc_norm": True, "dt_bc_norm_weight": False,
                                    "dt_bc_norm_eps": float(hf.get("mixer_rms_eps", 1e-6))})
    return cfg


def _falcon_mamba_to_hf(cfg) -> dict | None:
    if set(cfg.layer_types) != {"mamba1"} or set(cfg.ffn_types) != {"none"}:
        return None
    m = cfg.mixers[0][2]
    if not (m.dt_bc_norm and not m.dt_bc_norm_weight):
        return None
    hf = _mamba_to_hf(dataclasses.replace(cfg, mixers={"mamba1": dataclasses.replace(m, dt_bc_norm=False)}))
    hf.update({"model_type": "falcon_mamba", "mixer_rms_eps": m.dt_bc_norm_eps})
    return hf


register_converter(Converter(
    ("mamba",), _mamba_config, _SSM_RENAME,
    frozenset({"vocab_size", "hidden_size", "num_hidden_layers", "state_size", "conv_kernel", "expand",
               "intermediate_size", "time_step_rank", "use_conv_bias", "use_bias", "layer_norm_epsilon",
               "hidden_act"}),
    _mamba_to_hf, "MambaForCausalLM"))
register_converter(Converter(
    ("falcon_mamba",), _falcon_mamba_config, _SSM_RENAME,
    frozenset({"vocab_size", "hidden_size", "num_hidden_layers", "state_size", "conv_kernel", "expand",
               "intermediate_size", "time_step_rank", "use_conv_bias", "use_bias", "layer_norm_epsilon",
               "hidden_act", "mixer_rms_eps"}),
    _falcon_mamba_to_hf, "FalconMambaForCausalLM"))


def _mamba2_config(hf: dict) -> dict:
    _unsupported(hf, "hidden_act", lambda v: v == "silu")
    _check_time_step_limit(hf)
    D = hf["hidden_size"]
    expand = hf.get("expand", 2)
    heads, hd = hf["num_heads"], hf["head_dim"]
    if heads * hd != expand * D:
        raise ValueError(f"mamba2: num_heads*head_dim = {heads * hd} must equal expand*hidden_size = {expand * D}")
    L = hf["num_hidden_layers"]
    _unsupported(hf, "norm_before_gate", lambda v: v is False)
    return {
        "name": "mamba2", "vocab_size": hf["vocab_size"], "d_model": D,
        "layer_types": ["mamba2"] * L, "ffn_types": ["none"] * L,
        "mixers": {"mamba2": {"d_state": hf["state_size"], "d_conv": hf["conv_kernel"], "expand": expand,
                              "head_dim": hd, "n_groups": hf.get("n_groups", 1),
                              "chunk_size": hf.get("chunk_size", 256),
                              "conv_bias": bool(hf.get("use_conv_bias", True)),
                              "bias": bool(hf.get("use_bias", False)),
                              "norm_eps": hf.get("layer_norm_epsilon", 1e-5)}},
        "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }


def _num(v) -> float:
    if isinstance(v, dict) and "__float__" in v:  # transformers' JSON encoding of inf / nan
        return float(v["__float__"])
    return float(v)


def _mamba2_to_hf(cfg) -> dict | None:
    if set(cfg.layer_types) != {"mamba2"} or set(cfg.ffn_types) != {"none"} or cfg.mixer_kind(0) != "mamba2":
        return None
    m = cfg.mixer(0)[1]
    if m.norm_eps != cfg.norm_eps or m.norm_before_gate:
        return None
    return {"model_type": "mamba2", "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layers, "state_size": m.d_state, "conv_kernel": m.d_conv,
            "expand": m.expand, "num_heads": m.n_heads, "head_dim": m.head_dim, "n_groups": m.n_groups,
            "chunk_size": m.chunk_size, "use_conv_bias": m.conv_bias, "use_bias": m.bias,
            "layer_norm_epsilon": cfg.norm_eps, "hidden_act": "silu",
            "tie_word_embeddings": cfg.tie_embeddings, "time_step_limit": [0.0, float("inf")]}


register_converter(Converter(
    ("mamba2",), _mamba2_config, _SSM_RENAME,
    frozenset({"vocab_size", "hidden_size", "num_hidden_layers", "state_size", "conv_kernel", "expand",
               "num_heads", "head_dim", "n_groups", "chunk_size", "use_conv_bias", "use_bias",
               "layer_norm_epsilon", "hidden_act", "time_step_limit", "time_step_rank", "norm_before_gate"}),
    _mamba2_to_hf, "Mamba2ForCausalLM"))


# -- Mamba-2 + attention hybrids ------------------------------------------------------------------
def _bamba_config(hf: dict) -> dict:
    _unsupported(hf, "hidden_act", lambda v: v == "silu")
    _check_time_step_limit(hf)
    D, L = hf["hidden_size"], hf["num_hidden_layers"]
    expand = hf.get("mamba_expand", 2)
    if hf["mamba_n_heads"] * hf["mamba_d_head"] != expand * D:
        raise ValueError("bamba: mamba_n_heads*mamba_d_head must equal mamba_expand*hidden_size")
    attn_idx = set(hf.get("attn_layer_indices") or [])
    bad = sorted(i for i in attn_idx if not 0 <= i < L)
    if bad:
        raise ValueError(f"bamba: attn_layer_indices {bad} out of range for {L} layers")
    eps = hf.get("rms_norm_eps", 1e-5)
    return {
        "name": "bamba", "vocab_size": hf["vocab_size"], "d_model": D,
        "layer_types": ["attention" if i in attn_idx else "mamba2" for i in range(L)],
        "ffn_types": ["mlp"] * L,
        "mixers": {
            **({"mamba2": {"d_state": hf["mamba_d_state"], "d_conv": hf.get("mamba_d_conv", 4),
                           "expand": expand, "head_dim": hf["mamba_d_head"],
                           "n_groups": hf.get("mamba_n_groups", 1),  # gated norm per group, as transformers
                           "chunk_size": hf.get("mamba_chunk_size", 256),
                           "conv_bias": bool(hf.get("mamba_conv_bias", True)),
                           "bias": bool(hf.get("mamba_proj_bias", False)), "norm_eps": eps}}
               if len(attn_idx) < L else {}),
            **({"attention": _attention_from_hf(hf, qkv_bias=bool(hf.get("attention_bias")),
                                                o_bias=bool(hf.get("attention_bias")), norm_eps=eps)}
               if attn_idx else {}),
        },
        "ffns": {"mlp": {"d_ff": hf["intermediate_size"], "activation": "silu",
                         "bias": bool(hf.get("mlp_bias", False))}},
        "norm_eps": eps, "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }


def _bamba_to_hf(cfg) -> dict | None:
    kinds = [cfg.mixer_kind(i) for i in range(cfg.n_layers)]
    if set(kinds) - {"mamba2", "attention"} or "mamba2" not in kinds or set(cfg.ffn_types) != {"mlp"}:
        return None
    if len(cfg.mixers) > 2 or len(cfg.ffns) != 1:
        return None
    m = next(s for n, k, s in cfg.mixers if k == "mamba2")
    a = next((s for n, k, s in cfg.mixers if k == "attention"), None)
    mlp = cfg.ffns[0][2]
    if (m.norm_eps != cfg.norm_eps or m.norm_before_gate or mlp.activation != "silu"
            or not mlp.gated):
        return None
    if a is not None and (a.qk_norm or a.qkv_bias != a.o_bias or not a.rope or a.rope_traditional
                          or a.norm_eps != cfg.norm_eps):
        return None
    hf = {"model_type": "bamba", "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
          "num_hidden_layers": cfg.n_layers, "intermediate_size": mlp.ff, "hidden_act": "silu",
          "mlp_bias": mlp.bias, "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
          "attn_layer_indices": [i for i, k in enumerate(kinds) if k == "attention"],
          "mamba_d_state": m.d_state, "mamba_d_conv": m.d_conv, "mamba_expand": m.expand,
          "mamba_n_heads": m.n_heads, "mamba_d_head": m.head_dim, "mamba_n_groups": m.n_groups,
          "mamba_chunk_size": m.chunk_size, "mamba_conv_bias": m.conv_bias, "mamba_proj_bias": m.bias,
          "time_step_limit": [0.0, float("inf")]}
    if a is not None:
        hf.update({"num_attention_heads": a.n_heads, "num_key_value_heads": a.kv_heads, "head_dim": a.hd,
                   "attention_bias": a.qkv_bias,
                   "rope_parameters": {**_rope_parameters(a),
                                       "partial_rotary_factor": a.partial_rotary_factor}})
    return hf


register_converter(Converter(
    ("bamba",), _bamba_config,
    decoder_rules({"mamba": ("mamba2",), "self_attn": ("attention",)}, ffn_norm="pre_ff_layernorm",
                  ffn="feed_forward", final="final_layernorm"),
    frozenset({"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "intermediate_size", "hidden_act", "rms_norm_eps", "rope_parameters", "rope_theta",
               "rope_scaling", "partial_rotary_factor", "attention_bias", "mlp_bias", "attn_layer_indices",
               "mamba_chunk_size", "mamba_conv_bias", "mamba_d_conv", "mamba_d_head", "mamba_d_state",
               "mamba_expand", "mamba_n_groups", "mamba_n_heads", "mamba_proj_bias", "time_step_limit",
               "num_logits_to_keep", "z_loss_coefficient"}),
    lambda cfg: _bamba_to_hf(cfg), "BambaForCausalLM", drop=(r"rotary_emb\.inv_freq$",)))


# -- LFM2: gated short convolutions + attention ---------------------------------------------------
def _lfm2_ff(hf: dict) -> int:
    ff = hf["intermediate_size"]
    if hf.get("block_auto_adjust_ff_dim", True):
        ff = int(2 * ff / 3)
        mult = hf.get("block_ffn_dim_multiplier")
        if mult is not None:
            ff = int(mult * ff)
            m = hf.get("block_multiple_of", 256)
            ff = m * ((ff + m - 1) // m)
    return ff


def _lfm2_config(hf: dict) -> dict:
    L, D = hf["num_hidden_layers"], hf["hidden_size"]
    types = hf.get("layer_types")
    if types is None:
        idx = set(hf.get("full_attn_idxs") or [])
        types = ["full_attention" if i in idx else "conv" for i in range(L)]
    if len(types) != L:
        raise ValueError(f"lfm2: layer_types has {len(types)} entries, num_hidden_layers is {L}")
    bad = sorted(set(types) - {"conv", "full_attention"})
    if bad:
        raise ValueError(f"lfm2: unsupported layer_types {bad}")
    eps = hf.get("norm_eps", 1e-5)
    mixers = {}
    if "conv" in types:
        mixers["short_conv"] = {"kernel": hf.get("conv_L_cache", 3), "bias": bool(hf.get("conv_bias", False))}
    if "full_attention" in types:
        mixers["attention"] = _attention_from_hf(hf, qk_norm=True, norm_eps=eps)
    return {"name": "lfm2", "vocab_size": hf["vocab_size"], "d_model": D,
            "layer_types": ["attention" if t == "full_attention" else "short_conv" for t in types],
            "ffn_types": ["mlp"] * L, "mixers": mixers, "ffns": {"mlp": {"d_ff": _lfm2_ff(hf)}},
            "norm_eps": eps, "tie_embeddings": bool(hf.get("tie_word_embeddings", True))}


def _lfm2_to_hf(cfg) -> dict | None:
    kinds = [cfg.mixer_kind(i) for i in range(cfg.n_layers)]
    if set(kinds) - {"short_conv", "attention"} or "short_conv" not in kinds or set(cfg.ffn_types) != {"mlp"}:
        return None
    if len(cfg.mixers) > 2 or len(cfg.ffns) != 1:
        return None
    sc = next(s for _, k, s in cfg.mixers if k == "short_conv")
    a = next((s for _, k, s in cfg.mixers if k == "attention"), None)
    mlp = cfg.ffns[0][2]
    if mlp.activation != "silu" or not mlp.gated or mlp.bias:
        return None
    if a is not None and (not a.qk_norm or a.qkv_bias or a.o_bias or a.norm_eps != cfg.norm_eps
                          or a.partial_rotary_factor != 1.0 or not a.rope or a.rope_traditional):
        return None
    hf = {"model_type": "lfm2", "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
          "num_hidden_layers": cfg.n_layers, "intermediate_size": mlp.ff, "block_auto_adjust_ff_dim": False,
          "norm_eps": cfg.norm_eps, "conv_L_cache": sc.kernel, "conv_bias": sc.bias,
          "layer_types": ["full_attention" if k == "attention" else "conv" for k in kinds],
          "tie_word_embeddings": cfg.tie_embeddings}
    if a is not None:
        hf.update({"num_attention_heads": a.n_heads, "num_key_value_heads": a.kv_heads, "head_dim": a.hd,
                   "rope_parameters": _rope_parameters(a)})
    return hf


register_converter(Converter(
    ("lfm2",), _lfm2_config,
    (("model.embed_tokens.", "embed_tokens."),
     ("model.layers.{i}.operator_norm.", "layers.{i}.norm."),
     ("model.layers.{i}.conv.", "layers.{i}.mixer.", ("short_conv",)),
     ("model.layers.{i}.self_attn.", "layers.{i}.mixer.", ("attention",)),
     ("model.layers.{i}.self_attn.out_proj.", "layers.{i}.mixer.o_proj.", ("attention",)),
     ("model.layers.{i}.self_attn.q_layernorm.", "layers.{i}.mixer.q_norm.", ("attention",)),
     ("model.layers.{i}.self_attn.k_layernorm.", "layers.{i}.mixer.k_norm.", ("attention",)),
     ("model.layers.{i}.ffn_norm.", "layers.{i}.ffn_norm."),
     ("model.layers.{i}.feed_forward.w1.", "layers.{i}.ffn.gate_proj."),
     ("model.layers.{i}.feed_forward.w3.", "layers.{i}.ffn.up_proj."),
     ("model.layers.{i}.feed_forward.w2.", "layers.{i}.ffn.down_proj."),
     ("model.embedding_norm.", "norm_f."),
     ("lm_head.", "lm_head.")),
    frozenset({"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "intermediate_size", "norm_eps", "rope_parameters", "rope_theta", "rope_scaling",
               "layer_types", "full_attn_idxs", "conv_L_cache", "conv_bias", "block_auto_adjust_ff_dim",
               "block_ffn_dim_multiplier", "block_multiple_of"}),
    _lfm2_to_hf, "Lfm2ForCausalLM", drop=(r"rotary_emb\.inv_freq$",)))

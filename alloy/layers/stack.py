"""The hybrid stack: embedding, pre-norm residual blocks driven by data, final norm, LM head.

    h = embed(tokens)
    for each depth i:   h = h + mixer_i(rms_norm(h));   h = h + ffn_i(rms_norm(h))   (if ffn_i)
    logits = rms_norm(h) @ W_head^T                       (W_head = embed when tied)

Mixers and FFNs come from the registry by the kinds named in the config; the stack never names a
kind. Params: {"embed_tokens", "layers": [{"norm", "mixer", "ffn_norm"?, "ffn"?}], "norm_f",
"lm_head"?}. State: {"pos": (B,) int32, "layers": [{"mixer": ...}]}.
"""
from __future__ import annotations

import math

import mlx.core as mx

from alloy.config import ModelConfig
from alloy.layers.common import dtype_of
from alloy.layers.registry import get_ffn, get_mixer
from alloy.ops.norm import rms_norm
from alloy.params import init as I


def resolve(cfg: ModelConfig):
    """[(mixer_spec, mixer_settings, ffn_spec | None, ffn_settings | None)] per depth."""
    out = []
    for i in range(cfg.n_layers):
        mk, ms = cfg.mixer(i)
        f = cfg.ffn(i)
        out.append((get_mixer(mk), ms, None if f is None else get_ffn(f[0]), None if f is None else f[1]))
    return out


def init(key, cfg: ModelConfig) -> dict:
    blocks = resolve(cfg)
    keys = I.split(key, 2 * cfg.n_layers + 2)
    D = cfg.d_model
    params = {"embed_tokens": {"weight": I.normal(keys[0], (cfg.vocab_size, D), cfg.init_std)}}
    layers = []
    for i, (mspec, ms, fspec, fs) in enumerate(blocks):
        lp = {"norm": {"weight": mx.ones((D,))}, "mixer": mspec.init(keys[2 + 2 * i], ms)}
        if fspec is not None:
            lp["ffn_norm"] = {"weight": mx.ones((D,))}
            lp["ffn"] = fspec.init(keys[3 + 2 * i], fs)
        layers.append(lp)
    params["layers"] = layers
    params["norm_f"] = {"weight": mx.ones((D,))}
    if not cfg.tie_embeddings:
        params["lm_head"] = {"weight": I.normal(keys[1], (cfg.vocab_size, D), cfg.init_std)}
    return params


def init_state(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
    if not isinstance(batch, int) or batch <= 0:
        raise ValueError(f"init_state: batch must be a positive int, got {batch!r}")
    if not isinstance(max_len, int) or max_len <= 0:
        raise ValueError(f"init_state: max_len must be a positive int, got {max_len!r}")
    dtype = dtype_of(cfg.dtype) if dtype is None else dtype
    layers = [{"mixer": mspec.init_state(ms, batch, max_len, dtype)} for mspec, ms, _, _ in resolve(cfg)]
    return {"pos": mx.zeros((batch,), dtype=mx.int32), "layers": layers}


def make_apply(cfg: ModelConfig):
    """apply(params, tokens, state=None) -> (logits, state), with the layer lookups done once."""
    blocks = resolve(cfg)
    eps = cfg.norm_eps

    def apply(params, tokens, state=None):
        if tokens.ndim != 2:
            raise ValueError(f"apply: tokens must be (batch, time) int, got shape {tuple(tokens.shape)}")
        T = tokens.shape[1]
        h = params["embed_tokens"]["weight"][tokens]
        new_layers = []
        for i, (mspec, ms, fspec, fs) in enumerate(blocks):
            lp = params["layers"][i]
            s_in = None if state is None else state["layers"][i]["mixer"]
            y, s_out = mspec.apply(lp["mixer"], rms_norm(h, lp["norm"]["weight"], eps), s_in, ms)
            h = h + y
            if fspec is not None:
                y, _ = fspec.apply(lp["ffn"], rms_norm(h, lp["ffn_norm"]["weight"], eps), None, fs)
                h = h + y
            new_layers.append({"mixer": s_out})
        h = rms_norm(h, params["norm_f"]["weight"], eps)
        head = params["embed_tokens" if cfg.tie_embeddings else "lm_head"]["weight"]
        logits = h @ head.T
        if state is None:
            return logits, None
        return logits, {"pos": state["pos"] + T, "layers": new_layers}

    return apply

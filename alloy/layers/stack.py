"""The hybrid stack: embedding, pre-norm residual blocks driven by data, final norm, LM head.

    h = embed(tokens)
    for each depth i:   h = h + mixer_i(rms_norm(h));   h = h + ffn_i(rms_norm(h))   (if ffn_i)
    logits = rms_norm(h) @ W_head^T                       (W_head = embed when tied)

Mixers and FFNs come from the registry by the kinds named in the config; the stack never names a
kind. Params: {"embed_tokens", "layers": [{"norm", "mixer", "ffn_norm"?, "ffn"?}], "norm_f",
"lm_head"?}. State: {"pos": (B,) int32, "layers": [{"mixer": ...}]}.

Right-padded batches: a state may carry ``valid`` (B,) int32, the number of real tokens of this
call per row. The stack hands it to every stateful mixer (as ``state["valid"]``, which mixers honour:
no KV write, dt = 0, conv tail at the row's end), advances ``pos`` by ``valid`` instead of T and
returns it unchanged in the new state. Logits at padded positions are meaningless.
"""
from __future__ import annotations


import mlx.core as mx

from alloy.config import ModelConfig
from alloy.layers.common import dense, dtype_of, embed
from alloy.layers import shared
from alloy.layers.registry import get_ffn, get_mixer
from alloy.ops.norm import rms_norm
from alloy.params import init as I


def resolve(cfg: ModelConfig):
    """[(mixer_spec | None, mixer_settings, ffn_spec | None, ffn_settings | None)] per depth
    (None where the config says "none")."""
    out = []
    for i in range(cfg.n_layers):
        m, f = cfg.mixer(i), cfg.ffn(i)
        out.append((None if m is None else get_mixer(m[0]), None if m is None else m[1],
                    None if f is None else get_ffn(f[0]), None if f is None else f[1]))
    return out


def init(key, cfg: ModelConfig) -> dict:
    blocks = resolve(cfg)
    keys = I.split(key, 2 * cfg.n_layers + 2)
    D = cfg.d_model
    params = {"embed_tokens": {"weight": I.normal(keys[0], (cfg.vocab_size, D), cfg.init_std)}}
    layers = []
    for i, (mspec, ms, fspec, fs) in enumerate(blocks):
        lp = {}
        if mspec is not None:
            lp["norm"] = {"weight": mx.ones((D,))}
            lp["mixer"] = mspec.init(keys[2 + 2 * i], ms)
        if fspec is not None:
            lp["ffn_norm"] = {"weight": mx.ones((D,))}
            lp["ffn"] = fspec.init(keys[3 + 2 * i], fs)
        layers.append(lp)
    params["layers"] = layers
    sh = cfg.shared
    if sh is not None:
        bkeys = I.split(keys[1], sh.n_blocks + len(sh.at) + 1)
        params["shared_blocks"] = [shared.init_block(bkeys[b], sh) for b in range(sh.n_blocks)]
        for i, (j, b) in sh.calls().items():
            layers[i]["shared"] = shared.init_call(bkeys[sh.n_blocks + j], sh, params["shared_blocks"][b])
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
    layers = [{"mixer": {} if mspec is None else mspec.init_state(ms, batch, max_len, dtype)}
              for mspec, ms, _, _ in resolve(cfg)]
    if cfg.shared is not None:
        for i in cfg.shared.at:
            layers[i]["shared"] = shared.init_call_state(cfg.shared, batch, max_len, dtype)
    return {"pos": mx.zeros((batch,), dtype=mx.int32), "layers": layers}


def make_apply(cfg: ModelConfig, remat: bool = False):
    """apply(params, tokens, state=None) -> (logits, state), with the layer lookups done once.

    ``remat=True`` wraps each block of a stateless forward (``state=None``, the training path) in
    ``mx.checkpoint``: its activations are recomputed in the backward pass instead of stored.
    Values and gradients are unchanged; stateful calls ignore it.
    """
    blocks = resolve(cfg)
    eps = cfg.norm_eps
    res = cfg.residual_multiplier

    calls = {} if cfg.shared is None else cfg.shared.calls()

    scales = dict(cfg.residual_scales or ())
    post = cfg.block_style == "norm_residual"

    def add(h, x, y, name):
        """The residual update of one half-block (pre-norm or MiniMax's scaled normed residual)."""
        if post:
            a, b = scales[name]
            return a * x + b * y
        return h + (y if res == 1.0 else y * res)

    def block(i, lp, h, s_in, e0=None, blocks_p=None, s_sh=None):
        """One residual block: the mixer half (its input may add a shared call's output), then the
        FFN half. Returns (h, mixer state, shared-call state)."""
        mspec, ms, fspec, fs = blocks[i]
        s_out, sh_out = {}, None
        if mspec is not None:
            x = h
            if i in calls:
                t, sh_out = shared.apply_call(blocks_p[calls[i][1]], lp["shared"], h, e0, s_sh, cfg.shared)
                x = h + t
            x = rms_norm(x, lp["norm"]["weight"], eps)
            y, s_out = mspec.apply(lp["mixer"], x, s_in, ms)
            h = add(h, x, y, cfg.layer_types[i])
        if fspec is not None:
            x = rms_norm(h, lp["ffn_norm"]["weight"], eps)
            y, _ = fspec.apply(lp["ffn"], x, None, fs)
            h = add(h, x, y, "ffn")
        return h, s_out, sh_out

    remat_blocks = [mx.checkpoint(lambda lp, h, e0, bp, i=i: block(i, lp, h, None, e0, bp)[0])
                    for i in range(len(blocks))] if remat else None

    def apply(params, tokens, state=None):
        if tokens.ndim != 2:
            raise ValueError(f"apply: tokens must be (batch, time) int, got shape {tuple(tokens.shape)}")
        T = tokens.shape[1]
        h = embed(params["embed_tokens"], tokens, cfg.d_model)
        if cfg.embedding_multiplier != 1.0:
            h = h * cfg.embedding_multiplier
        valid = None if state is None else state.get("valid")  # (B,) real tokens per row, or None
        e0 = h if calls else None
        blocks_p = params.get("shared_blocks")
        new_layers = []
        for i in range(len(blocks)):
            lp = params["layers"][i]
            if remat_blocks is not None and state is None:
                h = remat_blocks[i](lp, h, e0, blocks_p)
                new_layers.append({"mixer": None})
                continue
            s_in = None if state is None else state["layers"][i]["mixer"]
            s_sh = None if state is None or i not in calls else state["layers"][i]["shared"]
            if valid is not None and s_in:
                s_in = {**s_in, "valid": valid}
            if valid is not None and s_sh:
                s_sh = {**s_sh, "valid": valid}
            h, s_out, sh_out = block(i, lp, h, s_in, e0, blocks_p, s_sh)
            new_layers.append({"mixer": s_out} if i not in calls else {"mixer": s_out, "shared": sh_out})
        h = rms_norm(h, params["norm_f"]["weight"], eps)
        logits = dense(params["embed_tokens" if cfg.tie_embeddings else "lm_head"], h)
        if cfg.logits_scaling != 1.0:
            logits = logits / cfg.logits_scaling
        if cfg.logits_soft_cap:
            cap = cfg.logits_soft_cap
            logits = (mx.tanh(logits.astype(mx.float32) / cap) * cap).astype(logits.dtype)
        if state is None:
            return logits, None
        if valid is None:
            return logits, {"pos": state["pos"] + T, "layers": new_layers}
        return logits, {"pos": state["pos"] + valid, "layers": new_layers, "valid": valid}

    return apply

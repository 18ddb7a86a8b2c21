"""The hybrid stack: embedding, pre-norm residual blocks driven by data, final norm, LM head.

    h = embed(tokens)
    for each depth i:   h = h + mixer_i(rms_norm(h));   h = h + ffn_i(rms_norm(h))   (if ffn_i)
    logits = rms_norm(h) @ W_head^T                       (W_head = embed when tied)

Mixers and FFNs come from the registry by the kinds named in the config; the stack never names a
kind. Params: {"embed_tokens", "layers": [{"norm", "mixer", "ffn_norm"?, "ffn"?}], "norm_f",
"lm_head"?}. State: {"pos": (B,) int32, "layers": [{"mixer": ...}]}.

``block_style: "hyper"`` (DeepSeek-V4) keeps ``streams`` residual streams (B, T, n, D) instead of h:
each half-block collapses them into its input and expands its output back with Sinkhorn-mixed
weights (``alloy.layers.hyper``); params gain "mixer_hc" / "ffn_hc" per layer and "hc_head", which
collapses the streams before the final norm. FFNs registered with ``tokens=True`` (hash_moe) get
the call's token ids.

Right-padded batches: a state may carry ``valid`` (B,) int32, the number of real tokens of this
call per row. The stack hands it to every stateful mixer (as ``state["valid"]``, which mixers honour:
no KV write, dt = 0, conv tail at the row's end), advances ``pos`` by ``valid`` instead of T and
returns it unchanged in the new state. Logits at padded positions are meaningless.
"""
from __future__ import annotations


import mlx.core as mx

from alloy.config import ModelConfig
from alloy.layers.common import dense, dtype_of, embed
from alloy.layers import hyper, shared
from alloy.layers.registry import get_ffn, get_mixer
from alloy.ops.norm import add_rms_norm, rms_norm
from alloy.params import init as I

# Plain pre-norm stacks (no hyper-connections, unit residual multiplier, no remat) carry each
# half-block's output as a pending residual update into the next norm, which adds it and normalizes
# in one op (`alloy.ops.add_rms_norm`: one kernel each way on a GPU; the two ops elsewhere, the same
# values as the unfused order).
FUSED_ADD_NORM = True


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
    n_hc = dict(cfg.hyper)["streams"] if cfg.block_style == "hyper" else 0
    hc_keys = I.split(mx.random.split(keys[1])[0], 2 * cfg.n_layers + 1) if n_hc else None
    params = {"embed_tokens": {"weight": I.normal(keys[0], (cfg.vocab_size, D), cfg.init_std)}}
    layers = []
    for i, (mspec, ms, fspec, fs) in enumerate(blocks):
        lp = {}
        if mspec is not None:
            lp["norm"] = {"weight": mx.ones((D,))}
            lp["mixer"] = mspec.init(keys[2 + 2 * i], ms)
            if n_hc:
                lp["mixer_hc"] = hyper.init(hc_keys[2 * i], n_hc, D, cfg.init_std)
        if fspec is not None:
            lp["ffn_norm"] = {"weight": mx.ones((D,))}
            lp["ffn"] = fspec.init(keys[3 + 2 * i], fs)
            if n_hc:
                lp["ffn_hc"] = hyper.init(hc_keys[2 * i + 1], n_hc, D, cfg.init_std)
        layers.append(lp)
    params["layers"] = layers
    if n_hc:
        params["hc_head"] = hyper.init_head(hc_keys[-1], n_hc, D, cfg.init_std)
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
    hc = dict(cfg.hyper) if cfg.block_style == "hyper" else None
    defer = FUSED_ADD_NORM and hc is None and not post and res == 1.0 and not remat

    def add(h, x, y, name):
        """The residual update of one half-block (pre-norm or MiniMax's scaled normed residual)."""
        if post:
            a, b = scales[name]
            return a * x + b * y
        return h + (y if res == 1.0 else y * res)

    def half(h, p_norm, p_hc, f, name, x_in=None, pending=None):
        """One half-block around f: pre-norm / norm-residual on h (f reads norm(x_in), x_in defaults
        to h), or hyper-connections on the streams h. Returns (h, f's second result, pending): with
        `defer`, the residual stream is h + pending (the update the next norm adds; pending, given
        only without x_in, is added here first)."""
        if hc is None:
            if pending is not None:
                h, x = add_rms_norm(h, pending, p_norm["weight"], eps)
            else:
                x = rms_norm(h if x_in is None else x_in, p_norm["weight"], eps)
            y, out = f(x)
            return (h, out, y) if defer else (add(h, x, y, name), out, None)
        pre, post_w, M = hyper.weights(p_hc, h, hc["sinkhorn_iters"], hc["eps"], eps)
        y, out = f(rms_norm(hyper.collapse(pre, h), p_norm["weight"], eps))
        return hyper.expand(post_w, M, h, y), out, None

    def block(i, lp, h, s_in, e0=None, blocks_p=None, s_sh=None, tokens=None, pending=None):
        """One residual block: the mixer half (its input may add a shared call's output), then the
        FFN half. Returns (h, mixer state, shared-call state, pending): the residual stream is
        h + pending on entry and exit (see `half`)."""
        mspec, ms, fspec, fs = blocks[i]
        s_out, sh_out = {}, None
        if mspec is not None:
            own = (mspec.residual_block is not None and s_in is not None and i not in calls and hc is None
                   and not post and res == 1.0)
            if pending is not None and (i in calls or own):  # these read the whole stream: add now
                h, pending = h + pending, None
            x = None
            if i in calls:
                t, sh_out = shared.apply_call(blocks_p[calls[i][1]], lp["shared"], h, e0, s_sh, cfg.shared)
                x = h + t
            fused = mspec.residual_block(lp["mixer"], h, lp["norm"]["weight"], eps, s_in, ms) if own else None
            if fused is not None:  # the layer's own fused inference block (e.g. Mamba-2 decode kernels)
                h, s_out = fused
            else:
                h, s_out, pending = half(h, lp["norm"], lp.get("mixer_hc"),
                                         lambda a: mspec.apply(lp["mixer"], a, s_in, ms), cfg.layer_types[i], x,
                                         pending)
        if fspec is not None:
            kw = {"tokens": tokens} if fspec.tokens else {}
            h, _, pending = half(h, lp["ffn_norm"], lp.get("ffn_hc"),
                                 lambda a: fspec.apply(lp["ffn"], a, None, fs, **kw), "ffn", None, pending)
        return h, s_out, sh_out, pending

    segments = _segments(cfg, blocks, calls)

    remat_blocks = [mx.checkpoint(lambda lp, h, e0, bp, tok, i=i: block(i, lp, h, None, e0, bp, tokens=tok)[0])
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
        if hc is not None:
            h = mx.broadcast_to(h[:, :, None, :], (h.shape[0], T, hc["streams"], cfg.d_model))
        blocks_p = params.get("shared_blocks")
        new_layers = []
        stacks = params.get("decode_stack") if state is not None and T == 1 and valid is None else None
        pending = None  # the residual update not yet added to h (see `half`)
        i = 0
        while i < len(blocks):
            end = segments.get(i)
            if stacks is not None and end is not None and str(i) in stacks:
                if pending is not None:
                    h, pending = h + pending, None
                # a run of blocks in one launch (e.g. the persistent Mamba-2 decode kernel)
                fused = blocks[i][0].stack_decode(stacks[str(i)], h, [state["layers"][j]["mixer"] for j in range(i, end)],
                                                  eps, blocks[i][1], tag=i)
                if fused is not None:
                    h, mstates = fused
                    new_layers += [{"mixer": m} for m in mstates]
                    i = end
                    continue
            lp = params["layers"][i]
            if remat_blocks is not None and state is None:
                h = remat_blocks[i](lp, h, e0, blocks_p, tokens)
                new_layers.append({"mixer": None})
                i += 1
                continue
            s_in = None if state is None else state["layers"][i]["mixer"]
            s_sh = None if state is None or i not in calls else state["layers"][i]["shared"]
            if valid is not None and s_in:
                s_in = {**s_in, "valid": valid}
            if valid is not None and s_sh:
                s_sh = {**s_sh, "valid": valid}
            h, s_out, sh_out, pending = block(i, lp, h, s_in, e0, blocks_p, s_sh, tokens, pending)
            new_layers.append({"mixer": s_out} if i not in calls else {"mixer": s_out, "shared": sh_out})
            i += 1
        if hc is not None:
            h = hyper.head(params["hc_head"], h, hc["eps"], eps)
        if pending is not None:
            _, h = add_rms_norm(h, pending, params["norm_f"]["weight"], eps)
        else:
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


def _segments(cfg: ModelConfig, blocks, calls) -> dict:
    """{first depth: end depth} of the runs of >= 2 consecutive blocks that a mixer's ``stack_decode``
    can run in one launch: the same mixer spec with the same settings, no FFN, no shared-block call,
    plain pre-norm residual blocks (e.g. the Mamba-2 stretches between a Zamba2-style model's
    attention blocks, or every block of a pure Mamba-2 stack)."""
    if not blocks or cfg.block_style != "pre_norm" or cfg.residual_multiplier != 1.0 or cfg.residual_scales:
        return {}

    def fits(i):
        m, ms, f, _ = blocks[i]
        return m is not None and m.stack_decode is not None and f is None and i not in calls

    out, i = {}, 0
    while i < len(blocks):
        j = i
        while j < len(blocks) and fits(j) and blocks[j][0] is blocks[i][0] and blocks[j][1] == blocks[i][1]:
            j += 1
        if j - i >= 2:
            out[i] = j
        i = max(j, i + 1)
    return out


# Stack every stretch of a hybrid (see prepare_decode), not only a single one. Each persistent launch
# gets a barrier buffer of its own size (`tag`): with one shared size, mx.compile merged the two
# launches' identical zeroed buffers and MLX-CUDA returned wrong logits (session 4). The GPU test
# (tests/metal/test_kernels_gpu.py::test_hybrid_mamba2_stretches_decode_in_one_launch_each) passes
# with it on (H100, session 6).
MULTI_STRETCH = True


def prepare_decode(cfg: ModelConfig, params: dict) -> dict:
    """Params for fast decoding: for each run of blocks whose mixer has a whole-stack decode
    (`LayerSpec.stack_prepare` / `stack_decode`, e.g. Mamba-2; see `_segments`: a pure Mamba-2
    stack is one run, a hybrid has one per stretch between its other layers), a copy of the tree
    with each run's weights stacked under ``params["decode_stack"][str(first depth)]`` and the
    layers' big weights replaced by views of the stacks (the mixer's ``stack_prepare`` picks them),
    so the returned tree holds one copy of them (drop the original tree to free the old buffers).
    Otherwise ``params`` unchanged. Inference only: transform (quantize, LoRA-merge) before
    preparing, and do not train or save the prepared tree."""
    if "decode_stack" in params:
        return params
    blocks = resolve(cfg)
    segments = _segments(cfg, blocks, {} if cfg.shared is None else cfg.shared.calls())
    if len(segments) != 1 and not MULTI_STRETCH:
        return params
    layers, stacks = list(params["layers"]), {}
    for i0, i1 in segments.items():
        prepared = blocks[i0][0].stack_prepare(layers[i0:i1], blocks[i0][1])
        if prepared is not None:
            stacks[str(i0)], layers[i0:i1] = prepared
    if not stacks:
        return params
    out = {**params, "layers": layers, "decode_stack": stacks}
    mx.eval(out)
    return out

"""Multi-head attention with RoPE: MHA / GQA / MQA, full causal or sliding window.

    q, k, v = x Wq, x Wk, x Wv                      (Hq, Hkv, Hkv heads of head_dim; Hkv | Hq)
    q, k = norm(q), norm(k)                         (optional per-head RMSNorm, Qwen3 / OLMo-2)
    q, k = rope(q, pos), rope(k, pos)               (partial rotary: first rope_dims features; or none)
    o = softmax(q k^T / sqrt(head_dim) + mask) v ;  out = o Wo        (ops.attention)

Two registered kinds share these functions: ``attention`` (causal over everything) and
``sliding_attention`` (key visible when q_pos - k_pos < window). Parameters follow the Hugging Face
Llama names (q_proj, k_proj, v_proj, o_proj, q_norm, k_norm).

State: k, v (B, Hkv, S, head_dim) in the activation dtype and pos (B,) int32 — the number of
tokens each row has written. The KV buffer is a ring of S slots: absolute position p lives in slot
p mod S, with S = max_len for ``attention`` and S = min(window, max_len) for ``sliding_attention``
(memory bounded by the window). Which position a slot holds follows from pos alone
(``slot_positions``), so rows may sit at different positions and nothing else is stored.

A decode step (T == 1) writes its key into slot pos mod S, then attends over the ring. A chunk
(T > 1) attends over [ring, new keys] — so a chunk longer than the window still sees every key
it needs — and then rebuilds the ring by a gather (each slot takes the newest position that maps
to it). An optional state entry ``valid`` (B,) int32 marks only the first valid[b] tokens of the
call as real: padded tokens are never written and never seen by real queries, and pos advances
by valid.
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from alloy.layers.common import dense, live_mask
from alloy.layers.registry import LayerSettings, register_mixer
from alloy.ops.attention import attention, causal_mask, visibility_mask
from alloy.ops.norm import rms_norm
from alloy.ops.rope import rope, rope_heads, rope_inv_freq, rope_tables, scale_rotated
from alloy.params import init as I


# On: with RoPE and neither an output gate nor qk_norm, q and k are rotated straight from their
# projections' (B, T, H, D) layout into attention's (B, H, T, D) by `alloy.ops.rope.rope_heads` (on a GPU
# one kernel pass each way, `alloy.metal.rope`, instead of `mx.fast.rope` on a strided transposed view);
# off: transpose + `rope` as before (A/B switch).
ROPE_KERNEL = True


@dataclass(frozen=True)
class AttentionSettings(LayerSettings):
    n_heads: int = 8
    n_kv_heads: int = 0  # 0: same as n_heads (MHA); 1: MQA; otherwise GQA
    head_dim: int = 0  # 0: d_model // n_heads
    window: int = 0  # sliding window in tokens; 0 only for "attention", > 0 for "sliding_attention"
    rope: bool = True  # False: NoPE
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    rope_traditional: bool = False
    rope_type: str = "default"  # "default" | "linear" | "llama3" | "yarn" (long-context frequency rescaling)
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    rope_beta_fast: float = 32.0  # yarn: frequency ramp bounds (turns over the original context)
    rope_beta_slow: float = 1.0
    rope_attention_factor: float = 1.0  # yarn: the rotated q/k dims are scaled by this (cos/sin x factor)
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    norm_eps: float = 1e-6
    scale: float = 0.0  # softmax scale; 0: head_dim ** -0.5 (Granite's attention_multiplier sets it)
    output_gate: bool = False  # o = o * sigmoid(gate), gate from q_proj (per head [q | gate]; Qwen3-Next)
    d_out: int = 0  # o_proj output width; 0: d_model (Zamba2's shared block reads 2*d_model, writes d_model)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def rope_dims(self) -> int:
        return int(self.hd * self.partial_rotary_factor) // 2 * 2

    def validate(self):
        if not isinstance(self.n_heads, int) or self.n_heads <= 0:
            raise ValueError(f"n_heads must be a positive int, got {self.n_heads!r}")
        if not isinstance(self.n_kv_heads, int) or self.n_kv_heads < 0:
            raise ValueError(f"n_kv_heads must be a non-negative int (0 = n_heads), got {self.n_kv_heads!r}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_kv_heads {self.kv_heads} must divide n_heads {self.n_heads}")
        if self.head_dim == 0 and self.d_model % self.n_heads:
            raise ValueError(f"n_heads {self.n_heads} must divide d_model {self.d_model} (or set head_dim)")
        if not isinstance(self.d_out, int) or self.d_out < 0:
            raise ValueError(f"d_out must be a non-negative int (0 = d_model), got {self.d_out!r}")
        if self.rope_type not in ("default", "linear", "llama3", "yarn"):
            raise ValueError(f"rope_type must be 'default', 'linear', 'llama3' or 'yarn', got {self.rope_type!r}")
        if not self.rope_attention_factor > 0:
            raise ValueError(f"rope_attention_factor must be > 0, got {self.rope_attention_factor!r}")
        if self.rope_type != "default" and not self.rope_factor > 0:
            raise ValueError(f"rope_factor must be > 0, got {self.rope_factor!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or self.scale < 0:
            raise ValueError(f"scale must be a non-negative number (0 = head_dim ** -0.5), got {self.scale!r}")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ValueError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor!r}")
        self.check_window()

    def check_window(self):
        if self.window != 0:
            raise ValueError(f"window must be 0 for attention (use kind sliding_attention), got {self.window!r}")


@dataclass(frozen=True)
class SlidingAttentionSettings(AttentionSettings):
    window: int = 4096

    def check_window(self):
        if not isinstance(self.window, int) or self.window <= 0:
            raise ValueError(f"window must be a positive int for sliding_attention, got {self.window!r}")


def init(key, cfg: AttentionSettings) -> dict:
    k = I.split(key, 4)
    hq, hk, hd = cfg.n_heads, cfg.kv_heads, cfg.hd
    p = {
        "q_proj": I.linear(k[0], cfg.d_model, hq * hd * (2 if cfg.output_gate else 1), bias=cfg.qkv_bias),
        "k_proj": I.linear(k[1], cfg.d_model, hk * hd, bias=cfg.qkv_bias),
        "v_proj": I.linear(k[2], cfg.d_model, hk * hd, bias=cfg.qkv_bias),
        "o_proj": I.linear(k[3], hq * hd, cfg.d_out or cfg.d_model, bias=cfg.o_bias),
    }
    if cfg.qk_norm:
        p["q_norm"] = {"weight": mx.ones((hd,))}
        p["k_norm"] = {"weight": mx.ones((hd,))}
    return p


def init_state(cfg: AttentionSettings, batch: int, max_len: int, dtype=mx.float32) -> dict:
    slots = min(cfg.window, max_len) if cfg.window else max_len
    shape = (batch, cfg.kv_heads, slots, cfg.hd)
    return {"k": mx.zeros(shape, dtype=dtype), "v": mx.zeros(shape, dtype=dtype),
            "pos": mx.zeros((batch,), dtype=mx.int32)}


def _heads(y, n, hd):
    B, T, _ = y.shape
    return y.reshape(B, T, n, hd).transpose(0, 2, 1, 3)  # (B, n, T, hd)


def slot_positions(end: mx.array, slots: int) -> mx.array:
    """(B, S) absolute position held by each ring slot once ``end`` (B,) tokens are written:
    the newest p < end with p = slot (mod S); negative where the slot is still empty."""
    e = end[:, None].astype(mx.int32) - 1
    return e - mx.remainder(e - mx.arange(slots, dtype=mx.int32)[None, :], slots)


# A quantized KV ring (``alloy.inference.quantize_kv``) stores each of k / v as the affine group
# quantization of its last axis: {"q": uint32 packed, "scales", "biases"} (mx.quantize layout); bits
# and group size are read off the shapes. New tokens are quantized once when written; ring entries
# move as packed rows (never re-quantized); attention reads the dequantized ring.


def _kv_layout(entry: dict, hd: int) -> tuple[int, int]:
    return entry["q"].shape[-1] * 32 // hd, hd // entry["scales"].shape[-1]


def _kv_read(entry, hd: int, dtype):
    """The ring as (B, H, S, hd) values in ``dtype``: the array itself or its dequantized form."""
    if not isinstance(entry, dict):
        return entry.astype(dtype)
    bits, gs = _kv_layout(entry, hd)
    return mx.dequantize(entry["q"], entry["scales"], entry["biases"], group_size=gs, bits=bits).astype(dtype)


def _kv_store(x, entry):
    """New values in the ring's storage format (cast, or quantized like ``entry``)."""
    if not isinstance(entry, dict):
        return x.astype(entry.dtype)
    bits, gs = _kv_layout(entry, x.shape[-1])
    qv, sc, bi = mx.quantize(x.astype(entry["scales"].dtype), group_size=gs, bits=bits)
    return {"q": qv, "scales": sc, "biases": bi}


def _kv_map(fn, *entries):
    """``fn`` over the arrays of ring entries (plain arrays or quantized dicts, all the same kind)."""
    if isinstance(entries[0], dict):
        return {name: fn(*(e[name] for e in entries)) for name in entries[0]}
    return fn(*entries)


def _cached_attention(q, k, v, state, window, scale=None):
    """Attention of this call's queries over the ring + new keys; returns (o, new state)."""
    B, _, T, hd = q.shape
    kc, vc, pos = state["k"], state["v"], state["pos"]
    S = (kc["q"] if isinstance(kc, dict) else kc).shape[2]
    valid = state.get("valid")
    n_new = T if valid is None else valid
    live = None if valid is None else live_mask(valid, T)  # (B, T)
    ks, vs = _kv_store(k, kc), _kv_store(v, vc)  # this call's keys / values as stored
    q_pos = pos[:, None] + mx.arange(T, dtype=mx.int32)[None]  # (B, T)
    end = pos + n_new
    if T == 1:  # decode: write slot pos mod S (kept as is for a padded row), attend over the ring
        slot = mx.remainder(pos, S)
        idx = slot[:, None, None, None]
        if live is not None:
            keep = live[:, None, :, None]
            ks = _kv_map(lambda a, c: mx.where(keep, a, mx.take_along_axis(c, idx, axis=2)), ks, kc)
            vs = _kv_map(lambda a, c: mx.where(keep, a, mx.take_along_axis(c, idx, axis=2)), vs, vc)
        kc = _kv_map(lambda c, a: mx.put_along_axis(c, idx, a, axis=2), kc, ks)
        vc = _kv_map(lambda c, a: mx.put_along_axis(c, idx, a, axis=2), vc, vs)
        mask = visibility_mask(q_pos, slot_positions(end, S), window)
        if live is not None:  # a padded query sees its own slot, so its (unused) output stays finite
            mask = mask | (mx.arange(S, dtype=mx.int32)[None] == slot[:, None])[:, None, None, :]
        o = attention(q, _kv_read(kc, hd, q.dtype), _kv_read(vc, hd, q.dtype), scale=scale, mask=mask)
        return o, {"k": kc, "v": vc, "pos": end}
    # chunk: keys = [ring (S), new (T)]; padded new keys are hidden from every query but their own
    # (a quantized ring: this chunk's own keys attend in full precision; they are stored quantized)
    quant = isinstance(kc, dict)
    keys = mx.concatenate([_kv_read(kc, hd, q.dtype), (k if quant else ks).astype(q.dtype)], axis=2)
    vals = mx.concatenate([_kv_read(vc, hd, q.dtype), (v if quant else vs).astype(q.dtype)], axis=2)
    new_pos = q_pos if live is None else mx.where(live, q_pos, -1)
    mask = visibility_mask(q_pos, mx.concatenate([slot_positions(pos, S), new_pos], axis=1), window)
    if live is not None:
        eye = mx.concatenate([mx.zeros((T, S), dtype=mx.bool_), mx.eye(T, dtype=mx.bool_)], axis=1)
        mask = mask | eye[None, None]
    o = attention(q, keys, vals, scale=scale, mask=mask)
    # ring update: slot s takes the newest position p < end with p = s (mod S); new if p >= pos
    p_s = slot_positions(end, S)
    src = mx.where(p_s >= pos[:, None], S + p_s - pos[:, None], mx.arange(S, dtype=mx.int32)[None])
    src = src[:, None, :, None]
    ring = lambda c, a: mx.take_along_axis(mx.concatenate([c, a], axis=2), src, axis=2)  # noqa: E731
    return o, {"k": _kv_map(ring, kc, ks), "v": _kv_map(ring, vc, vs), "pos": end}


def apply(params, x, state, cfg: AttentionSettings):
    B, T, _ = x.shape
    hd = cfg.hd
    offset = 0 if state is None else state["pos"]
    inv = None if not cfg.rope or cfg.rope_type == "default" else rope_inv_freq(
        cfg.rope_dims, cfg.rope_theta, cfg.rope_type, cfg.rope_factor, cfg.rope_low_freq_factor,
        cfg.rope_high_freq_factor, cfg.rope_original_max_position, cfg.rope_beta_fast, cfg.rope_beta_slow)
    # rotate in the projections' layout (see ROPE_KERNEL): q, k come out (B, H, T, hd), rotated
    fused_rope = ROPE_KERNEL and cfg.rope and not cfg.output_gate and not cfg.qk_norm
    if cfg.output_gate:  # q_proj rows per head: [q (hd) | gate (hd)]
        qg = dense(params["q_proj"], x).reshape(B, T, cfg.n_heads, 2 * hd)
        q = qg[..., :hd].transpose(0, 2, 1, 3)
        gate = qg[..., hd:].reshape(B, T, cfg.n_heads * hd)
    elif fused_rope:
        tables = rope_tables(T, offset, cfg.rope_dims, cfg.rope_theta, inv_freq=inv,
                             attention_factor=cfg.rope_attention_factor)
        def rotated(name, n):  # (B, T, n, hd) projection -> (B, n, T, hd) rotated
            return rope_heads(dense(params[name], x).reshape(B, T, n, hd), offset, cfg.rope_dims, cfg.rope_theta,
                              cfg.rope_traditional, inv_freq=inv, attention_factor=cfg.rope_attention_factor,
                              tables=tables)
        q, k = rotated("q_proj", cfg.n_heads), rotated("k_proj", cfg.kv_heads)
    else:
        q = _heads(dense(params["q_proj"], x), cfg.n_heads, hd)
    if not fused_rope:
        k = _heads(dense(params["k_proj"], x), cfg.kv_heads, hd)
    v = _heads(dense(params["v_proj"], x), cfg.kv_heads, hd)
    if cfg.qk_norm:
        q = rms_norm(q, params["q_norm"]["weight"], cfg.norm_eps)
        k = rms_norm(k, params["k_norm"]["weight"], cfg.norm_eps)
    if cfg.rope and not fused_rope:
        q = rope(q, offset, cfg.rope_dims, cfg.rope_theta, cfg.rope_traditional, inv_freq=inv)
        k = rope(k, offset, cfg.rope_dims, cfg.rope_theta, cfg.rope_traditional, inv_freq=inv)
        if cfg.rope_attention_factor != 1.0:  # YaRN's temperature: cos and sin scaled, i.e. the rotated dims
            q, k = (scale_rotated(a, cfg.rope_dims, cfg.rope_attention_factor) for a in (q, k))
    window = cfg.window or None
    scale = cfg.scale or None
    if state is None:
        mask = "causal" if window is None else causal_mask(T, window=window)
        o = attention(q, k, v, scale=scale, mask=mask)
        new_state = None
    else:
        o, new_state = _cached_attention(q, k, v, state, window, scale)
    o = o.transpose(0, 2, 1, 3).reshape(B, T, cfg.n_heads * hd)
    if cfg.output_gate:
        o = o * mx.sigmoid(gate.astype(mx.float32)).astype(o.dtype)
    return dense(params["o_proj"], o), new_state


register_mixer("attention", settings=AttentionSettings, init=init, init_state=init_state,
               state="kv", mask="causal")(apply)
register_mixer("sliding_attention", settings=SlidingAttentionSettings, init=init,
               init_state=init_state, state="kv", mask="sliding")(apply)

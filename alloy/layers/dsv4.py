"""DeepSeek-V4 attention (DeepSeek-AI 2026): shared-KV MQA over a sliding window, with attention
sinks, plus compressed long-range entries — heavily compressed (HCA) or compressed-and-sparse (CSA).

Per token t (one KV head read as both key and value; H query heads of head_dim d; the last
``rope_dims`` features of every head carry interleaved RoPE):

    c_q = rms_norm(x Wqa);   q = rms(c_q Wqb) per head (no weight);   q = rope(q, t)
    kv  = rms_norm(x Wkv);   kv = rope(kv, t)                                       (B, T, d)
    o_h = softmax([q_h K^T / sqrt(d) + mask, sink_h])[:-1] K                           K = V
    o_h = rope(o_h, -t)                     (undoes the rotation the values carried)
    out = Wob [ Wa_g o_g ]_g                (grouped output: heads in o_groups groups, each projected
                                             to o_lora_rank, then mixed to d_model)

The keys K are the sliding window (key s visible to query t when 0 <= t - s < window) and, for
``hca`` / ``csa``, the compressed entries. Entry w pools the tokens of window w (positions
w*m .. w*m + m - 1, m = compress_rate) with a softmax over learned gates per feature:

    C = x Wc,  Z = x Wz + bias[p mod m]
    hca  e_w = rms_norm( sum_{p in w} softmax_p(Z_p) * C_p )                 (C, Z: d wide)
    csa  e_w = rms_norm( sum_{p in w-1 (first half), p in w (second half)} softmax(Z) * C )
         (C, Z: 2d wide; window w-1 lends its first d features and window w its last d,
          so entries overlap over 2m tokens with stride m; window -1 does not exist)
    e_w = rope(e_w, w*m)

Entry w is visible to query t once its window is complete: (w + 1) * m <= t + 1. ``csa`` further
keeps, per query, only the ``index_topk`` visible entries with the best lightning-indexer score

    I(t, w) = sum_h  (x_t W_w)_h / sqrt(Hi) * relu(q^I_{t,h} . k^I_w) / sqrt(d^I)

where k^I_w are entries of a second (csa-style, d^I wide) compressor and q^I = rope(c_q W^I_qb, t).
The compressed branches rotate with their own theta (DeepSeek's ``compress_rope_theta``, optionally
YaRN-scaled), set here as the layer's ``rope_theta`` / ``rope_type``.

Parameters follow the Hugging Face ``DeepseekV4Attention`` names (q_a_proj, q_a_norm, q_b_proj,
kv_proj, kv_norm, o_a_proj, o_b_proj, sinks, compressor.{kv_proj, gate_proj, position_bias,
kv_norm, indexer.{..., q_b_proj, weights_proj}}).

State: ``kv`` (B, S, d) ring of the last S = min(window, max_len) keys (slot p mod S), ``pos`` (B,)
int32; compressed kinds add ``compressor``: ``entries`` (B, max_len // m + 1, d) (the extra row is a
write sink for windows not yet complete), and ``kv`` / ``gate`` (B, R, C) rings of the raw
projections of the last R tokens (R = m for hca, 2m for csa: the open window and, for csa, the one
before it). ``csa`` keeps the same for its indexer. A call of T tokens computes only the (at most
ceil(T / m)) windows that complete inside it from [ring, new tokens], writes them at their entry
index and never revisits the prefix. ``valid`` (B,) in the state marks right padding: padded
tokens are never written, never close a window and are never seen by real queries.
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from alloy.layers.attention import slot_positions
from alloy.layers.common import dense, live_mask
from alloy.layers.registry import LayerSettings, register_mixer
from alloy.ops.attention import attention, visibility_mask
from alloy.ops.norm import rms_norm
from alloy.ops.rope import rope_at, rope_inv_freq
from alloy.params import init as I


@dataclass(frozen=True)
class DSv4Settings(LayerSettings):
    n_heads: int = 8
    head_dim: int = 64
    q_lora_rank: int = 64
    rope_dims: int = 16  # the last rope_dims features of each head rotate (DeepSeek's qk_rope_head_dim)
    rope_theta: float = 10000.0
    rope_type: str = "default"  # "default" | "yarn" (frequencies only, as DeepSeek-V4 applies it)
    rope_factor: float = 1.0
    rope_original_max_position: int = 4096
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    window: int = 128
    o_groups: int = 8
    o_lora_rank: int = 64
    norm_eps: float = 1e-6

    compressed = False  # class facts, not settings
    overlap = False

    def validate(self):
        for f in ("n_heads", "head_dim", "q_lora_rank", "window", "o_groups", "o_lora_rank"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{f} must be a positive int, got {v!r}")
        if not isinstance(self.rope_dims, int) or self.rope_dims < 0 or self.rope_dims % 2 \
                or self.rope_dims > self.head_dim:
            raise ValueError(f"rope_dims must be an even int in [0, head_dim={self.head_dim}], got {self.rope_dims!r}")
        if (self.n_heads * self.head_dim) % self.o_groups:
            raise ValueError(f"o_groups {self.o_groups} must divide n_heads * head_dim = {self.n_heads * self.head_dim}")
        if self.rope_type not in ("default", "yarn"):
            raise ValueError(f"rope_type must be 'default' or 'yarn', got {self.rope_type!r}")
        if self.rope_type == "yarn" and not (self.rope_factor > 0 and self.rope_original_max_position > 0):
            raise ValueError("yarn rope needs rope_factor > 0 and rope_original_max_position > 0")
        if not 0 < self.norm_eps < 1:
            raise ValueError(f"norm_eps must be in (0, 1), got {self.norm_eps!r}")
        self.validate_kind()

    def validate_kind(self):
        pass

    def inv_freq(self) -> mx.array:
        return rope_inv_freq(self.rope_dims, self.rope_theta, self.rope_type, self.rope_factor,
                             original_max_position=self.rope_original_max_position,
                             beta_fast=self.rope_beta_fast, beta_slow=self.rope_beta_slow)


@dataclass(frozen=True)
class HCASettings(DSv4Settings):
    compress_rate: int = 128
    rope_theta: float = 160000.0

    compressed = True

    def validate_kind(self):
        if not isinstance(self.compress_rate, int) or isinstance(self.compress_rate, bool) or self.compress_rate <= 0:
            raise ValueError(f"compress_rate must be a positive int, got {self.compress_rate!r}")


@dataclass(frozen=True)
class CSASettings(HCASettings):
    compress_rate: int = 4
    index_n_heads: int = 8
    index_head_dim: int = 32
    index_topk: int = 64

    overlap = True

    def validate_kind(self):
        super().validate_kind()
        for f in ("index_n_heads", "index_head_dim", "index_topk"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{f} must be a positive int, got {v!r}")
        if self.rope_dims > self.index_head_dim:
            raise ValueError(f"rope_dims {self.rope_dims} exceeds index_head_dim {self.index_head_dim}")


# -- parameters and state -----------------------------------------------------------------------
def _compressor_init(key, D, d, m, wide) -> dict:
    k = I.split(key, 2)
    c = 2 * d if wide else d
    return {"kv_proj": I.linear(k[0], D, c), "gate_proj": I.linear(k[1], D, c),
            "position_bias": mx.zeros((m, c)), "kv_norm": {"weight": mx.ones((d,))}}


def init(key, cfg: DSv4Settings) -> dict:
    k = I.split(key, 8)
    D, H, d, g = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.o_groups
    p = {"q_a_proj": I.linear(k[0], D, cfg.q_lora_rank), "q_a_norm": {"weight": mx.ones((cfg.q_lora_rank,))},
         "q_b_proj": I.linear(k[1], cfg.q_lora_rank, H * d),
         "kv_proj": I.linear(k[2], D, d), "kv_norm": {"weight": mx.ones((d,))},
         "o_a_proj": I.linear(k[3], H * d // g, g * cfg.o_lora_rank),
         "o_b_proj": I.linear(k[4], g * cfg.o_lora_rank, D),
         "sinks": mx.zeros((H,))}
    if cfg.compressed:
        comp = _compressor_init(k[5], D, d, cfg.compress_rate, cfg.overlap)
        if cfg.overlap:
            Hi, di = cfg.index_n_heads, cfg.index_head_dim
            idx = _compressor_init(k[6], D, di, cfg.compress_rate, True)
            kq = I.split(k[7], 2)
            idx["q_b_proj"] = I.linear(kq[0], cfg.q_lora_rank, Hi * di)
            idx["weights_proj"] = I.linear(kq[1], D, Hi)
            comp["indexer"] = idx
        p["compressor"] = comp
    return p


def _compressor_state(batch, max_len, d, m, wide, dtype) -> dict:
    R, c = (2 * m, 2 * d) if wide else (m, d)
    return {"entries": mx.zeros((batch, max_len // m + 1, d), dtype=dtype),
            "kv": mx.zeros((batch, R, c), dtype=dtype), "gate": mx.zeros((batch, R, c), dtype=dtype)}


def init_state(cfg: DSv4Settings, batch: int, max_len: int, dtype=mx.float32) -> dict:
    s = {"kv": mx.zeros((batch, min(cfg.window, max_len), cfg.head_dim), dtype=dtype),
         "pos": mx.zeros((batch,), dtype=mx.int32)}
    if cfg.compressed:
        m = cfg.compress_rate
        s["compressor"] = _compressor_state(batch, max_len, cfg.head_dim, m, cfg.overlap, dtype)
        if cfg.overlap:
            s["compressor"]["indexer"] = _compressor_state(batch, max_len, cfg.index_head_dim, m, True, dtype)
    return s


# -- the compressor -------------------------------------------------------------------------------
def _ring_update(ring, new, pos, end):
    """Ring (B, R, C) after positions pos .. end-1 (new: (B, T, C) from pos): slot s holds the
    newest p < end with p = s (mod R)."""
    R = ring.shape[1]
    p_s = slot_positions(end, R)
    src = mx.where(p_s >= pos[:, None], R + p_s - pos[:, None], mx.arange(R, dtype=mx.int32)[None])
    return mx.take_along_axis(mx.concatenate([ring, new.astype(ring.dtype)], axis=1), src[..., None], axis=1)


def _compress(p, x, d, m, wide, inv_freq, eps, state, pos, end):
    """Entries of the windows that complete in this call.

    Returns (entries (B, J, d), window index w (B, J) int32, ready (B, J) bool, new state or None).
    Without a state the call starts at position 0 and J = T // m (all complete); with one, the
    candidates are the ceil(T / m) windows w = pos // m + j and ``ready`` says which complete."""
    B, T, _ = x.shape
    kv, gate = dense(p["kv_proj"], x), dense(p["gate_proj"], x)
    c = kv.shape[-1]
    if state is None:
        src_kv, src_gate, R, J = kv, gate, 0, T // m
    else:
        R = state["kv"].shape[1]
        src_kv = mx.concatenate([state["kv"].astype(kv.dtype), kv], axis=1)
        src_gate = mx.concatenate([state["gate"].astype(gate.dtype), gate], axis=1)
        J = -(-T // m)
    w = pos[:, None] // m + mx.arange(J, dtype=mx.int32)[None]  # (B, J)
    slot = mx.arange(m, dtype=mx.int32)

    def gather(first, feats):
        """Tokens first + slot (B, J, m) -> their kv and biased gates, features ``feats``."""
        tok = first[..., None] + slot  # absolute positions
        idx = mx.where(tok >= pos[:, None, None], R + tok - pos[:, None, None], mx.remainder(tok, max(R, 1)))
        idx = mx.clip(idx, 0, R + T - 1).reshape(B, J * m, 1)
        take = lambda a: mx.take_along_axis(a, idx, axis=1).reshape(B, J, m, c)[..., feats]  # noqa: E731
        z = take(src_gate).astype(mx.float32) + p["position_bias"][:, feats].astype(mx.float32)
        return take(src_kv), mx.where((tok >= 0)[..., None], z, -mx.inf)

    # 1. the window's own tokens (for csa: their second half of features), and for csa the previous
    #    window's tokens with their first half
    vals, z = gather(w * m, slice(c - d, c))
    if wide:
        va, za = gather((w - 1) * m, slice(0, d))
        vals, z = mx.concatenate([va, vals], axis=2), mx.concatenate([za, z], axis=2)
    # 2. softmax-gated pooling over the window, norm, rope at the window's first position
    e = (vals * mx.softmax(z, axis=2).astype(vals.dtype)).sum(axis=2)
    e = rms_norm(e, p["kv_norm"]["weight"], eps)
    if inv_freq is not None:
        e = rope_at(e[:, None], w * m, inv_freq, traditional=True, tail=True)[:, 0]
    ready = (w + 1) * m <= end[:, None]
    if state is None:
        return e, w, ready, None
    ent = state["entries"]
    target = mx.where(ready, w, ent.shape[1] - 1)[..., None]  # not ready: the spare last row
    new = {"entries": mx.put_along_axis(ent, target, e.astype(ent.dtype), axis=1),
           "kv": _ring_update(state["kv"], kv, pos, end), "gate": _ring_update(state["gate"], gate, pos, end)}
    return e, w, ready, new


def _entries(p, x, d, m, wide, inv_freq, eps, state, pos, end):
    """(keys (B, N, d), entry index (N,), new state): this call's entries without a state, the
    whole entry buffer (every window so far; later rows masked by position) with one."""
    e, w, _, new = _compress(p, x, d, m, wide, inv_freq, eps, state, pos, end)
    if state is None:
        return e, mx.arange(e.shape[1], dtype=mx.int32), None
    n = new["entries"].shape[1] - 1
    return new["entries"][:, :n].astype(x.dtype), mx.arange(n, dtype=mx.int32), new


def _index_select(p, x, c_q, q_pos, visible, cfg: CSASettings, inv_freq, state, pos, end):
    """The lightning indexer: (B, T, N) bool, True for the index_topk best visible entries."""
    B, T, _ = x.shape
    Hi, di = cfg.index_n_heads, cfg.index_head_dim
    keys, _, new = _entries(p, x, di, cfg.compress_rate, True, inv_freq, cfg.norm_eps, state, pos, end)
    q = dense(p["q_b_proj"], c_q).reshape(B, T, Hi, di).transpose(0, 2, 1, 3)
    if inv_freq is not None:
        q = rope_at(q, q_pos, inv_freq, traditional=True, tail=True)
    dots = mx.maximum(q.astype(mx.float32) @ keys.astype(mx.float32)[:, None].swapaxes(-1, -2), 0.0)  # (B,Hi,T,N)
    wts = dense(p["weights_proj"], x).astype(mx.float32) * Hi ** -0.5  # (B, T, Hi)
    score = (dots * (di ** -0.5) * wts.transpose(0, 2, 1)[..., None]).sum(axis=1)  # (B, T, N)
    score = mx.where(visible, score, -mx.inf)
    N = score.shape[-1]
    k = min(cfg.index_topk, N)
    top = mx.stop_gradient(mx.argpartition(-score, kth=k - 1, axis=-1)[..., :k])
    chosen = mx.put_along_axis(mx.zeros((B, T, N), dtype=mx.bool_), top, mx.array(True), axis=-1)
    return chosen & visible, new


# -- the layer ---------------------------------------------------------------------------------------
def _grouped_out(params, o, cfg: DSv4Settings):
    """o (B, T, H*d) -> out (B, T, D): per group g, o_g Wa_g (o_lora_rank), then Wob."""
    B, T, _ = o.shape
    g, r = cfg.o_groups, cfg.o_lora_rank
    wa = params["o_a_proj"]["weight"].reshape(g, r, -1)
    y = mx.einsum("btgi,gri->btgr", o.reshape(B, T, g, -1), wa.astype(o.dtype))
    return dense(params["o_b_proj"], y.reshape(B, T, g * r))


def apply(params, x, state, cfg: DSv4Settings):
    B, T, _ = x.shape
    H, d, W = cfg.n_heads, cfg.head_dim, cfg.window
    inv = cfg.inv_freq() if cfg.rope_dims else None
    pos = mx.zeros((B,), dtype=mx.int32) if state is None else state["pos"]
    valid = None if state is None else state.get("valid")
    end = pos + (T if valid is None else valid)
    q_pos = pos[:, None] + mx.arange(T, dtype=mx.int32)[None]  # (B, T)

    def rot(a, positions):
        return a if inv is None else rope_at(a, positions, inv, traditional=True, tail=True)

    # 1. queries through the low-rank bottleneck (c_q also feeds the indexer), shared key/value
    c_q = rms_norm(dense(params["q_a_proj"], x), params["q_a_norm"]["weight"], cfg.norm_eps)
    q = dense(params["q_b_proj"], c_q).reshape(B, T, H, d).transpose(0, 2, 1, 3)
    q = rot(rms_norm(q, None, cfg.norm_eps), q_pos)
    kv = rms_norm(dense(params["kv_proj"], x), params["kv_norm"]["weight"], cfg.norm_eps)
    kv = rot(kv[:, None], q_pos)[:, 0]  # (B, T, d)

    # 2. the sliding window: [ring, new] keys with a visibility mask
    if state is None:
        keys, key_pos = kv, q_pos
        new_state = None
    else:
        ring = state["kv"]
        live_pos = q_pos if valid is None else mx.where(live_mask(valid, T), q_pos, -1)
        keys = mx.concatenate([ring.astype(kv.dtype), kv], axis=1)
        key_pos = mx.concatenate([slot_positions(pos, ring.shape[1]), live_pos], axis=1)
        new_state = {"kv": _ring_update(ring, kv, pos, end), "pos": end}
    mask = visibility_mask(q_pos, key_pos, W)  # (B, 1, T, S)

    # 3. compressed entries, visible once their window is complete (csa: the indexer's top-k only)
    if cfg.compressed:
        m = cfg.compress_rate
        cs = None if state is None else state["compressor"]
        comp_p = params["compressor"]
        ents, idx, new_c = _entries(comp_p, x, d, m, cfg.overlap, inv, cfg.norm_eps, cs, pos, end)
        if ents.shape[1]:
            visible = (idx[None, None] + 1) * m <= q_pos[..., None] + 1  # (B, T, N)
            if cfg.overlap:
                visible, new_i = _index_select(comp_p["indexer"], x, c_q, q_pos, visible, cfg, inv,
                                               None if cs is None else cs["indexer"], pos, end)
                if new_c is not None:
                    new_c["indexer"] = new_i
            keys = mx.concatenate([keys, ents], axis=1)
            mask = mx.concatenate([mask, visible[:, None]], axis=-1)
        elif new_c is not None and cfg.overlap:  # no entry fits in max_len: keep the indexer's rings
            _, _, new_i = _entries(comp_p["indexer"], x, cfg.index_head_dim, m, True, inv, cfg.norm_eps,
                                   cs["indexer"], pos, end)
            new_c["indexer"] = new_i
        if new_state is not None:
            new_state["compressor"] = new_c

    # 4. attention with sinks over the one shared head; undo the values' rotation; grouped output
    kk = keys[:, None]
    o = attention(q, kk, kk, scale=d ** -0.5, mask=mask, sinks=params["sinks"])
    o = rot(o, -q_pos).transpose(0, 2, 1, 3).reshape(B, T, H * d)
    return _grouped_out(params, o, cfg), new_state


register_mixer("dsv4_sliding", settings=DSv4Settings, init=init, init_state=init_state, state="kv",
               mask="sliding")(apply)
register_mixer("hca", settings=HCASettings, init=init, init_state=init_state, state="kv", mask="sliding")(apply)
register_mixer("csa", settings=CSASettings, init=init, init_state=init_state, state="kv", mask="sliding")(apply)

__all__ = ["DSv4Settings", "HCASettings", "CSASettings", "init", "init_state", "apply"]

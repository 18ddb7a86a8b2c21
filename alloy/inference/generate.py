"""``alloy.generate``: streaming generation over a preallocated, fixed-shape state.

    state = model.init_state(B, max_len)                       # KV rings + conv + SSM, fixed shapes
    for chunk in prompt (chunked prefill, right-padded rows, per-row ``valid`` counts):
        logits, state = apply(params, chunk, state)            # compiled, one trace per chunk shape
    token = sample(last real logits of each row)
    repeat:  token, logprob, state, key, counts = step(params, token, state, key, counts)
                                                               # compiled, one trace per (B, dtype)

Rows of a batch may have different prompt lengths: prompts are right-padded and every prefill chunk
carries ``valid`` (B,) — the number of real tokens of each row in the chunk — which the layers honour
(no KV write, dt = 0, conv tail at the row's end), so each row's state stops at its true end and its
output equals generating it alone. Chunk boundaries sit at absolute multiples of ``prefill_chunk``
(plus any requested snapshot boundaries); a chunk shorter than ``prefill_chunk`` is padded to the next
power of two (>= 8) so prompts of any length reuse a handful of traces.

The decode step runs one step ahead of the Python loop (``mx.async_eval``), so detokenization and
stop checks overlap the device work.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

import mlx.core as mx

from alloy.inference.sampling import SamplingParams, make_sampler, token_counts, update_counts

# How many times each compiled function's Python body ran (== traces). Tests read it.
TRACE_COUNTS: collections.Counter = collections.Counter()
# The default state length is rounded up to a multiple of this, so calls with nearby prompt and
# generation lengths share one state shape and hence one decode trace.
MAX_LEN_QUANTUM = 256
_COMPILED: dict = {}


@dataclass(frozen=True)
class GenerationEvent:
    """One generated token of one row.

    row: batch row; index: 0-based position among the row's generated tokens; token, logprob:
    the token id and log p(token) under the model's raw distribution; text: the decoded text this
    token completes (None without a tokenizer; "" while bytes of a character or a possible stop
    string are held back; never a broken UTF-8 sequence); finish_reason: None, "stop" (a stop
    token, whose text is not emitted), "stop_string" (text cut before the stop string) or "length";
    prompt_tokens: the row's prompt length; prompt_time: seconds of prefill; ttft: seconds from the
    call to the first token; elapsed: seconds from the call to this event.
    """

    row: int
    index: int
    token: int
    logprob: float
    text: str | None
    finish_reason: str | None
    prompt_tokens: int
    prompt_time: float
    ttft: float
    elapsed: float


class ByteTokenizer:
    """Byte-level tokenizer: ids 0..255 are UTF-8 bytes (ids >= 256 decode to nothing)."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------------
# compiled pieces (cached per model function and sampler, so repeated calls reuse their traces)

def compiled_apply(model) -> Callable:
    """mx.compile(model.apply), counted under TRACE_COUNTS["apply"]; cached per model."""
    key = ("apply", model.apply)
    if key not in _COMPILED:
        apply = model.apply

        def counted(params, tokens, state):
            TRACE_COUNTS["apply"] += 1
            return apply(params, tokens, state)

        _COMPILED[key] = mx.compile(counted)
    return _COMPILED[key]


def forget_compiled(apply_fn) -> int:
    """Drop the compiled functions cached for the model function ``apply_fn``; returns how many.

    MLX keeps each compiled function's traces in a cache owned by the thread that compiled it, and
    frees that cache when the thread's C++ state is torn down. Traces of functions with custom
    gradients (the SSM ops) hold Python callbacks whose release needs the interpreter, so a worker
    thread that compiled them must drop them before it ends: torn down later, while the interpreter
    is finalizing, the release aborts the process ("terminate called without an active exception")."""
    keys = [k for k in _COMPILED if k[1] is apply_fn]
    for k in keys:
        del _COMPILED[k]
    return len(keys)


def compiled_step(model, sampling: SamplingParams) -> Callable:
    """step(params, token (B,), state, key, counts) -> (token, logprob, state, key, counts).

    One decode step plus sampling, compiled; traces once per (batch, dtype) for a given model and
    sampling params (counted under TRACE_COUNTS["decode"])."""
    key = ("decode", model.apply, sampling)
    if key not in _COMPILED:
        apply = model.apply
        sampler = make_sampler(sampling, vocab_size=model.config.vocab_size)

        def step(params, token, state, rng, counts):
            TRACE_COUNTS["decode"] += 1
            logits, state = apply(params, token[:, None], state)
            rng, sub = mx.random.split(rng)
            nxt, logprob = sampler(sub, logits[:, -1], counts)
            if sampling.uses_counts:
                counts = update_counts(counts, nxt)
            return nxt, logprob, state, rng, counts

        _COMPILED[key] = mx.compile(step)
    return _COMPILED[key]


def prepare_decode(model, params) -> dict:
    """``params`` ready for the fastest decode path of ``model``: for a model whose every block can
    run in one whole-stack launch (a pure Mamba-2 stack on CUDA), the layer weights stacked once under
    ``"decode_stack"`` (the big projections become views of the stacks, so drop the original tree
    to keep one copy); other models' params unchanged. Inference only (see
    ``alloy.layers.stack.prepare_decode``); quantize / merge LoRA before preparing."""
    from alloy.layers.stack import prepare_decode as prepare

    return prepare(model.config, params)


def _bucket(n: int, chunk: int) -> int:
    """Padded length of an n-token chunk: the next power of two >= max(n, 8), at most ``chunk``."""
    b = 8
    while b < n:
        b *= 2
    return max(n, min(b, chunk))


def chunk_bounds(start: int, end: int, chunk: int, extra: Sequence[int] = ()) -> list[tuple[int, int]]:
    """[(a, b)] covering [start, end), cut at absolute multiples of ``chunk`` and at ``extra``."""
    cuts = {p for p in range((start // chunk + 1) * chunk, end, chunk)}
    cuts |= {p for p in extra if start < p < end}
    pts = [start, *sorted(cuts), end]
    return list(zip(pts[:-1], pts[1:]))


def prefill(model, params, state, tokens: np.ndarray, lengths: np.ndarray, start: int = 0,
            prefill_chunk: int = 512, boundaries: Sequence[int] = (),
            on_boundary: Callable | None = None):
    """Run right-padded prompts ``tokens`` (B, T) with true ``lengths`` (B,) through ``state``
    from absolute position ``start`` (every row's state is at ``start``).

    Returns (state, last (B, V) float32 logits at each row's last real token). ``on_boundary(p,
    state, last)`` is called after the chunk ending at each absolute position p in ``boundaries``,
    with ``last`` the logits at each row's last real token so far (token p-1 for a row that is
    that long). The returned state has no ``valid`` entry.
    """
    B, T = tokens.shape
    apply = compiled_apply(model)
    last = mx.zeros((B, model.config.vocab_size), dtype=mx.float32)
    lengths = np.asarray(lengths, dtype=np.int64)
    for a, b in chunk_bounds(start, T, prefill_chunk, boundaries):
        n = b - a
        width = _bucket(n, prefill_chunk)
        chunk = np.zeros((B, width), dtype=np.int32)
        chunk[:, :n] = tokens[:, a:b]
        valid = np.clip(lengths - a, 0, n).astype(np.int32)
        logits, state = apply(params, mx.array(chunk), {**state, "valid": mx.array(valid)})
        idx = mx.array(np.maximum(valid - 1, 0))  # each row's last real token in this chunk
        row_last = mx.take_along_axis(logits, idx[:, None, None], axis=1)[:, 0].astype(mx.float32)
        last = mx.where(mx.array(valid > 0)[:, None], row_last, last)
        state = {k: v for k, v in state.items() if k != "valid"}
        if on_boundary is not None and b in boundaries:
            on_boundary(b, state, last)
        mx.eval(last, state)
    return state, last


# --------------------------------------------------------------------------------------------
# streaming text

class TextStream:
    """Incremental detokenization with stop strings for one row.

    ``push(token) -> (delta, stopped)``: decodes the row's ids so far and returns the new text,
    holding back (a) a trailing U+FFFD — an incomplete UTF-8 sequence that the next token may
    complete — and (b) a suffix that could begin a stop string. ``stopped`` is True once a stop
    string appears (the delta then ends right before it). ``flush()`` returns what is held back.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.ids: list[int] = []
        self.decoded = ""  # text of ids already consumed into emitted + pending
        self.pending = ""  # text held back because it may start a stop string

    def push(self, token: int) -> tuple[str, bool]:
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.decoded):
            return "", False  # wait for the rest of the character
        buf = self.pending + text[len(self.decoded):]
        self.decoded = text
        if not self.stop_strings:
            self.pending = ""
            return buf, False
        hits = [i for i in (buf.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            self.pending = ""
            return buf[:min(hits)], True
        hold = 0
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self.pending = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        tail = self.pending + (text[len(self.decoded):] if text.startswith(self.decoded) else "")
        self.pending, self.decoded = "", text
        return tail


# --------------------------------------------------------------------------------------------
# inputs

def as_rows(prompt_ids, tokenizer=None) -> tuple[list[list[int]], bool]:
    """Normalize prompts to ([[ids], ...], single). Accepts ids, a list of id lists, a (T,) or
    (B, T) array, or a string / list of strings when a tokenizer with ``encode`` is given."""
    if isinstance(prompt_ids, str) or (isinstance(prompt_ids, (list, tuple)) and prompt_ids
                                       and all(isinstance(p, str) for p in prompt_ids)):
        if tokenizer is None or not hasattr(tokenizer, "encode"):
            raise ValueError("generate: a text prompt needs a tokenizer with encode()")
        single = isinstance(prompt_ids, str)
        texts = [prompt_ids] if single else list(prompt_ids)
        return [list(tokenizer.encode(t)) for t in texts], single
    if isinstance(prompt_ids, mx.array):
        prompt_ids = np.array(prompt_ids)
    if isinstance(prompt_ids, np.ndarray):
        if prompt_ids.ndim not in (1, 2):
            raise ValueError(f"generate: prompt_ids must be (T,) or (B, T), got shape {prompt_ids.shape}")
        single = prompt_ids.ndim == 1
        rows = [prompt_ids.tolist()] if single else prompt_ids.tolist()
    elif isinstance(prompt_ids, (list, tuple)) and prompt_ids and isinstance(prompt_ids[0], (list, tuple, np.ndarray, mx.array)):
        rows, single = [np.array(r).reshape(-1).tolist() for r in prompt_ids], False
    elif isinstance(prompt_ids, (list, tuple)):
        rows, single = [list(prompt_ids)], True
    else:
        raise ValueError(f"generate: prompt_ids must be token ids, a list of id lists or an array, "
                         f"got {type(prompt_ids).__name__}")
    for b, r in enumerate(rows):
        if not r:
            raise ValueError(f"generate: prompt row {b} is empty (every row needs >= 1 token)")
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in r):
            raise ValueError(f"generate: prompt row {b} must hold int token ids")
    return [[int(t) for t in r] for r in rows], single


def pad_rows(rows: list[list[int]], vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (B, T_max) int32 right-padded with 0, lengths (B,)); checks ids < vocab_size."""
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    out = np.zeros((len(rows), int(lengths.max())), dtype=np.int32)
    for b, r in enumerate(rows):
        a = np.asarray(r, dtype=np.int64)
        if a.min() < 0 or a.max() >= vocab_size:
            raise ValueError(f"generate: prompt row {b} has token ids outside [0, {vocab_size})")
        out[b, :len(r)] = a
    return out, lengths


def resolve_sampling(sampling, kwargs) -> SamplingParams:
    if sampling is None:
        return SamplingParams(**kwargs)
    if kwargs:
        raise ValueError(f"generate: pass sampling=SamplingParams(...) or sampling keywords, not both "
                         f"({sorted(kwargs)})")
    if isinstance(sampling, dict):
        return SamplingParams(**sampling)
    if not isinstance(sampling, SamplingParams):
        raise ValueError(f"generate: sampling must be SamplingParams or a dict, got {type(sampling).__name__}")
    return sampling


# --------------------------------------------------------------------------------------------

def generate(model, params, prompt_ids, max_tokens: int = 64, sampling: SamplingParams | None = None,
             *, stop_tokens: Sequence[int] = (), stop_strings: Sequence[str] = (), tokenizer=None,
             seed: int = 0, prefill_chunk: int = 512, max_len: int | None = None,
             prefix_cache=None, kv_bits: int | None = None, kv_group_size: int | None = None,
             **sampling_kwargs) -> Iterator[GenerationEvent]:
    """Stream ``GenerationEvent``s for one prompt or a batch of prompts (see module docstring).

    prompt_ids: ids, a list of id lists (rows may differ in length), a (T,)/(B, T) array, or text
    with a tokenizer. sampling: ``SamplingParams`` or its fields as keywords (temperature,
    top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty, logit_bias);
    default greedy. stop_tokens end a row (the stop token's event carries finish_reason "stop");
    stop_strings need a tokenizer. seed: the ``mx.random.key`` of the sampling stream.
    max_len: the state's length (default: longest prompt + max_tokens rounded up to a multiple of
    ``MAX_LEN_QUANTUM``; it must cover them).
    prefix_cache: an ``alloy.inference.PrefixCache`` (batch 1): resume from the longest cached
    prefix of the prompt, snapshot at its boundaries, and snapshot the state after the reply when
    the row finishes (so the next chat turn, prompt + reply + more, resumes after the reply).
    kv_bits: 4 or 8 stores the attention KV rings quantized (``quantize_kv``; groups of
    ``kv_group_size``); None keeps them in the model dtype.
    """
    t0 = time.perf_counter()
    sp = resolve_sampling(sampling, sampling_kwargs)
    V = model.config.vocab_size
    sp.check_vocab(V)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"generate: max_tokens must be a positive int, got {max_tokens!r}")
    if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1:
        raise ValueError(f"generate: prefill_chunk must be a positive int, got {prefill_chunk!r}")
    if stop_strings and (tokenizer is None or not hasattr(tokenizer, "decode")):
        raise ValueError("generate: stop_strings need a tokenizer with decode()")
    stop_set = {int(t) for t in stop_tokens}
    rows, _ = as_rows(prompt_ids, tokenizer)
    tokens, lengths = pad_rows(rows, V)
    B = len(rows)
    need = int(lengths.max()) + max_tokens
    max_len = -(-need // MAX_LEN_QUANTUM) * MAX_LEN_QUANTUM if max_len is None else max_len
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < need:
        raise ValueError(f"generate: max_len must be an int >= longest prompt + max_tokens = {need}, "
                         f"got {max_len!r}")

    # 1. prefill (optionally resuming from a cached prefix)
    if prefix_cache is not None:
        if B != 1:
            raise ValueError(f"generate: prefix_cache works with one prompt, got a batch of {B}")
        state, last = prefix_cache.prefill(model, params, rows[0], max_len, prefill_chunk,
                                           kv_bits=kv_bits, kv_group_size=kv_group_size)
    else:
        state = model.init_state(B, max_len)
        if kv_bits is not None:
            state = quantize_kv(model, state, kv_bits, kv_group_size)
        state, last = prefill(model, params, state, tokens, lengths, 0, prefill_chunk)
    prompt_time = time.perf_counter() - t0

    # 2. first token from the prompt's last logits, then compiled steps one ahead of this loop
    rng = mx.random.key(seed)
    counts = token_counts(rows, V) if sp.uses_counts else mx.zeros((B, 1), dtype=mx.int32)
    sampler = make_sampler(sp, vocab_size=V)
    rng, sub = mx.random.split(rng)
    tok, logprob = sampler(sub, last, counts)
    if sp.uses_counts:
        counts = update_counts(counts, tok)
    step = compiled_step(model, sp)
    streams = [TextStream(tokenizer, stop_strings) if tokenizer is not None else None for _ in range(B)]
    done = [False] * B
    ttft = None
    reply: list[int] = []  # row 0's tokens, for the end-of-reply snapshot
    for i in range(max_tokens):
        cur = (tok, logprob)
        if i + 1 < max_tokens:
            tok, logprob, state, rng, counts = step(params, tok, state, rng, counts)
            mx.async_eval(tok, logprob)
        ids, lps = cur[0].tolist(), cur[1].tolist()
        now = time.perf_counter()
        ttft = now - t0 if ttft is None else ttft
        for b in range(B):
            if done[b]:
                continue
            t = ids[b]
            reason, text = None, None
            if t in stop_set:
                reason = "stop"
                text = streams[b].flush() if streams[b] else None
            elif streams[b] is not None:
                text, hit = streams[b].push(t)
                if hit:
                    reason = "stop_string"
            if reason is None and i + 1 == max_tokens:
                reason = "length"
                if streams[b] is not None:
                    text += streams[b].flush()
            done[b] = reason is not None
            if prefix_cache is not None:
                reply.append(t)
                if done[b]:  # the state has consumed the reply up to the last step taken
                    steps = i + 1 if i + 1 < max_tokens else i
                    kv = None if kv_bits is None else (kv_bits, kv_group_size)
                    prefix_cache.insert(prefix_cache.signature(model, params, max_len, kv),
                                        rows[0] + reply[:steps], state, None)
            yield GenerationEvent(b, i, t, float(lps[b]), text, reason, int(lengths[b]), prompt_time,
                                  ttft, now - t0)
        if all(done):
            return


KV_KINDS = ("attention", "sliding_attention")  # mixers whose KV ring may be stored quantized


def quantize_kv(model, state: dict, bits: int = 8, group_size: int | None = None) -> dict:
    """The state with every attention KV ring (``attention`` / ``sliding_attention`` layers and
    Zamba-style shared attention calls) stored as affine group-quantized values (``bits`` 4 or 8,
    groups of ``group_size`` along the head dimension — default min(64, head dim) — scales in the
    cache dtype): new tokens are
    quantized once when written, attention reads the dequantized ring (``alloy.layers.attention``).
    Other state (SSM, conv, MLA latents, DeepSeek-V4 caches) is unchanged."""
    if bits not in (4, 8):
        raise ValueError(f"quantize_kv: bits must be 4 or 8, got {bits!r}")
    cfg = model.config

    def q(entry):
        k = entry["k"]
        hd = k.shape[-1]
        gs = min(64, hd) if group_size is None else group_size
        if hd % gs or gs not in (32, 64, 128):
            raise ValueError(f"quantize_kv: group_size {gs} must be 32, 64 or 128 and divide the head dim {hd}")
        out = dict(entry)
        for name in ("k", "v"):
            qv, sc, bi = mx.quantize(entry[name], group_size=gs, bits=bits)
            out[name] = {"q": qv, "scales": sc, "biases": bi}
        return out

    layers = []
    for i, ls in enumerate(state["layers"]):
        ls = dict(ls)
        if cfg.mixer_kind(i) in KV_KINDS and not isinstance(ls["mixer"]["k"], dict):
            ls["mixer"] = q(ls["mixer"])
        if "shared" in ls and not isinstance(ls["shared"]["k"], dict):
            ls["shared"] = q(ls["shared"])
        layers.append(ls)
    return {**state, "layers": layers}

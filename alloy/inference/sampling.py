"""Sampling: pure functions on logits, composed by a frozen ``SamplingParams``.

Every function maps ``logits (B, V)`` (float) to logits of the same shape, so they compose in any
order; filters set removed tokens to ``-inf``. The order ``make_sampler`` applies is the usual one:

    logits = logits + bias                                    logit bias (token -> additive bias)
    logits = penalties(logits, counts)                        repetition / presence / frequency
    logits = logits / temperature                             (temperature 0: greedy, argmax)
    logits = top_k(logits); top_p(logits); min_p(logits)      filters on the tempered distribution
    token  ~ Categorical(softmax(logits))                     explicit mx.random key

Penalties read ``counts (B, V)``: how often each token occurred in the row so far (prompt and
generated tokens). With c = counts, r = repetition, a = presence, f = frequency:

    repetition (CTRL, Keskar et al. 2019):  l -> l / r if l > 0 else l * r      where c > 0
    presence / frequency (OpenAI):           l -> l - a [c > 0] - f c

The sampler returns the token and its log-probability under the model's *unprocessed* distribution,
log_softmax(raw logits)[token], which is what scoring and ranking use.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx

_NEG_INF = -math.inf


def greedy(logits: mx.array) -> mx.array:
    """(B, V) -> (B,) int32 argmax (ties: lowest index)."""
    return mx.argmax(logits, axis=-1).astype(mx.int32)


def apply_temperature(logits: mx.array, temperature: float) -> mx.array:
    """l / T, T > 0."""
    if temperature <= 0:
        raise ValueError(f"apply_temperature: temperature must be > 0, got {temperature!r}")
    return logits * (1.0 / temperature)


def top_k(logits: mx.array, k: int) -> mx.array:
    """Keep the k largest logits per row (and any tied with the k-th), the rest -inf."""
    V = logits.shape[-1]
    if k <= 0 or k >= V:
        return logits
    kth = mx.sort(logits, axis=-1)[..., V - k][..., None]
    return mx.where(logits >= kth, logits, _NEG_INF)


def top_p(logits: mx.array, p: float) -> mx.array:
    """Nucleus filter (Holtzman et al. 2020): keep the smallest set of most likely tokens whose
    probability sums to >= p; the most likely token is always kept."""
    if p >= 1.0:
        return logits
    order = mx.argsort(-logits, axis=-1)
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)
    probs = mx.softmax(sorted_logits.astype(mx.float32), axis=-1)
    before = mx.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    keep_sorted = before < p
    keep = mx.put_along_axis(mx.zeros(logits.shape, dtype=mx.bool_), order, keep_sorted, axis=-1)
    return mx.where(keep, logits, _NEG_INF)


def min_p(logits: mx.array, p: float) -> mx.array:
    """Keep tokens whose probability is >= p * (the top probability): l >= l_max + log p."""
    if p <= 0.0:
        return logits
    top = mx.max(logits, axis=-1, keepdims=True)
    return mx.where(logits >= top + math.log(p), logits, _NEG_INF)


def apply_penalties(logits: mx.array, counts: mx.array, repetition: float = 1.0,
                    presence: float = 0.0, frequency: float = 0.0) -> mx.array:
    """Repetition / presence / frequency penalties from ``counts (B, V)`` (see module docstring)."""
    seen = counts > 0
    if repetition != 1.0:
        pen = mx.where(logits > 0, logits * (1.0 / repetition), logits * repetition)
        logits = mx.where(seen, pen, logits)
    if presence != 0.0:
        logits = logits - presence * seen.astype(logits.dtype)
    if frequency != 0.0:
        logits = logits - frequency * counts.astype(logits.dtype)
    return logits


def apply_logit_bias(logits: mx.array, bias: mx.array) -> mx.array:
    """l + bias, bias (V,) dense."""
    return logits + bias.astype(logits.dtype)


def categorical(key: mx.array, logits: mx.array) -> mx.array:
    """(B, V) -> (B,) int32 sample of softmax(logits) with an explicit key."""
    return mx.random.categorical(logits, axis=-1, key=key).astype(mx.int32)


def update_counts(counts: mx.array, tokens: mx.array) -> mx.array:
    """counts (B, V) + one-hot(tokens (B,))."""
    onehot = mx.arange(counts.shape[-1], dtype=mx.int32)[None, :] == tokens[:, None]
    return counts + onehot.astype(counts.dtype)


def token_counts(rows: list[list[int]], vocab_size: int) -> mx.array:
    """(B, V) int32 occurrence counts of each row's token ids."""
    import numpy as np
    out = np.zeros((len(rows), vocab_size), dtype=np.int32)
    for b, r in enumerate(rows):
        np.add.at(out[b], np.asarray(r, dtype=np.int64), 1)
    return mx.array(out)


@dataclass(frozen=True)
class SamplingParams:
    """What to sample with. Hashable: bind it before ``mx.compile`` (one trace per value).

    temperature: 0 -> greedy (argmax); > 0 -> sample softmax(l / T).
    top_k: 0 = off; top_p: 1.0 = off; min_p: 0.0 = off.
    repetition_penalty: 1.0 = off (> 0); presence_penalty, frequency_penalty: 0.0 = off.
    logit_bias: ((token_id, bias), ...) — a dict is accepted and frozen into sorted pairs.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple = field(default_factory=tuple)

    def __post_init__(self):
        def bad(name, want):
            raise ValueError(f"SamplingParams.{name} must be {want}, got {getattr(self, name)!r}")

        def number(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(name, "a finite number")
            object.__setattr__(self, name, float(v))

        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            number(name)
        if self.temperature < 0:
            bad("temperature", ">= 0 (0 = greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "an int >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "in (0, 1] (1 = off)")
        if not 0.0 <= self.min_p < 1.0:
            bad("min_p", "in [0, 1) (0 = off)")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", "> 0 (1 = off)")
        lb = self.logit_bias
        if isinstance(lb, dict):
            lb = tuple(sorted(lb.items()))
        try:
            lb = tuple((int(t), float(b)) for t, b in lb)
        except (TypeError, ValueError):
            bad("logit_bias", "a dict or pairs of (token_id, bias)")
        if any(t < 0 or not math.isfinite(b) for t, b in lb):
            bad("logit_bias", "non-negative token ids with finite biases")
        if len({t for t, _ in lb}) != len(lb):
            bad("logit_bias", "free of repeated token ids")
        object.__setattr__(self, "logit_bias", lb)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_counts(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def check_vocab(self, vocab_size: int) -> None:
        bad = [t for t, _ in self.logit_bias if t >= vocab_size]
        if bad:
            raise ValueError(f"SamplingParams.logit_bias: token ids {bad} are outside the vocabulary "
                             f"(size {vocab_size})")


def make_sampler(params: SamplingParams | None = None, vocab_size: int | None = None,
                 **kwargs) -> Callable:
    """sampler(key, logits (B, V), counts (B, V) int32) -> (token (B,) int32, logprob (B,) f32).

    ``params`` or keyword fields of ``SamplingParams`` (not both). Pure and compile-safe: the
    settings are Python constants; only key, logits and counts are arrays.
    """
    if params is None:
        params = SamplingParams(**kwargs)
    elif kwargs:
        raise ValueError(f"make_sampler: pass SamplingParams or keyword fields, not both ({sorted(kwargs)})")
    if not isinstance(params, SamplingParams):
        raise TypeError(f"make_sampler: expected SamplingParams, got {type(params).__name__}")
    sp = params
    bias = None
    if sp.logit_bias:
        if vocab_size is None:
            raise ValueError("make_sampler: logit_bias needs vocab_size")
        sp.check_vocab(vocab_size)
        ids, vals = zip(*sp.logit_bias)
        bias = mx.zeros((vocab_size,), dtype=mx.float32).at[mx.array(ids)].add(mx.array(vals))
        mx.eval(bias)  # a lazy array belongs to its creating thread's stream; compiled steps may run elsewhere

    def sampler(key, logits, counts):
        raw = logits.astype(mx.float32)
        lg = raw
        if bias is not None:
            lg = apply_logit_bias(lg, bias)
        if sp.uses_counts:
            lg = apply_penalties(lg, counts, sp.repetition_penalty, sp.presence_penalty,
                                 sp.frequency_penalty)
        if sp.is_greedy:
            tok = greedy(lg)
        else:
            lg = apply_temperature(lg, sp.temperature)
            lg = min_p(top_p(top_k(lg, sp.top_k), sp.top_p), sp.min_p)
            tok = categorical(key, lg)
        logp = raw - mx.logsumexp(raw, axis=-1, keepdims=True)
        return tok, mx.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]

    sampler.params = sp
    return sampler

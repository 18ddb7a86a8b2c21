"""Log-likelihood scoring with plain full forwards: the primitive behind perplexity, multiple choice
and the lm-evaluation-harness adapter.

For a token sequence x_0 .. x_{T-1} and logits z = model.apply(params, x) (B, T, V):

    log p(x_t | x_<t) = z[t-1, x_t] - logsumexp(z[t-1, :])            t = 1 .. T-1

Rows of different lengths are right-padded into one batch: the model is causal, so padding after a
row's end changes none of its logits. Scoring a continuation c after a context a sums the terms
for the positions of c in a + c (the context's own tokens are conditioned on, never scored).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

import mlx.core as mx


def sequence_logprobs(model, params, rows: Sequence[Sequence[int]], batch_size: int = 16
                      ) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each row x (length T >= 1): (float64 (T-1,) log p(x_t | x_<t) for t = 1..T-1,
    bool (T-1,) whether x_t was the argmax of its distribution)."""
    out: list = []
    V = model.config.vocab_size
    for i in range(0, len(rows), batch_size):
        chunk = [list(map(int, r)) for r in rows[i:i + batch_size]]
        if any(len(r) == 0 for r in chunk):
            raise ValueError("sequence_logprobs: every row needs at least one token")
        if any(t < 0 or t >= V for r in chunk for t in r):
            raise ValueError(f"sequence_logprobs: token ids must be in [0, {V})")
        T = max(len(r) for r in chunk)
        ids = np.zeros((len(chunk), T), dtype=np.int32)
        for b, r in enumerate(chunk):
            ids[b, :len(r)] = r
        logits, _ = model.apply(params, mx.array(ids))
        logits = logits.astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # (B, T, V)
        nxt = mx.array(np.concatenate([ids[:, 1:], np.zeros((len(chunk), 1), np.int32)], axis=1))
        picked = np.array(mx.take_along_axis(logp, nxt[..., None], axis=-1)[..., 0], dtype=np.float64)
        greedy = np.array(mx.argmax(logp, axis=-1))
        for b, r in enumerate(chunk):
            n = len(r) - 1
            out.append((picked[b, :n], greedy[b, :n] == ids[b, 1:n + 1]))
    return out


def continuation_logprobs(model, params, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                          batch_size: int = 16) -> list[tuple[float, bool, int]]:
    """For (context ids, continuation ids) pairs: (sum of log p(continuation | context), whether
    every continuation token is the greedy choice, number of continuation tokens). The context must
    be non-empty (start it with a BOS/EOS token for an unconditional continuation)."""
    rows = []
    for a, c in pairs:
        if len(a) == 0 or len(c) == 0:
            raise ValueError("continuation_logprobs: context and continuation need >= 1 token each")
        rows.append(list(a) + list(c))
    out = []
    for (a, c), (lp, greedy) in zip(pairs, sequence_logprobs(model, params, rows, batch_size)):
        k = len(a) - 1  # log-prob of row[len(a)] sits at index len(a) - 1
        seg, g = lp[k:], greedy[k:]
        out.append((float(np.sum(seg)), bool(np.all(g)), len(c)))
    return out

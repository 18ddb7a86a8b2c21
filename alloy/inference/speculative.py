"""Speculative decoding for hybrid models (greedy), with exact state rollback.

Leviathan et al. 2023 / Chen et al. 2023, greedy form. With both models' states having consumed
the sequence so far and ``cur`` the next token (chosen, not yet consumed):

    draft:   d_1..d_k = k greedy decode steps of the draft from ``cur``     (states kept per step)
    verify:  g_0..g_k = argmax of ONE target pass over [cur, d_1, .., d_k]  (T = k + 1)
    accept:  a = the number of leading j with d_{j+1} == g_j;  emit d_1..d_a, then g_a; cur = g_a

Rollback. An SSM state cannot be trimmed, so the states are rebuilt exactly at the last accepted
token: the verify pass runs with a per-row ``valid`` count (the layers then write only the first
``valid`` tokens: no KV write, dt = 0 and the conv tail at that point for the rest). When all k
drafts are accepted the verify state is already right; otherwise the target re-runs the *same*
(1, k+1) input from the pre-verify state with valid = a + 1 — the same compiled trace, and the same
arithmetic as the verify pass on the kept prefix. The draft keeps the state after each of its
steps (arrays are immutable, so this copies nothing) and takes the one after ``d_a``; when a == k
it consumes ``d_k`` with one more step. The output equals the target's own greedy decoding.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

import mlx.core as mx

from alloy.inference.generate import (GenerationEvent, as_rows, compiled_apply, compiled_step,
                                      pad_rows, prefill)
from alloy.inference.sampling import SamplingParams


@dataclass
class SpeculativeStats:
    """Counters of one or more speculative runs: rounds, drafted and accepted draft tokens,
    target verify passes and target replays (rollbacks)."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    replays: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def speculative_generate(target, target_params, draft, draft_params, prompt_ids, max_tokens: int = 64,
                         k: int = 4, *, stop_tokens: Sequence[int] = (), prefill_chunk: int = 512,
                         max_len: int | None = None, stats: SpeculativeStats | None = None
                         ) -> Iterator[GenerationEvent]:
    """Greedy speculative decoding of one prompt; yields ``GenerationEvent``s (text None) equal
    to the target's own greedy ``generate``. ``stats`` (a ``SpeculativeStats``) is updated in place.
    Logprobs come from the target's verify pass."""
    t0 = time.perf_counter()
    V = target.config.vocab_size
    if draft.config.vocab_size != V:
        raise ValueError(f"speculative_generate: draft vocab_size {draft.config.vocab_size} != target "
                         f"vocab_size {V}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"speculative_generate: k must be a positive int, got {k!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"speculative_generate: max_tokens must be a positive int, got {max_tokens!r}")
    rows, _ = as_rows(prompt_ids)
    if len(rows) != 1:
        raise ValueError(f"speculative_generate: one prompt at a time, got a batch of {len(rows)}")
    tokens, lengths = pad_rows(rows, V)
    need = int(lengths[0]) + max_tokens + k + 1  # verify may look k + 1 past the last kept token
    max_len = need if max_len is None else max_len
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < need:
        raise ValueError(f"speculative_generate: max_len must be >= prompt + max_tokens + k + 1 = {need}, "
                         f"got {max_len!r}")
    stats = SpeculativeStats() if stats is None else stats
    stop_set = {int(t) for t in stop_tokens}

    t_state, t_last = prefill(target, target_params, target.init_state(1, max_len), tokens, lengths,
                              0, prefill_chunk)
    d_state, _ = prefill(draft, draft_params, draft.init_state(1, max_len), tokens, lengths, 0,
                         prefill_chunk)
    prompt_time = time.perf_counter() - t0
    verify = compiled_apply(target)
    d_step = compiled_step(draft, SamplingParams())
    rng, counts = mx.random.key(0), mx.zeros((1, 1), dtype=mx.int32)

    logp0 = t_last - mx.logsumexp(t_last, axis=-1, keepdims=True)
    cur = mx.argmax(t_last, axis=-1).astype(mx.int32)  # (1,)
    pending = [(int(cur.item()), float(logp0[0, cur.item()].item()))]
    n_out, ttft = 0, None
    while True:
        # emit what is decided; stop on a stop token or max_tokens
        for tok, lp in pending:
            now = time.perf_counter()
            ttft = now - t0 if ttft is None else ttft
            reason = "stop" if tok in stop_set else ("length" if n_out + 1 == max_tokens else None)
            yield GenerationEvent(0, n_out, tok, lp, None, reason, int(lengths[0]), prompt_time, ttft,
                                  now - t0)
            n_out += 1
            if reason is not None:
                return
        # 1. draft k tokens, keeping the draft state after each consumed token
        drafts, d_states, x = [], [], cur
        for _ in range(k):
            x, _, d_state, rng, counts = d_step(draft_params, x, d_state, rng, counts)
            drafts.append(x)
            d_states.append(d_state)
        # 2. one target pass over [cur, d_1..d_k]
        ver_in = mx.concatenate([cur] + drafts)[None]  # (1, k+1)
        one = mx.array([k + 1], dtype=mx.int32)
        logits, v_state = verify(target_params, ver_in, {**t_state, "valid": one})
        g = mx.argmax(logits[0], axis=-1)
        logp = logits[0].astype(mx.float32)
        logp = logp - mx.logsumexp(logp, axis=-1, keepdims=True)
        d_np, g_np = np.array(ver_in[0, 1:]), np.array(g)
        a = 0
        while a < k and d_np[a] == g_np[a]:
            a += 1
        stats.rounds += 1
        stats.drafted += k
        stats.accepted += a
        emitted = [int(t) for t in d_np[:a]] + [int(g_np[a])]
        lp_np = np.array(logp)
        pending = [(t, float(lp_np[j, t])) for j, t in enumerate(emitted)]
        # 3. roll both states back to "consumed cur, d_1..d_a"
        if a == k:
            t_state = {kk: vv for kk, vv in v_state.items() if kk != "valid"}
            _, _, d_state, rng, counts = d_step(draft_params, drafts[-1], d_states[-1], rng, counts)
        else:
            stats.replays += 1
            _, r_state = verify(target_params, ver_in, {**t_state, "valid": mx.array([a + 1], dtype=mx.int32)})
            t_state = {kk: vv for kk, vv in r_state.items() if kk != "valid"}
            d_state = d_states[a]
        cur = mx.array([emitted[-1]], dtype=mx.int32)

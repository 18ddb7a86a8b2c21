"""Synthetic research tasks with answer-only accuracy: MQAR and selective copying.

Both produce batches ``{"tokens": (B, T+1) int32, "mask": (B, T) float32}`` (numpy) in the train
step's format: the model reads ``tokens[:, :-1]`` and is scored on ``tokens[:, 1:]`` only where
``mask`` is 1 -- the answer positions -- for both the loss and the accuracy. Batch ``i`` of a
stream is a pure function of ``(seed, i)`` (numpy PCG64 seeded with ``[seed, i]``), so the
position is ``{"index": i}`` and resuming is exact; validation uses seed ``seed + 10^6``.

MQAR, multi-query associative recall (Arora et al. 2023, "Zoology"). Token 0 is filler; keys are
``1 .. K`` and values ``K+1 .. V-1`` with ``K = (V - 1) // 2``. A sequence of ``L = T + 1`` tokens
starts with ``n`` key-value pairs ``k_1 v_1 ... k_n v_n`` (distinct keys, random values); the rest
is filler in which every key is queried once, in random order, as a pair ``k_i v_i`` at a random
2-aligned slot. A query is scored on predicting ``v_i`` right after reading ``k_i``: the model
must recall the value bound to that key earlier in the sequence. Needs ``L >= 4 n``.

Selective copying (Gu & Dao 2023, "Mamba", sec. 3.1). Token 0 is noise, 1 the separator, data
tokens ``2 .. V-1``. ``n`` data tokens sit at random sorted positions of a context of ``C`` tokens
(noise elsewhere), then comes the separator, then the ``n`` data tokens in order; ``L = C + 1 + n``.
Scored on emitting each data token in order after the separator (teacher forced): content-aware
selection, which fixed linear time-invariant recurrences cannot do.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["mqar_batch", "copy_batch", "TaskData", "TASKS", "masked_accuracy"]

TASKS = ("mqar", "copy")
_VAL_OFFSET = 1_000_000


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index)])


def mqar_batch(rng: np.random.Generator, batch_size: int, seq_len: int, num_kv: int, vocab_size: int) -> dict:
    """One MQAR batch (see the module doc); ``seq_len`` = T, rows hold T+1 tokens."""
    L = seq_len + 1
    K = (vocab_size - 1) // 2
    if num_kv < 1 or num_kv > K:
        raise ValueError(f"mqar: num_kv must be in [1, {K}] for vocab_size {vocab_size}, got {num_kv}")
    if L < 4 * num_kv:
        raise ValueError(f"mqar: seq_len + 1 = {L} must be >= 4 * num_kv = {4 * num_kv}")
    tokens = np.zeros((batch_size, L), dtype=np.int32)
    mask = np.zeros((batch_size, L - 1), dtype=np.float32)
    slots = (L - 2 * num_kv) // 2
    for b in range(batch_size):
        keys = rng.choice(K, size=num_kv, replace=False) + 1
        vals = rng.integers(K + 1, vocab_size, size=num_kv)
        tokens[b, 0:2 * num_kv:2] = keys
        tokens[b, 1:2 * num_kv:2] = vals
        order = rng.permutation(num_kv)
        where = np.sort(rng.choice(slots, size=num_kv, replace=False))
        qpos = 2 * num_kv + 2 * where  # position of each query key
        tokens[b, qpos] = keys[order]
        tokens[b, qpos + 1] = vals[order]
        mask[b, qpos] = 1.0  # target at t is tokens[t + 1]: the value after the query key
    return {"tokens": tokens, "mask": mask}


def copy_batch(rng: np.random.Generator, batch_size: int, seq_len: int, num_tokens: int, vocab_size: int) -> dict:
    """One selective-copying batch; context length C = seq_len - num_tokens."""
    L = seq_len + 1
    C = L - 1 - num_tokens
    if vocab_size < 3:
        raise ValueError(f"copy: vocab_size must be >= 3 (noise, separator, data), got {vocab_size}")
    if num_tokens < 1 or C < num_tokens:
        raise ValueError(f"copy: need 1 <= num_tokens <= context = seq_len - num_tokens; "
                         f"got num_tokens {num_tokens}, seq_len {seq_len}")
    tokens = np.zeros((batch_size, L), dtype=np.int32)
    mask = np.zeros((batch_size, L - 1), dtype=np.float32)
    for b in range(batch_size):
        data = rng.integers(2, vocab_size, size=num_tokens)
        pos = np.sort(rng.choice(C, size=num_tokens, replace=False))
        tokens[b, pos] = data
        tokens[b, C] = 1
        tokens[b, C + 1:] = data
        mask[b, C:C + num_tokens] = 1.0
    return {"tokens": tokens, "mask": mask}


def masked_accuracy(logits: np.ndarray, batch: dict) -> float:
    """Fraction of masked targets whose argmax is right (numpy; for checks outside the step)."""
    pred = np.asarray(logits).argmax(-1)
    tgt = np.asarray(batch["tokens"])[:, 1:]
    m = np.asarray(batch["mask"]) > 0
    return float((pred[m] == tgt[m]).mean()) if m.any() else float("nan")


@dataclass(frozen=True)
class TaskData:
    """A stream of task batches: ``next_batch(pos) -> (batch, pos)`` with ``pos = {"index": i}``.

    ``task`` "mqar" uses ``size`` as the number of key-value pairs, "copy" as the number of tokens
    to copy.
    """

    task: str
    batch_size: int
    seq_len: int
    size: int
    vocab_size: int
    seed: int = 0

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        self._make(_rng(0, 0), 1)  # validates the sizes now, not at the first step

    def _make(self, rng, n):
        fn = mqar_batch if self.task == "mqar" else copy_batch
        return fn(rng, n, self.seq_len, self.size, self.vocab_size)

    def init_position(self) -> dict:
        return {"index": 0}

    def next_batch(self, position: dict) -> tuple[dict, dict]:
        i = int(position["index"])
        return self._make(_rng(self.seed, i), self.batch_size), {"index": i + 1}

    def val_batches(self, max_batches: int) -> list[dict]:
        return [self._make(_rng(self.seed + _VAL_OFFSET, i), self.batch_size) for i in range(max_batches)]

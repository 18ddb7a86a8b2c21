"""Prefix reuse for hybrid models: whole-state snapshots at token boundaries, LRU by bytes.

An SSM's state cannot be trimmed back to an earlier position, so instead of trimming a cache we keep
*snapshots*: the complete state tree (every layer's KV ring, conv tail and SSM state, and ``pos``)
together with the logits at the last token, taken at chosen boundaries while a prompt is prefilled:

    every ``every`` tokens (absolute multiples), at the end of every prompt, and at any extra
    boundaries the caller names;

and, by ``alloy.generate``, once a reply ends: the state after prompt + reply (without logits: it
serves the next chat turn, which continues past it).

A new prompt resumes from the snapshot of its longest cached prefix and prefills only the rest
(an exact prefix hit prefills nothing). MLX arrays are immutable, so a snapshot is the state tree
itself: taking one copies nothing. Entries are evicted least-recently-used first once their total
size (``nbytes`` of every array) exceeds ``max_bytes``.

A cache serves one (model, params, max_len): snapshots are keyed by the model config, the
state's ``max_len`` and the identity of the params tree as well as by the token prefix. Chunk
boundaries sit at absolute positions (see ``generate.chunk_bounds``), so a resumed prefill runs
the same chunks as a cold one and reuse changes no result.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence


from alloy.inference.generate import prefill
from alloy.params.tree import tree_bytes as tree_nbytes  # total bytes of a tree's arrays


class PrefixCache:
    """Bounded LRU of whole-state snapshots keyed by token prefixes (see module docstring).

    PrefixCache(max_bytes=1 << 30, every=0): ``every`` > 0 also snapshots at every multiple of
    ``every`` tokens. Counters: ``hits``, ``misses``, ``reused_tokens``; ``nbytes``; ``len()``.
    """

    def __init__(self, max_bytes: int = 1 << 30, every: int = 0):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ValueError(f"PrefixCache.max_bytes must be a positive int, got {max_bytes!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"PrefixCache.every must be an int >= 0 (0 = off), got {every!r}")
        self.max_bytes, self.every = max_bytes, every
        self._entries: OrderedDict = OrderedDict()  # (sig, tokens) -> (state, last, nbytes)
        self.nbytes = 0
        self.hits = self.misses = self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def signature(model, params, max_len: int, kv=None):
        """What a snapshot may be reused for: the model, its params, the state length and the KV
        storage (``kv``: None, or (bits, group_size) of quantized attention rings)."""
        return (model.config, max_len, id(params), kv)

    def lookup(self, sig, tokens: Sequence[int]):
        """(n, state, last) of the longest cached prefix tokens[:n] (n >= 1), or None. A snapshot
        without logits (an end-of-reply one) only serves prompts that go on past it."""
        tokens = tuple(tokens)
        best = None
        for (s, pre), entry in self._entries.items():
            usable = len(pre) < len(tokens) or (len(pre) == len(tokens) and entry[1] is not None)
            if s == sig and usable and tokens[:len(pre)] == pre:
                if best is None or len(pre) > len(best[0]):
                    best = (pre, entry)
        if best is None:
            return None
        self._entries.move_to_end((sig, best[0]))
        return len(best[0]), best[1][0], best[1][1]

    def insert(self, sig, tokens: Sequence[int], state, last) -> None:
        """Store a snapshot of ``state`` after ``tokens`` (and ``last`` (1, V) logits at the last
        token, or None); evicts least-recently-used entries beyond ``max_bytes``."""
        key = (sig, tuple(tokens))
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        size = tree_nbytes(state) + (0 if last is None else last.nbytes)
        if size > self.max_bytes:
            return
        self._entries[key] = (state, last, size)
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, (_, _, n) = self._entries.popitem(last=False)
            self.nbytes -= n

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def prefill(self, model, params, prompt: Sequence[int], max_len: int, prefill_chunk: int = 512,
                boundaries: Sequence[int] = (), kv_bits: int | None = None, kv_group_size: int | None = None):
        """Prefill one prompt, resuming from its longest cached prefix and snapshotting at the
        boundaries. Returns (state, last (1, V) logits) like ``generate.prefill``. ``kv_bits``: a
        fresh state's attention rings are quantized (``quantize_kv``); snapshots are kept apart by
        their KV storage."""
        import numpy as np
        from alloy.inference.generate import quantize_kv
        prompt = [int(t) for t in prompt]
        T = len(prompt)
        sig = self.signature(model, params, max_len, None if kv_bits is None else (kv_bits, kv_group_size))
        hit = self.lookup(sig, prompt)
        if hit is not None and hit[0] == T:
            self.hits += 1
            self.reused_tokens += T
            return hit[1], hit[2]
        if hit is None:
            self.misses += 1
            start, state = 0, model.init_state(1, max_len)
            if kv_bits is not None:
                state = quantize_kv(model, state, kv_bits, kv_group_size)
        else:
            self.hits += 1
            self.reused_tokens += hit[0]
            start, state = hit[0], hit[1]
        marks = set(b for b in boundaries if start < b <= T) | {T}
        if self.every:
            marks |= set(range((start // self.every + 1) * self.every, T + 1, self.every))

        def snap(p, st, last):
            self.insert(sig, prompt[:p], st, last)

        tokens = np.asarray([prompt], dtype=np.int32)
        return prefill(model, params, state, tokens, np.array([T]), start, prefill_chunk,
                       sorted(marks), snap)

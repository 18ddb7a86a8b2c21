"""Text data: a byte tokenizer, streaming JSONL, packing into fixed windows, resumable batches.

Tokenizer. ``ByteTokenizer``: one token per UTF-8 byte, ids 0..255, vocab 256. Byte 0 (NUL), which
text never contains, doubles as the EOS separator between packed documents (``eos_id = 0``), so
byte-level models need no extra rows; ``decode`` drops it. No other specials.

JSONL. One JSON object per line, either ``{"text": "..."}`` (tokenized with the tokenizer) or
``{"tokens": [int, ...]}`` (pre-tokenized; ids must be < vocab_size). Lines are read one at a
time (the file is never parsed whole); blank lines are skipped; a bad line raises ``ValueError``
naming ``file:line`` and what is wrong; a file with no documents raises naming the file.

Packing. Documents are concatenated, each followed by EOS, into one token stream (held in memory
as uint8 / uint16 / int32 numpy, ~1 byte per token for bytes). A stream of N tokens gives
``n = (N - 1) // T`` windows ``w_j = stream[j T : j T + T + 1]`` (B, T+1): inputs ``w[:-1]``,
targets ``w[1:]``; consecutive windows share one token, so every token is a target exactly once.

Shuffling and resuming. Epoch e visits the windows in ``permutation_{seed, e}`` (numpy PCG64
seeded with ``[seed, e]``); a batch is the next ``B`` of them, continuing into the next epoch when
one runs out. The position is ``{"epoch": e, "index": i}``: two ints (msgpack/JSON friendly),
and ``next_batch(pos)`` is a pure function of it, so a resumed run sees exactly the batches the
uninterrupted run would have seen.

Validation split. Whole documents go to validation by a hash of their name (crc32 mod 10^4 <
``val_fraction`` 10^4, at least one document when there are two or more), so the split does not
depend on shuffling or on the other documents. ``val_batches`` are the first windows of the
validation stream in order (a fixed evaluation set).
"""
from __future__ import annotations

import functools
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

__all__ = ["ByteTokenizer", "read_jsonl", "pack", "split_documents", "PackedData", "TextCorpus"]


@dataclass(frozen=True)
class ByteTokenizer:
    """Bytes as tokens: ``encode(text) -> uint8 ids``, ``decode(ids) -> str``; EOS = NUL (0)."""

    eos_id: int = 0
    vocab_size: int = 256

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).copy()

    def decode(self, ids: Iterable[int]) -> str:
        arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
        arr = arr[(arr != self.eos_id) & (arr >= 0) & (arr < 256)].astype(np.uint8)
        return arr.tobytes().decode("utf-8", errors="replace")


def iter_jsonl(path) -> Iterator[tuple[str, int, object]]:
    """``(where, line number, object)`` for every non-blank line of a JSONL file; ``where`` is
    ``"file:line"``. Invalid JSON or UTF-8 raises ``ValueError`` naming the file and line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, lineno, json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{where}: invalid JSON ({e})") from None


def read_jsonl(path, tokenizer: ByteTokenizer, vocab_size: int | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Stream ``(name, tokens)`` per document of a JSONL file; ``name`` is ``"file:line"``.

    Raises ``ValueError`` naming the file and line for invalid JSON, a non-object line, a line
    without exactly one of "text" / "tokens", non-string text, token lists that are not ints in
    [0, vocab_size), and naming the file when it holds no document at all.
    """
    path = Path(path)
    vocab = tokenizer.vocab_size if vocab_size is None else vocab_size
    n_docs = 0
    for where, lineno, obj in iter_jsonl(path):
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object with 'text' or 'tokens', got {type(obj).__name__}")
        has = [k for k in ("text", "tokens") if k in obj]
        if len(has) != 1:
            raise ValueError(f"{where}: expected exactly one of 'text' or 'tokens', got keys {sorted(obj)}")
        if has[0] == "text":
            if not isinstance(obj["text"], str):
                raise ValueError(f"{where}: 'text' must be a string, got {type(obj['text']).__name__}")
            toks = tokenizer.encode(obj["text"])
        else:
            t = obj["tokens"]
            if not isinstance(t, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in t):
                raise ValueError(f"{where}: 'tokens' must be a list of ints")
            toks = np.asarray(t, dtype=np.int64)
            bad = (toks < 0) | (toks >= vocab)
            if bad.any():
                raise ValueError(f"{where}: token {int(toks[bad][0])} out of range [0, {vocab})")
        n_docs += 1
        yield f"{path.name}:{lineno}", toks
    if n_docs == 0:
        raise ValueError(f"{path}: empty file (no JSONL documents)")


def _stream_dtype(vocab_size: int):
    return np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.int32


def pack(docs: Iterable[np.ndarray], eos_id: int, vocab_size: int) -> np.ndarray:
    """One token stream: every document followed by ``eos_id``."""
    dtype = _stream_dtype(vocab_size)
    eos = np.array([eos_id], dtype=dtype)
    parts = []
    for d in docs:
        parts.append(np.asarray(d).astype(dtype, copy=False))
        parts.append(eos)
    return np.concatenate(parts) if parts else np.zeros((0,), dtype=dtype)


def _is_val(name: str, val_fraction: float) -> bool:
    return zlib.crc32(name.encode("utf-8")) % 10_000 < round(val_fraction * 10_000)


def split_documents(named_docs: Iterable[tuple[str, np.ndarray]], val_fraction: float):
    """``(train_docs, val_docs)`` lists of token arrays, split by a hash of each name."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    train, val = [], []
    for name, toks in named_docs:
        (val if _is_val(name, val_fraction) else train).append(toks)
    if val_fraction > 0 and not val and len(train) >= 2:
        val.append(train.pop())
    if not train and len(val) >= 2:
        train.append(val.pop(0))
    return train, val


@functools.lru_cache(maxsize=4)
def _perm(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


@dataclass(frozen=True, eq=False)
class PackedData:
    """Fixed ``(B, T+1)`` windows over a token stream, shuffled per epoch; see the module doc."""

    stream: np.ndarray
    batch_size: int
    seq_len: int
    seed: int = 0

    def __post_init__(self):
        for k in ("batch_size", "seq_len"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"PackedData.{k} must be a positive int, got {v!r}")
        if self.n_windows < 1:
            raise ValueError(f"corpus too small: {len(self.stream)} tokens give no window of "
                             f"seq_len + 1 = {self.seq_len + 1} tokens")

    @property
    def n_windows(self) -> int:
        return max((len(self.stream) - 1) // self.seq_len, 0)

    def init_position(self) -> dict:
        return {"epoch": 0, "index": 0}

    def window_ids(self, position: dict) -> tuple[np.ndarray, dict]:
        """The window indices of the batch at ``position`` and the position after it."""
        e, i = int(position["epoch"]), int(position["index"])
        n, B = self.n_windows, self.batch_size
        out = []
        while len(out) < B:
            if i >= n:
                e, i = e + 1, 0
            take = min(B - len(out), n - i)
            out.extend(_perm(self.seed, e, n)[i:i + take].tolist())
            i += take
        return np.asarray(out), {"epoch": e, "index": i}

    def next_batch(self, position: dict) -> tuple[dict, dict]:
        """``({"tokens": (B, T+1) int32 numpy}, next_position)``: a pure function of position."""
        ids, pos = self.window_ids(position)
        T = self.seq_len
        rows = np.stack([self.stream[j * T: j * T + T + 1] for j in ids]).astype(np.int32)
        return {"tokens": rows}, pos

    def sequential_batches(self, max_batches: int) -> list[dict]:
        """The first ``max_batches`` batches of windows in stream order (no shuffling)."""
        T, B = self.seq_len, self.batch_size
        n = min(max_batches * B, self.n_windows)
        out = []
        for s in range(0, n - n % B if n >= B else n, B):
            rows = np.stack([self.stream[j * T: j * T + T + 1] for j in range(s, min(s + B, n))])
            out.append({"tokens": rows.astype(np.int32)})
        return out


@dataclass(frozen=True, eq=False)
class TextCorpus:
    """A packed text corpus with its validation split: ``train`` / ``val`` streams."""

    name: str
    train: np.ndarray
    val: np.ndarray
    n_train_docs: int
    n_val_docs: int

    @classmethod
    def from_documents(cls, name: str, named_docs, eos_id: int, vocab_size: int, val_fraction: float):
        tr, va = split_documents(named_docs, val_fraction)
        if not tr:
            raise ValueError(f"{name}: no training documents")
        return cls(name, pack(tr, eos_id, vocab_size), pack(va, eos_id, vocab_size), len(tr), len(va))

    def loader(self, batch_size: int, seq_len: int, seed: int) -> PackedData:
        return PackedData(self.train, batch_size, seq_len, seed)

    def val_batches(self, batch_size: int, seq_len: int, max_batches: int) -> list[dict]:
        if (len(self.val) - 1) // seq_len < 1:
            return []
        return PackedData(self.val, batch_size, seq_len, 0).sequential_batches(max_batches)


def jsonl_files(path) -> list[Path]:
    """A .jsonl file, or every ``*.jsonl`` directly in a directory (sorted)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.jsonl"))
        if not files:
            raise FileNotFoundError(f"{p}: directory has no *.jsonl files")
        return files
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {p}")
    return [p]


def jsonl_corpus(path, tokenizer: ByteTokenizer, vocab_size: int, val_fraction: float) -> TextCorpus:
    """Read, split and pack JSONL file(s) (streaming, line by line)."""
    files = jsonl_files(path)

    def docs():
        for f in files:
            yield from read_jsonl(f, tokenizer, vocab_size)

    return TextCorpus.from_documents(os.fspath(path), docs(), tokenizer.eos_id, vocab_size, val_fraction)

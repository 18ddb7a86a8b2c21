"""The embedded offline corpus ``stdlib``: the Python standard library's own files, as bytes.

Every Python install carries its standard library as source, so the default training job needs no
download. Files: every ``*.py``, ``*.txt``, ``*.rst`` under ``sysconfig.get_paths()["stdlib"]``
(the directory of ``os``'s source via ``inspect`` if that is missing), skipping ``site-packages``,
``dist-packages`` and ``__pycache__``; sorted by path relative to that root, so the list is
deterministic for a given Python version (CPython 3.11 here: ~1,900 files, ~32 MB). Each file is one
document named by its relative path (which also decides its validation membership), tokenized as
bytes. The corpus differs between Python versions; record the version with any figure.
"""
from __future__ import annotations

import inspect
import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

import numpy as np

from alloy.train.data import ByteTokenizer, TextCorpus

__all__ = ["stdlib_root", "stdlib_files", "stdlib_documents", "stdlib_corpus", "SUFFIXES"]

SUFFIXES = (".py", ".txt", ".rst")
_SKIP_DIRS = ("site-packages", "dist-packages", "__pycache__")


def stdlib_root() -> Path:
    root = sysconfig.get_paths().get("stdlib")
    if root and Path(root, "os.py").is_file():
        return Path(root)
    return Path(inspect.getfile(os)).parent


def stdlib_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """Sorted ``(relative posix path, absolute path)`` of the corpus files."""
    root = stdlib_root() if root is None else Path(root)
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in _SKIP_DIRS]
        for f in files:
            if f.endswith(SUFFIXES):
                p = Path(d, f)
                out.append((p.relative_to(root).as_posix(), p))
    out.sort(key=lambda t: t[0])
    if not out:
        raise FileNotFoundError(f"stdlib corpus: no {SUFFIXES} files under {root}")
    return out


def stdlib_documents(tokenizer: ByteTokenizer | None = None, max_bytes: int | None = None
                     ) -> Iterator[tuple[str, np.ndarray]]:
    """``(relative path, byte tokens)`` per file in sorted order; stops after ``max_bytes``."""
    tok = tokenizer or ByteTokenizer()
    total = 0
    for rel, path in stdlib_files():
        data = path.read_bytes()
        if not data:
            continue
        yield rel, tok.encode(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            return


def stdlib_corpus(val_fraction: float = 0.01, max_bytes: int | None = None,
                  tokenizer: ByteTokenizer | None = None) -> TextCorpus:
    """The packed ``stdlib`` corpus with a validation split by file."""
    tok = tokenizer or ByteTokenizer()
    name = f"stdlib (Python {sys.version_info.major}.{sys.version_info.minor})"
    return TextCorpus.from_documents(name, stdlib_documents(tok, max_bytes), tok.eos_id,
                                     tok.vocab_size, val_fraction)

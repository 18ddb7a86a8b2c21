"""Load a system OpenBLAS before ``mlx.core`` on Linux.

The Linux CPU wheel of MLX links the reference BLAS, whose matmul is ~30x slower than
OpenBLAS. MLX resolves ``cblas_*`` / ``sgemm_`` through the dynamic loader, so a library
loaded earlier with ``RTLD_GLOBAL`` provides those symbols instead. This must run before
``mlx.core`` is first imported in the process; ``alloy/__init__.py`` imports it first.

Set ``ALLOY_NO_OPENBLAS=1`` to turn it off, or ``ALLOY_OPENBLAS=/path/libopenblas.so`` to
choose the library. ``LOADED`` holds the path that was loaded (or None) for benchmarks.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

LOADED: str | None = None
SKIPPED_REASON: str | None = None


def _find() -> str | None:
    explicit = os.environ.get("ALLOY_OPENBLAS")
    if explicit:
        return explicit
    for path in _CANDIDATES:
        if os.path.exists(path):
            return path
    return ctypes.util.find_library("openblas")


def load() -> str | None:
    """Preload OpenBLAS globally if allowed and possible; return its path or None."""
    global LOADED, SKIPPED_REASON
    if LOADED is not None:
        return LOADED
    if not sys.platform.startswith("linux"):
        SKIPPED_REASON = "not Linux"
        return None
    if os.environ.get("ALLOY_NO_OPENBLAS", "") not in ("", "0"):
        SKIPPED_REASON = "ALLOY_NO_OPENBLAS is set"
        return None
    if "mlx.core" in sys.modules:
        SKIPPED_REASON = "mlx.core was imported before alloy"
        return None
    path = _find()
    if path is None:
        SKIPPED_REASON = "no libopenblas found (apt-get install libopenblas0-pthread)"
        return None
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:  # a broken or foreign-arch library: fall back silently
        SKIPPED_REASON = f"could not load {path}: {e}"
        return None
    LOADED = path
    return path


load()

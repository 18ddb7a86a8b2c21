"""Reading and writing trees: safetensors (weights), JSON (configs), msgpack (any tree).

Every writer is atomic: it writes a temporary file in the destination's directory, fsyncs it and
``os.replace``s it over the destination, so a reader sees the old file or the new one, never a
partial one, and a failed write leaves the old file untouched and no temporary behind.
Parent directories are created as needed.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterator

import msgpack
import numpy as np

import mlx.core as mx

from alloy.params.tree import flatten, is_container, tree_map_with_path

__all__ = [
    "CheckpointError",
    "atomic_path",
    "atomic_write",
    "load_into",
    "load_json",
    "load_safetensors",
    "load_tree_msgpack",
    "save_json",
    "save_safetensors",
    "save_tree_msgpack",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that does not fit: every problem found, one per line, grouped with counts.

    Attributes ``missing``, ``unexpected`` (key lists), ``mismatched`` (``(key, expected, got)``
    shape triples) and ``other`` (free-form lines) hold the same facts for programs.
    """

    def __init__(self, missing=(), unexpected=(), mismatched=(), other=(), *, source: str | None = None):
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        self.other = list(other)
        self.source = source
        counts = []
        lines = []
        if self.missing:
            counts.append(f"{len(self.missing)} missing")
            lines.append(f"missing keys ({len(self.missing)}):")
            lines += [f"  {k}" for k in self.missing]
        if self.unexpected:
            counts.append(f"{len(self.unexpected)} unexpected")
            lines.append(f"unexpected keys ({len(self.unexpected)}):")
            lines += [f"  {k}" for k in self.unexpected]
        if self.mismatched:
            counts.append(f"{len(self.mismatched)} shape mismatches")
            lines.append(f"shape mismatches ({len(self.mismatched)}):")
            lines += [f"  {k}: expected {_shape_str(e)}, got {_shape_str(g)}" for k, e, g in self.mismatched]
        if self.other:
            counts.append(f"{len(self.other)} other problems")
            lines.append(f"other problems ({len(self.other)}):")
            lines += [f"  {x}" for x in self.other]
        where = f" ({source})" if source else ""
        head = f"checkpoint does not match{where}: " + ", ".join(counts)
        super().__init__("\n".join([head, *lines]))


def _shape_str(s) -> str:
    return "(" + ", ".join(str(int(d)) for d in s) + ("," if len(s) == 1 else "") + ")"


# ----------------------------------------------------------------------------------------------
# atomic writes
# ----------------------------------------------------------------------------------------------


def _temp_name(path: Path, suffix: str | None) -> Path:
    suffix = path.suffix if suffix is None else suffix
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}{suffix}")


def _fsync_file(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path, *, suffix: str | None = None) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; on success it is fsynced and renamed to
    ``path``, on error it is removed and the error re-raised (``path`` is left as it was).

    The temporary name ends with ``path``'s suffix (or ``suffix``), so writers that append an
    extension when it is missing (``mx.save_safetensors``) write to the yielded name. It does not
    exist yet: the writer creates it (with the usual umask permissions).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path, suffix)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"atomic_path: nothing was written to the temporary {tmp} for {path}")
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write(path, data: bytes | str) -> None:
    """Write ``data`` (``str`` is UTF-8 encoded) to ``path`` atomically."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    elif not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write: data must be bytes or str, got {type(data).__name__}")
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------
# safetensors
# ----------------------------------------------------------------------------------------------


def _as_flat(tree) -> dict[str, Any]:
    """A flat {dotted key: leaf} dict: ``tree`` itself if it already is one, else flatten it."""
    if isinstance(tree, dict) and all(isinstance(k, str) and not is_container(v) for k, v in tree.items()):
        return tree
    return flatten(tree)


def save_safetensors(path, tree_or_flat, metadata: dict[str, str] | None = None) -> None:
    """Save a tree (flattened to dotted keys) or a flat dict to exactly ``path``, atomically.

    All leaves must be ``mx.array`` (any dtype MLX supports, bfloat16 included); ``metadata``
    values must be ``str``. Unlike ``mx.save_safetensors`` no extension is appended.
    """
    flat = _as_flat(tree_or_flat)
    bad = [f"{k}: {type(v).__name__}" for k, v in flat.items() if not isinstance(v, mx.array)]
    if bad:
        raise TypeError("save_safetensors: leaves must be mx.array; not arrays:\n  " + "\n  ".join(bad))
    if metadata is not None:
        badm = [f"{k!r}: {type(v).__name__}" for k, v in metadata.items()
                if not isinstance(k, str) or not isinstance(v, str)]
        if badm:
            raise TypeError("save_safetensors: metadata must map str to str; bad entries:\n  "
                            + "\n  ".join(badm))
    with atomic_path(path, suffix=".safetensors") as tmp:
        if metadata:
            mx.save_safetensors(str(tmp), flat, metadata=dict(metadata))
        else:
            mx.save_safetensors(str(tmp), flat)


def _natural_key(path: str):
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split(".")]


def _load_file(path: Path):
    try:
        return mx.load(str(path), format="safetensors", return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(other=[f"cannot read {path}: {e}"], source=str(path)) from e


def load_safetensors(path, *, return_metadata: bool = False):
    """Load a flat ``{dotted key: mx.array}`` dict.

    ``path`` is a ``.safetensors`` file, or a directory holding ``model.safetensors`` (preferred)
    or a sharded ``model.safetensors.index.json`` whose ``weight_map`` names the shards; all
    shards are loaded and every key the index lists must be in the shard it names. Keys come in
    natural order (numeric components compared as numbers: ``layers.2`` before ``layers.10``):
    the format does not record insertion order -- ``load_into`` restores a model's order.
    With ``return_metadata=True`` returns ``(flat, metadata)`` (shards' metadata merged).
    """
    path = Path(path)
    if path.is_dir():
        if (path / SINGLE_FILE).is_file():
            flat, meta = _load_file(path / SINGLE_FILE)
        elif (path / INDEX_FILE).is_file():
            flat, meta = _load_sharded(path, path / INDEX_FILE)
        else:
            found = sorted(p.name for p in path.glob("*.safetensors"))
            raise FileNotFoundError(
                f"{path}: no {SINGLE_FILE} or {INDEX_FILE}"
                + (f" (safetensors files present: {', '.join(found)})" if found else ""))
    elif path.is_file():
        flat, meta = _load_file(path)
    else:
        raise FileNotFoundError(f"no such checkpoint file or directory: {path}")
    flat = {k: flat[k] for k in sorted(flat, key=_natural_key)}
    return (flat, meta) if return_metadata else flat


def _load_sharded(root: Path, index_path: Path):
    index = load_json(index_path)
    wmap = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise CheckpointError(other=[f"{index_path.name} has no 'weight_map'"], source=str(index_path))
    shards: dict[str, list[str]] = {}
    for key, shard in wmap.items():
        shards.setdefault(shard, []).append(key)
    absent = [s for s in shards if not (root / s).is_file()]
    if absent:
        raise CheckpointError(other=[f"shard file not found: {s}" for s in absent], source=str(index_path))
    flat: dict[str, mx.array] = {}
    meta: dict[str, str] = {}
    owner: dict[str, str] = {}
    missing, other = [], []
    for shard, keys in shards.items():
        arrays, m = _load_file(root / shard)
        meta.update(m)
        missing += [f"{k} (in {shard})" for k in keys if k not in arrays]
        for k, v in arrays.items():
            if k in owner:
                other.append(f"duplicate key {k} in shards {owner[k]} and {shard}")
                continue
            owner[k] = shard
            flat[k] = v
    if missing or other:
        raise CheckpointError(missing=missing, other=other, source=str(index_path))
    return flat, meta


def load_into(template, flat: dict[str, Any], strict: bool = True, cast_to_template: bool = False):
    """A tree with ``template``'s structure and key order whose leaves come from ``flat``.

    Only ``.shape`` / ``.dtype`` of template leaves are read (lazy templates stay unevaluated;
    any object with ``shape`` and ``dtype`` will do). Every template path must be in ``flat``
    with the template's shape; with ``strict`` keys of ``flat`` that the template lacks are
    errors too. All problems are reported together in one ``CheckpointError``. Values keep their
    checkpoint dtype unless ``cast_to_template``. numpy values are converted to ``mx.array``.
    """
    missing, mismatched = [], []

    def take(path, t):
        if path not in flat:
            missing.append(path)
            return t
        v = flat[path]
        if isinstance(v, np.ndarray):  # keep float64 (mx.array alone would make it float32)
            v = mx.array(v, dtype=mx.float64) if v.dtype == np.float64 else mx.array(v)
        t_shape = getattr(t, "shape", None)
        if t_shape is not None:
            v_shape = getattr(v, "shape", None)
            if v_shape is None or tuple(v_shape) != tuple(t_shape):
                mismatched.append((path, tuple(t_shape), tuple(v_shape) if v_shape is not None else ()))
                return t
            if cast_to_template and isinstance(v, mx.array) and v.dtype != t.dtype:
                v = v.astype(t.dtype)
        return v

    out = tree_map_with_path(take, template)
    unexpected = []
    if strict:
        want = set(flatten(template))
        unexpected = [k for k in flat if k not in want]
    if missing or unexpected or mismatched:
        raise CheckpointError(missing, unexpected, mismatched)
    return out


# ----------------------------------------------------------------------------------------------
# JSON
# ----------------------------------------------------------------------------------------------


def save_json(path, obj) -> None:
    """``json.dumps(obj, indent=2)`` (key order kept) plus a newline, written atomically."""
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def load_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------
# msgpack trees
# ----------------------------------------------------------------------------------------------

_MAGIC = "alloy.tree"
_VERSION = 1
_EXT_MX, _EXT_TUPLE, _EXT_NP, _EXT_NP_SCALAR = 1, 2, 3, 4
_MX_DTYPES = {
    name: getattr(mx, name)
    for name in ("bool_", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
                 "float16", "bfloat16", "float32", "float64", "complex64")
    if hasattr(mx, name)
}
_MX_DTYPE_NAMES = {v: k for k, v in _MX_DTYPES.items()}


def _mx_to_bytes(a: mx.array) -> bytes:
    if a.dtype == mx.bfloat16:  # numpy has no bfloat16: carry the bits
        return np.array(a.view(mx.uint16)).tobytes()
    return np.array(a).tobytes()


def _mx_from_bytes(dtype_name: str, shape, data: bytes) -> mx.array:
    if dtype_name not in _MX_DTYPES:
        raise ValueError(f"unknown mlx dtype {dtype_name!r} in tree file")
    if dtype_name == "bfloat16":
        return mx.array(np.frombuffer(data, dtype=np.uint16).reshape(shape)).view(mx.bfloat16)
    np_dtype = np.dtype("bool" if dtype_name == "bool_" else dtype_name)
    # explicit dtype: mx.array would turn float64 into float32
    return mx.array(np.frombuffer(data, dtype=np_dtype).reshape(shape), dtype=_MX_DTYPES[dtype_name])


def _encode(node, path: str):
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"save_tree_msgpack: dict key {k!r} at '{path}' must be str or int")
            out[k] = _encode(v, f"{path}.{k}" if path else str(k))
        return out
    if isinstance(node, list):
        return [_encode(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(node)]
    if isinstance(node, tuple):
        items = [_encode(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(node)]
        return msgpack.ExtType(_EXT_TUPLE, msgpack.packb(items, use_bin_type=True))
    if isinstance(node, mx.array):
        name = _MX_DTYPE_NAMES.get(node.dtype)
        if name is None:
            raise TypeError(f"save_tree_msgpack: unsupported dtype {node.dtype} at '{path}'")
        payload = [name, list(node.shape), _mx_to_bytes(node)]
        return msgpack.ExtType(_EXT_MX, msgpack.packb(payload, use_bin_type=True))
    if isinstance(node, np.ndarray):
        if node.dtype.hasobject:
            raise TypeError(f"save_tree_msgpack: object arrays are not supported at '{path}'")
        payload = [node.dtype.str, list(node.shape), np.ascontiguousarray(node).tobytes()]
        return msgpack.ExtType(_EXT_NP, msgpack.packb(payload, use_bin_type=True))
    if isinstance(node, np.generic):
        payload = [node.dtype.str, node.tobytes()]
        return msgpack.ExtType(_EXT_NP_SCALAR, msgpack.packb(payload, use_bin_type=True))
    if node is None or isinstance(node, (bool, int, float, str, bytes)):
        return node
    raise TypeError(f"save_tree_msgpack: unsupported leaf type {type(node).__name__} at '{path or '<root>'}'")


def _ext_hook(code: int, data: bytes):
    if code == _EXT_TUPLE:
        return tuple(_unpack(data))
    if code == _EXT_MX:
        name, shape, raw = _unpack(data)
        return _mx_from_bytes(name, shape, raw)
    if code == _EXT_NP:
        dt, shape, raw = _unpack(data)
        return np.frombuffer(raw, dtype=np.dtype(dt)).reshape(shape).copy()
    if code == _EXT_NP_SCALAR:
        dt, raw = _unpack(data)
        return np.frombuffer(raw, dtype=np.dtype(dt))[0]
    raise ValueError(f"unknown msgpack extension type {code} in tree file")


def _unpack(data: bytes):
    return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=False, ext_hook=_ext_hook)


def save_tree_msgpack(path, tree) -> None:
    """Save any tree of dict (str/int keys) / list / tuple and leaves ``mx.array`` (every MLX
    dtype, bfloat16 included), numpy arrays/scalars, int, float, str, bytes, bool, None.
    Bit-exact, structure, container types and key order preserved; atomic."""
    blob = msgpack.packb({"format": _MAGIC, "version": _VERSION, "tree": _encode(tree, "")},
                         use_bin_type=True)
    atomic_write(path, blob)


def load_tree_msgpack(path):
    with open(path, "rb") as f:
        data = f.read()
    try:
        obj = _unpack(data)
    except (msgpack.exceptions.UnpackException, ValueError, TypeError) as e:
        raise ValueError(f"{path}: not an alloy tree file ({e})") from e
    if not isinstance(obj, dict) or obj.get("format") != _MAGIC:
        raise ValueError(f"{path}: not an alloy tree file")
    if obj.get("version") != _VERSION:
        raise ValueError(f"{path}: tree file version {obj.get('version')} is not supported (want {_VERSION})")
    return obj["tree"]

"""Pure utilities over parameter / state trees.

A *tree* is nested ``dict`` (``str`` keys, no dots), ``list`` and ``tuple`` containers; anything
else (``mx.array``, Python scalars, ``None``, ...) is a *leaf*. A leaf is addressed by its dotted
*path*: dict keys and list indices joined with ``"."``, e.g. ``"layers.3.mixer.in_proj.weight"``,
which is also its checkpoint key. The root leaf, if the tree is a single leaf, has path ``""``.

Every function here is pure (inputs are never mutated, leaves are shared, not copied) and keeps
insertion order: dict key order is part of ``mx.compile``'s cache key.

Holes. ``filter_tree`` and ``partition`` must drop leaves without renumbering list items
(``params["layers"][3]`` stays layer 3). A dropped list item, or a dropped dict entry in
``partition``'s output, is an empty dict ``{}`` -- a *hole*. An empty container holds no leaves,
so ``flatten``, ``leaves``, ``tree_map``, ``count_params`` and ``mx.grad`` / ``mx.compile`` pass
over it; ``combine`` treats it as "nothing here" and ``merge`` as "nothing to merge". Lists and
tuples stay lists and tuples throughout.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Iterable

import mlx.core as mx

__all__ = [
    "KEEP_FP32",
    "cast",
    "combine",
    "count_params",
    "filter_tree",
    "flatten",
    "is_container",
    "leaves",
    "merge",
    "partition",
    "path_matches",
    "paths",
    "tree_bytes",
    "tree_map",
    "tree_map_with_path",
    "unflatten",
]

# Leaf names kept in float32 by ``cast``: SSM decay / skip / step-bias parameters lose too much
# precision in 16-bit floats (exp(A_log) and softplus(dt + dt_bias) feed long recurrences).
KEEP_FP32 = ("A_log", "D", "dt_bias", "slope_rate")


def is_container(x) -> bool:
    """True for the containers tree functions descend into: dict, list, tuple."""
    return isinstance(x, (dict, list, tuple))


def _is_empty(x) -> bool:
    return is_container(x) and len(x) == 0


def _join(prefix: str, key) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _check_key(key, path: str) -> None:
    if not isinstance(key, str):
        raise TypeError(f"tree keys must be str, got {type(key).__name__} {key!r} at '{path}'")
    if not key or "." in key:
        raise ValueError(f"tree key {key!r} at '{path}' must be non-empty and contain no '.'")


def _rebuild(node, items: list):
    """A container of ``node``'s kind holding ``items`` (values, in order)."""
    if isinstance(node, list):
        return items
    if hasattr(node, "_fields"):  # namedtuple
        return type(node)(*items)
    return type(node)(items)


# ----------------------------------------------------------------------------------------------
# flatten / unflatten
# ----------------------------------------------------------------------------------------------


def flatten(tree, prefix: str = "") -> dict[str, Any]:
    """Dotted path -> leaf, in traversal order. Lists/tuples contribute their indices.

    Empty containers contribute nothing (so ``unflatten(flatten(t))`` drops them).
    Raises ``ValueError`` / ``TypeError`` for keys that would not round-trip (dots, non-str).
    """
    out: dict[str, Any] = {}

    def go(path, node):
        if isinstance(node, dict):
            for k, v in node.items():
                _check_key(k, path)
                go(_join(path, k), v)
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                go(_join(path, i), v)
        else:
            out[path] = node

    go(prefix, tree)
    return out


def _is_index_level(keys) -> bool:
    n = len(keys)
    if n == 0:
        return False
    want = {str(i) for i in range(n)}
    return set(keys) == want


def unflatten(flat: dict[str, Any]):
    """Inverse of ``flatten``: nested dicts in first-seen order; a dict level whose keys are
    exactly ``"0".."n-1"`` (in any order, e.g. the sorted order of a checkpoint file) becomes a
    list ordered by index.

    Raises ``ValueError`` on an empty path component, a repeated path, or a path that is both a
    leaf and a prefix of another.
    """
    root = _Level()
    for path, leaf in flat.items():
        parts = str(path).split(".")
        if not all(parts):
            raise ValueError(f"unflatten: empty component in path {path!r}")
        node = root
        for depth, p in enumerate(parts[:-1]):
            if p not in node:
                node[p] = _Level()
            elif not isinstance(node[p], _Level):
                raise ValueError(
                    f"unflatten: '{'.'.join(parts[:depth + 1])}' is both a leaf and a prefix of '{path}'")
            node = node[p]
        last = parts[-1]
        if last in node:
            if isinstance(node[last], _Level):
                raise ValueError(f"unflatten: '{path}' is both a leaf and a prefix")
            raise ValueError(f"unflatten: '{path}' given twice")
        node[last] = leaf
    return _finish(root)


class _Level(dict):
    """Internal marker for dict levels built by ``unflatten`` (a leaf is never a _Level)."""


def _finish(node):
    if not isinstance(node, _Level):
        return node
    items = {k: _finish(v) for k, v in node.items()}
    if _is_index_level(items.keys()):
        return [items[str(i)] for i in range(len(items))]
    return items


# ----------------------------------------------------------------------------------------------
# map / leaves / paths
# ----------------------------------------------------------------------------------------------


def _map(fn, path, node, rest, with_path):
    if isinstance(node, dict):
        for r in rest:
            if not isinstance(r, dict):
                raise ValueError(f"tree_map: structure mismatch at '{path}': dict vs {type(r).__name__}")
            if r.keys() != node.keys():
                missing = [k for k in node if k not in r]
                extra = [k for k in r if k not in node]
                raise ValueError(
                    f"tree_map: key mismatch at '{path}': missing {missing}, unexpected {extra}")
        return {
            k: _map(fn, _join(path, k), v, [r[k] for r in rest], with_path) for k, v in node.items()
        }
    if isinstance(node, (list, tuple)):
        for r in rest:
            if not isinstance(r, (list, tuple)) or len(r) != len(node):
                desc = f"{type(r).__name__} of length {len(r)}" if is_container(r) else type(r).__name__
                raise ValueError(
                    f"tree_map: structure mismatch at '{path}': sequence of length {len(node)} vs {desc}")
        items = [_map(fn, _join(path, i), v, [r[i] for r in rest], with_path) for i, v in enumerate(node)]
        return _rebuild(node, items)
    return fn(path, node, *rest) if with_path else fn(node, *rest)


def tree_map(fn: Callable, tree, *rest):
    """``fn(leaf, *rest_leaves)`` over every leaf of ``tree``; same structure and order out.

    ``rest`` trees must have ``tree``'s structure (same dict keys, same list lengths; key order
    may differ, ``tree``'s order wins); where ``tree`` has a leaf, the corresponding subtree of
    each ``rest`` tree is passed whole (JAX's prefix rule).
    """
    return _map(fn, "", tree, list(rest), False)


def tree_map_with_path(fn: Callable, tree, *rest):
    """Like ``tree_map`` with ``fn(path, leaf, *rest_leaves)``; ``path`` is the dotted key."""
    return _map(fn, "", tree, list(rest), True)


def leaves(tree) -> list:
    """Leaves in traversal order (the values of ``flatten(tree)``)."""
    out: list = []

    def go(node):
        if isinstance(node, dict):
            for v in node.values():
                go(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                go(v)
        else:
            out.append(node)

    go(tree)
    return out


def paths(tree) -> list[str]:
    """Dotted paths of the leaves in traversal order (the keys of ``flatten(tree)``)."""
    return list(flatten(tree))


# ----------------------------------------------------------------------------------------------
# merge / filter / partition / combine
# ----------------------------------------------------------------------------------------------


def merge(base, update):
    """Deep merge; ``update`` wins on conflicts. Dicts merge by key (``base`` order kept, keys new
    in ``update`` appended); lists/tuples merge by index (``update``'s extra items appended).
    An empty container in ``update`` (e.g. a hole) contributes nothing. Otherwise, where the two
    differ in kind, ``update``'s value replaces ``base``'s.
    """
    if _is_empty(update):
        return base
    if isinstance(base, dict) and isinstance(update, dict):
        out = dict(base)
        for k, v in update.items():
            out[k] = merge(base[k], v) if k in base else v
        return out
    if isinstance(base, (list, tuple)) and isinstance(update, (list, tuple)):
        n = max(len(base), len(update))
        items = [
            merge(base[i], update[i]) if i < len(base) and i < len(update)
            else (base[i] if i < len(base) else update[i])
            for i in range(n)
        ]
        return _rebuild(base, items)
    return update


_DROP = object()


def _split(pred, path, node, prune):
    """(kept, dropped) for one node; ``_DROP`` marks 'nothing of this subtree here'.

    prune=True: only ``kept`` is computed; subtrees without kept leaves are dropped (holes in
    sequences). prune=False: both halves; a subtree with leaves but none kept in a half becomes
    a hole there; a subtree without any leaves is kept verbatim in both halves.
    """
    if not is_container(node):
        return (node, _DROP) if pred(path, node) else (_DROP, node)
    if len(node) == 0:
        return (_DROP, _DROP) if prune else (node, node)
    keys = list(node.keys()) if isinstance(node, dict) else range(len(node))
    a_items, b_items = [], []
    for k in keys:
        if isinstance(node, dict):
            _check_key(k, path)
        a, b = _split(pred, _join(path, k), node[k], prune)
        a_items.append(a)
        b_items.append(b)

    def build(items):
        if all(x is _DROP for x in items):
            return _DROP
        if isinstance(node, dict):
            if prune:
                return {k: x for k, x in zip(keys, items) if x is not _DROP}
            return {k: ({} if x is _DROP else x) for k, x in zip(keys, items)}
        return _rebuild(node, [{} if x is _DROP else x for x in items])

    return build(a_items), (_DROP if prune else build(b_items))


def filter_tree(pred: Callable[[str, Any], bool], tree, *, prune: bool = True):
    """The leaves with ``pred(path, leaf)`` true, at their original paths and in order.

    ``prune=True`` (default, compact): dict entries left without leaves are removed (including
    containers that were empty to begin with); a list/tuple keeps its length, with ``{}`` holes
    for items left without leaves, so indices never shift; a list left with nothing at all is
    removed. ``flatten(filter_tree(p, t))`` equals ``flatten(t)`` restricted to ``p``.
    ``prune=False`` keeps the full skeleton, as ``partition`` does (holes instead of removals).
    Nothing kept at all gives ``{}``.
    """
    kept, _ = _split(pred, "", tree, prune)
    return {} if kept is _DROP else kept


def partition(pred: Callable[[str, Any], bool], tree):
    """``(matching, rest)``: every leaf goes to exactly one side, at its path.

    Both sides keep the whole skeleton -- every dict key and list index of ``tree``, in order --
    with a ``{}`` hole wherever the subtree went entirely to the other side, so
    ``combine(*partition(p, t))`` rebuilds ``t`` exactly (structure, container types, key order,
    leaf identity). Containers holding no leaves at all appear verbatim on both sides.
    """
    a, b = _split(pred, "", tree, False)
    return ({} if a is _DROP else a), ({} if b is _DROP else b)


def _combine2(a, b, path):
    if isinstance(a, dict) and not a:  # hole
        return b
    if isinstance(b, dict) and not b:
        return a
    if isinstance(a, dict) and isinstance(b, dict):
        out = {}
        for k, v in a.items():
            out[k] = _combine2(v, b[k], _join(path, k)) if k in b else v
        for k, v in b.items():
            if k not in a:
                out[k] = v
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        n = max(len(a), len(b))
        items = [
            _combine2(a[i], b[i], _join(path, i)) if i < len(a) and i < len(b)
            else (a[i] if i < len(a) else b[i])
            for i in range(n)
        ]
        return _rebuild(a, items)
    if not is_container(a) and not is_container(b):
        raise ValueError(f"combine: both trees have a leaf at '{path or '<root>'}'")
    kind = lambda x: type(x).__name__ if is_container(x) else "leaf"  # noqa: E731
    raise ValueError(f"combine: cannot combine {kind(a)} with {kind(b)} at '{path or '<root>'}'")


def combine(a, b, *more):
    """Inverse of ``partition``: overlay trees whose leaves are disjoint.

    ``{}`` holes (and empty dicts) are identities; dicts combine by key (``a``'s order, then keys
    only in ``b``); lists/tuples by index. Two leaves at one path raise ``ValueError`` -- use
    ``merge`` to override. Also accepts ``filter_tree`` outputs (order then follows the rule above).
    """
    out = _combine2(a, b, "")
    for m in more:
        out = _combine2(out, m, "")
    return out


# ----------------------------------------------------------------------------------------------
# sizes and dtypes
# ----------------------------------------------------------------------------------------------


def count_params(tree) -> int:
    """Total number of elements over array leaves (mx / numpy); other leaves count 0.

    Uses shapes only, so lazy arrays are not evaluated.
    """
    total = 0
    for x in leaves(tree):
        if isinstance(x, mx.array) or hasattr(x, "shape") and hasattr(x, "dtype"):
            total += _prod(x.shape)
    return total


def unstack(a: mx.array) -> list:
    """[a[0], a[1], ...] as views sharing a's buffer (a slice + reshape per block; integer
    indexing ``a[i]`` would copy each block)."""
    return [a[i:i + 1].reshape(a.shape[1:]) for i in range(a.shape[0])]


def tree_bytes(tree) -> int:
    """Total bytes of array leaves (elements x item size); other leaves count 0. No evaluation."""
    total = 0
    for x in leaves(tree):
        if isinstance(x, mx.array):
            total += _prod(x.shape) * x.dtype.size
        elif hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x.dtype, "itemsize"):
            total += _prod(x.shape) * x.dtype.itemsize
    return total


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _last(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def cast(tree, dtype, keep: Iterable[str] | Callable[[str], bool] | None = KEEP_FP32):
    """Cast floating ``mx.array`` leaves to ``dtype``; integer/bool leaves and non-arrays untouched.

    Floating leaves selected by ``keep`` are cast to float32 instead: ``keep`` is a collection of
    leaf names (matched against the last path component, e.g. ``"A_log"`` matches
    ``"layers.0.mixer.A_log"``) or a callable ``keep(path) -> bool``; ``None`` / ``()`` keeps none.
    Leaves already of the target dtype are returned as is (no extra graph node). Lazy.
    """
    if keep is None:
        keep_fn = lambda p: False  # noqa: E731
    elif callable(keep):
        keep_fn = keep
    else:
        if isinstance(keep, str):
            keep = (keep,)
        names = frozenset(keep)
        keep_fn = lambda p: _last(p) in names  # noqa: E731

    def f(path, x):
        if not isinstance(x, mx.array) or not mx.issubdtype(x.dtype, mx.floating):
            return x
        target = mx.float32 if keep_fn(path) else dtype
        return x if x.dtype == target else x.astype(target)

    return tree_map_with_path(f, tree)


# ----------------------------------------------------------------------------------------------
# path patterns
# ----------------------------------------------------------------------------------------------


def _glob_component(c: str) -> str:
    # fnmatch's syntax, with '*' and '?' confined to one component.
    out, i = [], 0
    while i < len(c):
        ch = c[i]
        if ch == "*":
            out.append(r"[^.]*")
        elif ch == "?":
            out.append(r"[^.]")
        elif ch == "[":
            j = c.find("]", i + 2 if i + 1 < len(c) and c[i + 1] in "!^" else i + 1)
            if j == -1:
                out.append(re.escape(ch))
            else:
                body = c[i + 1:j]
                if body[:1] in ("!", "^"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = j
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out)


@functools.lru_cache(maxsize=1024)
def _compile(pattern: str) -> re.Pattern:
    if pattern.startswith("re:"):
        return re.compile(pattern[3:])
    comps = pattern.split(".")
    if not all(comps):
        raise ValueError(f"path pattern {pattern!r} has an empty component")
    if len(comps) == 1 and comps[0] == "**":
        return re.compile(r".*", re.S)
    out = []
    for i, c in enumerate(comps):
        if c == "**":
            # Zero or more whole components; absorbs the separator on one side.
            out.append(r"(?:[^.]+\.)*" if i == 0 else r"(?:\.[^.]+)*")
            continue
        if i > 0 and not (comps[i - 1] == "**" and i - 1 == 0):
            out.append(r"\.")
        out.append(_glob_component(c))
    # Globs match a trailing run of whole components (anchored at a component boundary).
    return re.compile(r"(?:.*\.)?" + "".join(out), re.S)


def path_matches(path: str, patterns: str | Iterable[str]) -> bool:
    """True if dotted ``path`` matches any of ``patterns`` (one string or an iterable).

    Syntax:
      * ``"re:<regex>"`` -- a Python regex that must match the *whole* path (``re.fullmatch``),
        e.g. ``r"re:layers\\.(0|1)\\.mixer\\..*"``.
      * otherwise a glob over dotted components: ``*`` matches within one component, ``?`` one
        character, ``[abc]`` / ``[!abc]`` a character class, ``**`` any number (incl. zero) of
        whole components. A glob matches a *suffix of whole components* of the path, so
        ``"q_proj"`` matches ``"layers.3.attn.q_proj"`` (not ``"layers.3.attn.xq_proj"``),
        ``"attn.*_proj.weight"`` matches ``"layers.0.attn.q_proj.weight"``,
        ``"layers.1.*"`` matches ``"layers.1.norm"`` but not ``"layers.1.attn.q_proj"``
        (use ``"layers.1.**"``), and ``"layers.1.**"`` also matches ``"layers.1"`` itself.
        Anchor at the root with a regex.
    """
    if isinstance(patterns, str):
        patterns = (patterns,)
    return any(_compile(p).fullmatch(path) is not None for p in patterns)


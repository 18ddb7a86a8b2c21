"""A parameter tree's leaves packed into a few flat buffers, one per group.

    layout = FlatLayout(params, group=lambda path, leaf: "decay" if leaf.ndim >= 2 else "rest")
    flats = layout.pack(params)              # {"decay": (n1,), "rest": (n2,)}: one concatenation each
    tree = layout.unpack(flats)              # the tree again: reshaped slices of the buffers
    tree = layout.unpack_differentiable(flats)   # the same, with a gradient that concatenates

Why: per-leaf work (a cast, a gradient norm's square and sum, an optimizer update) costs one or
more kernel launches per leaf, and a model has a hundred or more leaves. Over the packed buffers
the same work is a few launches in all (`alloy.train.step`'s ``flat=True``). The slices of
``unpack`` are views of the buffers; ``unpack_differentiable`` gives them a VJP that joins the
leaves' cotangents with one concatenation per group, where autodiff of slicing would build a
zero-filled buffer and an update for every leaf.

Leaves keep their order (``alloy.params.flatten`` order) inside each group; a group takes the
dtype of its first leaf (``pack`` casts the others to it). ``group(path, leaf)`` returns a group
name (a string without dots) or None for a leaf left out (``pack`` skips it, ``unpack`` needs
those leaves passed back in ``rest``).
"""
from __future__ import annotations

from typing import Any, Callable

import mlx.core as mx

from alloy.params.tree import combine, flatten, partition, tree_map, tree_map_with_path

__all__ = ["FlatLayout"]


class FlatLayout:
    """Where each leaf of a tree lives in its group's flat buffer (see the module docstring)."""

    def __init__(self, tree, group: Callable[[str, Any], str | None]):
        self.groups: dict[str, list[tuple[str, tuple, int, int]]] = {}  # name -> [(path, shape, start, size)]
        self.dtypes: dict[str, Any] = {}
        where: dict[str, str] = {}
        for path, leaf in flatten(tree).items():
            name = group(path, leaf)
            if name is None:
                continue
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(f"FlatLayout: group name for '{path}' must be a non-empty str without dots, "
                                 f"got {name!r}")
            entries = self.groups.setdefault(name, [])
            start = entries[-1][2] + entries[-1][3] if entries else 0
            entries.append((path, tuple(leaf.shape), start, int(leaf.size)))
            self.dtypes.setdefault(name, leaf.dtype)
            where[path] = name
        self._where = where
        self.sizes = {name: e[-1][2] + e[-1][3] for name, e in self.groups.items()}
        # the packed half's skeleton (holes where other leaves sit), its leaves replaced by their paths
        self._paths = tree_map_with_path(lambda path, _: path, self.split(tree)[0])

    def split(self, tree):
        """``(packed_part, rest)``: the leaves this layout packs and the others, as ``partition``."""
        return partition(lambda path, leaf: path in self._where, tree)

    def _check(self, tree):
        got = flatten(self.split(tree)[0])
        for name, entries in self.groups.items():
            for path, shape, _, _ in entries:
                if path not in got:
                    raise ValueError(f"FlatLayout: the tree has no leaf '{path}' (group {name!r})")
                if tuple(got[path].shape) != shape:
                    raise ValueError(f"FlatLayout: leaf '{path}' has shape {tuple(got[path].shape)}, "
                                     f"the layout expects {shape}")

    def pack(self, tree) -> dict[str, mx.array]:
        """One flat buffer per group (a concatenation; leaves cast to the group's dtype)."""
        self._check(tree)
        leaves = flatten(tree)
        return {name: mx.concatenate([leaves[p].astype(self.dtypes[name]).reshape(-1) for p, *_ in entries])
                for name, entries in self.groups.items()}

    def _slices(self, flats) -> dict[str, mx.array]:
        missing = set(self.groups) - set(flats)
        if missing:
            raise ValueError(f"FlatLayout: no buffer for group(s) {sorted(missing)}")
        out = {}
        for name, entries in self.groups.items():
            buf = flats[name]
            if buf.shape != (self.sizes[name],):
                raise ValueError(f"FlatLayout: buffer {name!r} has shape {tuple(buf.shape)}, "
                                 f"expected ({self.sizes[name]},)")
            for path, shape, start, size in entries:
                out[path] = buf[start:start + size].reshape(shape)
        return out

    def _tree(self, by_path, rest):
        packed = tree_map(lambda path: by_path[path], self._paths)
        return packed if rest is None else combine(packed, rest)

    def unpack(self, flats, rest=None):
        """The tree from the buffers (views), combined with ``rest`` (the leaves not packed)."""
        return self._tree(self._slices(flats), rest)

    def unpack_differentiable(self, flats, rest=None):
        """``unpack`` whose VJP joins the leaves' cotangents into one buffer per group."""
        names = list(self.groups)
        paths = [p for n in names for p, *_ in self.groups[n]]
        fn = _joiner(self, tuple(names))
        leaves = fn(*[flats[n] for n in names])
        return self._tree(dict(zip(paths, leaves)), rest)


def _joiner(layout: FlatLayout, names: tuple):
    counts = [len(layout.groups[n]) for n in names]

    @mx.custom_function
    def split(*bufs):
        by_path = layout._slices(dict(zip(names, bufs)))
        return [by_path[p] for n in names for p, *_ in layout.groups[n]]

    @split.vjp
    def split_vjp(primals, cotangents, outputs):
        out, i = [], 0
        for n, k, buf in zip(names, counts, primals):
            out.append(mx.concatenate([c.astype(buf.dtype).reshape(-1) for c in cotangents[i:i + k]]))
            i += k
        return out

    return split

"""Data parallel training on MLX's own engine, ``mx.distributed``.

Every process (rank) holds the whole model, takes its own slice of each global batch, computes
gradients, and averages them with one ``all_sum`` per bucket::

    g = (1 / N) * sum_{r < N} g_r          g_r = dL_r/dparams on rank r's slice        (1)

With equal slices and a per-slice *mean* loss, (1) is exactly the gradient of the mean loss over
the whole global batch, so N processes on B/N rows each take the same optimizer step as one
process on B rows (up to summation order). Every rank then applies that same update to the same
params, so the replicas never drift (``broadcast`` puts them on rank 0's values to begin with).

Launch with MLX's launcher (the ``mlx.launch`` console script installed with MLX)::

    mlx.launch --backend ring -n 2 -- python train.py       # 2 processes on this machine (CPU)
    mlx.launch --backend nccl -n 8 -- python train.py       # 8 GPUs of one host (mlx[cuda])

see ``docs/lora_and_parallel.md`` for hosts, ports and the environment each backend reads.
Without a launcher the world is one process and every function here is a no-op that returns
its input unchanged, so the same script runs alone or launched.

    group = init()                       # mx.distributed.init(backend="any")
    rank, size = world(group)
    batch = shard(global_batch, rank, size)
    loss, grads = value_and_grad(params, batch)
    grads = average_gradients(grads, group)
"""
from __future__ import annotations

from typing import Any

import mlx.core as mx

from alloy.params.tree import flatten, tree_map, tree_map_with_path

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "all_mean",
    "average_gradients",
    "broadcast",
    "init",
    "is_main",
    "shard",
    "world",
]

BACKENDS = ("any", "ring", "nccl", "mpi", "jaccl")
# Leaves are fused into buckets of up to 32 MiB (the default of mlx.nn.average_gradients too): a
# model's gradient takes a handful of all_sum calls instead of one per leaf, and the concatenated
# copy of a bucket stays small next to the model. (Not measured here; bucket_bytes=0 turns it off.)
DEFAULT_BUCKET_BYTES = 32 * 2 ** 20


def init(backend: str = "any", strict: bool = False) -> mx.distributed.Group:
    """The global group (``mx.distributed.init``). ``backend`` is one of ``"any"`` (the first
    that the launch environment configures), ``"ring"``, ``"nccl"``, ``"mpi"``, ``"jaccl"``.

    Not launched (or no backend available) and ``strict=False``: a group of size 1. Repeated
    calls return the same global group.
    """
    if backend not in BACKENDS:
        raise ValueError(f"init: backend must be one of {BACKENDS}, got {backend!r}")
    return mx.distributed.init(strict=strict, backend=backend)


def _group(group):
    return init() if group is None else group


def world(group: mx.distributed.Group | None = None) -> tuple[int, int]:
    """``(rank, size)`` of ``group`` (default: the global group)."""
    g = _group(group)
    return g.rank(), g.size()


def is_main(group: mx.distributed.Group | None = None) -> bool:
    """True on rank 0: the process that logs, writes checkpoints and samples."""
    return _group(group).rank() == 0


def shard(batch, rank: int, size: int):
    """Rank ``rank``'s contiguous slice of every array leaf's leading (batch) axis.

    ``batch`` is an array or a tree of arrays sharing the leading size ``B``; each rank gets rows
    ``[rank * B/size, (rank+1) * B/size)``, so concatenating the shards in rank order gives the
    batch back. ``B`` must be divisible by ``size`` (equal slices are what makes (1) exact).
    Non-array leaves (e.g. a Python step count) are returned as they are.
    """
    for name, v in (("rank", rank), ("size", size)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"shard: {name} must be an int, got {type(v).__name__}")
    if size <= 0 or not 0 <= rank < size:
        raise ValueError(f"shard: need 0 <= rank < size, got rank={rank}, size={size}")
    sizes = {p or "<batch>": a.shape[0] for p, a in flatten(batch).items()
             if isinstance(a, mx.array) and a.ndim > 0}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"shard: array leaves disagree on the batch size: {sizes}")
    if not sizes:
        return batch
    B = next(iter(sizes.values()))
    if B % size:
        raise ValueError(f"shard: batch size {B} is not divisible by the world size {size}")
    if size == 1:
        return batch
    n = B // size
    lo, hi = rank * n, (rank + 1) * n

    def take(x):
        return x[lo:hi] if isinstance(x, mx.array) and x.ndim > 0 else x

    return tree_map(take, batch)


def _all_sum(x, group, stream):
    return mx.distributed.all_sum(x, group=group, stream=stream)


def average_gradients(grads, group: mx.distributed.Group | None = None, *,
                      bucket_bytes: int = DEFAULT_BUCKET_BYTES, stream=None):
    """Eq. (1): the mean of ``grads`` over the ranks of ``group``, same tree out.

    Leaves are fused into flat buckets of one dtype (up to ``bucket_bytes`` each, in tree order)
    so a whole model takes a handful of ``all_sum`` calls instead of one per leaf; each bucket is
    summed, divided by the world size in its own dtype, split and reshaped back. The result has
    the input's structure, key order, holes and dtypes. ``bucket_bytes <= 0``: one call per leaf.
    One process: returns ``grads`` itself (no copy, no communication).

    ``stream``: where the collective runs (e.g. ``mx.cpu`` for the ring backend on a Mac GPU
    build); ``None`` lets MLX pick. Works under ``mx.compile``. Leaves must be ``mx.array``.
    """
    g = _group(group)
    n = g.size()
    if n == 1:
        return grads
    flat = flatten(grads)
    bad = [p for p, v in flat.items() if not isinstance(v, mx.array)]
    if bad:
        raise TypeError(f"average_gradients: leaves must be mx.array; not arrays: {bad}")
    if not flat:
        return grads
    if bucket_bytes <= 0:
        return tree_map(lambda x: _all_sum(x, g, stream) / n, grads)

    # Buckets: runs of leaves of one dtype, in tree order, closed when they reach bucket_bytes.
    buckets: list[list[str]] = []
    open_by_dtype: dict[Any, tuple[list[str], int]] = {}
    for p, v in flat.items():
        cur, nbytes = open_by_dtype.get(v.dtype, (None, 0))
        if cur is None:
            cur = []
            buckets.append(cur)
        cur.append(p)
        nbytes += v.nbytes
        if nbytes >= bucket_bytes:
            open_by_dtype.pop(v.dtype, None)
        else:
            open_by_dtype[v.dtype] = (cur, nbytes)

    out: dict[str, mx.array] = {}
    for paths in buckets:
        leaves = [flat[p] for p in paths]
        if len(leaves) == 1:
            out[paths[0]] = _all_sum(leaves[0], g, stream) / n
            continue
        summed = _all_sum(mx.concatenate([x.reshape(-1) for x in leaves]), g, stream) / n
        offsets, acc = [], 0
        for x in leaves[:-1]:
            acc += x.size
            offsets.append(acc)
        for p, x, part in zip(paths, leaves, mx.split(summed, offsets)):
            out[p] = part.reshape(x.shape)
    return tree_map_with_path(lambda p, _: out[p], grads)


def all_mean(tree, group: mx.distributed.Group | None = None):
    """Mean over ranks of every leaf (metrics such as the loss); ``average_gradients`` by name."""
    return average_gradients(tree, group)


def broadcast(tree, group: mx.distributed.Group | None = None, root: int = 0):
    """Every rank gets ``root``'s leaves: ``all_sum`` of root's values and zeros elsewhere.

    Exact (x + 0 + ... + 0 == x), so replicas start bit-identical even if their inits differ.
    Leaves must have the same shapes and dtypes on every rank. One process: ``tree`` itself.
    """
    g = _group(group)
    if not 0 <= root < g.size():
        raise ValueError(f"broadcast: root {root} is not a rank of a group of size {g.size()}")
    if g.size() == 1:
        return tree
    mine = g.rank() == root
    return tree_map(lambda x: _all_sum(x if mine else mx.zeros_like(x), g, None), tree)

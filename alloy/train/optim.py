"""Optimizers as pure ``(init, update)`` pairs over parameter trees.

    opt = adamw(weight_decay=0.1)
    opt_state = opt.init(params)                                   # fp32 moments, step counter
    params, opt_state = opt.update(grads, opt_state, params, lr)   # lr: an mx.array scalar

``update`` is pure (nothing is mutated) and traceable: it can live inside ``mx.compile``; the
learning rate is an argument (a schedule's output), so one trace serves every step.

AdamW (Loshchilov & Hutter 2019, decoupled weight decay), per leaf, in float32::

    m_t = b1 m_{t-1} + (1 - b1) g_t ;          v_t = b2 v_{t-1} + (1 - b2) g_t^2
    m^ = m_t / (1 - b1^t) ;                    v^ = v_t / (1 - b2^t)
    p_t = p_{t-1} - lr * ( m^ / (sqrt(v^) + eps) + wd * [decay(path, p)] * p_{t-1} )

Precision: moments are float32 and the update is computed on a float32 copy of the parameter,
which is cast back to the parameter's own dtype. Keep the trained params in float32 (the master
weights) and cast to bf16 inside the loss (``alloy.train.step``), never the other way round.

Integer leaves (lookup tables such as hash_moe's ``tid2eid``) are frozen: both optimizers return
them unchanged.

Weight decay applies only where a rule says so: ``decay_rule`` is a predicate over ``(path, leaf)``
(dotted paths from ``alloy.params``), evaluated at trace time, so it costs nothing per step.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import mlx.core as mx

from alloy.params.tree import KEEP_FP32, leaves, tree_map, tree_map_with_path

__all__ = ["Optimizer", "adamw", "sgd", "decay_rule", "global_norm", "clip_by_global_norm",
           "accumulate", "scale_tree"]


class Optimizer(NamedTuple):
    """``init(params) -> state``; ``update(grads, state, params, lr, decay=None) -> (params, state)``.

    ``decay`` is the optimizer's weight-decay rule ``(path, leaf) -> bool`` (None: it has none);
    ``update(..., decay=rule)`` applies another rule for that call (e.g. per packed buffer, when the
    leaves were regrouped by ``alloy.params.flat``)."""

    init: Callable
    update: Callable
    decay: Callable | None = None


def decay_rule(decay_embeddings: bool = False) -> Callable[[str, object], bool]:
    """The default weight-decay predicate ``(path, leaf) -> bool``.

    Decay matrices and conv kernels (``leaf.ndim >= 2``); never norms (a ``*norm*`` component),
    biases, ``A_log``, ``D``, ``dt_bias`` (``alloy.params.KEEP_FP32``); embeddings
    (``embed_tokens``, which is also the head when tied) only with ``decay_embeddings=True``.
    """

    def rule(path: str, leaf) -> bool:
        parts = path.split(".")
        if getattr(leaf, "ndim", 0) < 2:
            return False
        if parts[-1] in KEEP_FP32 or parts[-1] == "bias":
            return False
        if any("norm" in p for p in parts):
            return False
        if not decay_embeddings and any(p.startswith("embed") for p in parts):
            return False
        return True

    return rule


def global_norm(tree) -> mx.array:
    """sqrt(sum over floating leaves of sum(x^2)), in float32; 0 for a tree without leaves.
    (Integer leaves are frozen tables: their "gradients" carry nothing.)"""
    sq = [mx.sum(mx.square(x.astype(mx.float32))) for x in leaves(tree) if mx.issubdtype(x.dtype, mx.floating)]
    if not sq:
        return mx.array(0.0, dtype=mx.float32)
    return mx.sqrt(sum(sq[1:], sq[0]))


def scale_tree(tree, s):
    """Every leaf times ``s`` (kept in the leaf's dtype)."""
    return tree_map(lambda x: (x * s).astype(x.dtype), tree)


def clip_by_global_norm(grads, max_norm: float | None):
    """``(grads * min(1, max_norm / (norm + 1e-6)), norm)``; ``max_norm`` None/0: no clipping.
    Float32 leaves stay float32; 16-bit ones (gradients taken at a bf16 / fp16 compute tree) come
    back widened to float32, the product not rounded back (the optimizer works in float32)."""
    norm = global_norm(grads)
    if not max_norm:
        return grads, norm
    scale = mx.minimum(1.0, max_norm / (norm + 1e-6))
    return tree_map(lambda g: g.astype(mx.float32) * scale if g.dtype in (mx.bfloat16, mx.float16)
                    else (g * scale).astype(g.dtype), grads), norm


def accumulate(acc, grads):
    """``acc + grads`` leafwise in float32; ``acc`` None starts a sum (gradient accumulation)."""
    if acc is None:
        return tree_map(lambda g: g.astype(mx.float32), grads)
    return tree_map(lambda a, g: a + g.astype(mx.float32), acc, grads)


def _zeros32(params):
    return tree_map(lambda p: mx.zeros(p.shape, dtype=mx.float32), params)


def adamw(b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.1,
          decay: Callable[[str, object], bool] | None = None) -> Optimizer:
    """AdamW with decoupled weight decay where ``decay(path, leaf)`` (default ``decay_rule()``).

    State: ``{"step": int32 scalar (updates done), "mu": tree, "nu": tree}`` (fp32 moments).
    """
    for name, v in (("b1", b1), ("b2", b2)):
        if not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
            raise ValueError(f"adamw: {name} must be in [0, 1), got {v!r}")
    if not isinstance(eps, (int, float)) or eps <= 0:
        raise ValueError(f"adamw: eps must be positive, got {eps!r}")
    if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"adamw: weight_decay must be >= 0, got {weight_decay!r}")
    rule = decay_rule() if decay is None else decay

    def init(params):
        return {"step": mx.array(0, dtype=mx.int32), "mu": _zeros32(params), "nu": _zeros32(params)}

    def update(grads, state, params, lr, decay=None):
        use = rule if decay is None else decay
        t = (state["step"] + 1).astype(mx.float32)
        c1 = 1.0 - mx.power(mx.array(b1, mx.float32), t)
        c2 = 1.0 - mx.power(mx.array(b2, mx.float32), t)
        lr = mx.array(lr, dtype=mx.float32) if not isinstance(lr, mx.array) else lr.astype(mx.float32)

        def leaf(path, p, g, m, v):
            if not mx.issubdtype(p.dtype, mx.floating):
                return _Leaf(p, m, v)
            g = g.astype(mx.float32)
            m = b1 * m + (1.0 - b1) * g
            v = b2 * v + (1.0 - b2) * mx.square(g)
            p32 = p.astype(mx.float32)
            u = (m / c1) / (mx.sqrt(v / c2) + eps)
            if weight_decay and use(path, p):
                u = u + weight_decay * p32
            return _Leaf((p32 - lr * u).astype(p.dtype), m, v)

        out = tree_map_with_path(leaf, params, grads, state["mu"], state["nu"])
        return _pick(out, 0), {"step": state["step"] + 1, "mu": _pick(out, 1), "nu": _pick(out, 2)}

    return Optimizer(init, update, rule)


def sgd(momentum: float = 0.0, weight_decay: float = 0.0,
        decay: Callable[[str, object], bool] | None = None) -> Optimizer:
    """SGD with (heavy-ball) momentum and decoupled weight decay::

        b_t = momentum b_{t-1} + g_t ;   p_t = p_{t-1} - lr (b_t + wd [decay] p_{t-1})
    """
    if not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
        raise ValueError(f"sgd: momentum must be in [0, 1), got {momentum!r}")
    rule = decay_rule() if decay is None else decay

    def init(params):
        return {"step": mx.array(0, dtype=mx.int32), "mu": _zeros32(params)}

    def update(grads, state, params, lr, decay=None):
        use = rule if decay is None else decay
        lr = mx.array(lr, dtype=mx.float32) if not isinstance(lr, mx.array) else lr.astype(mx.float32)

        def leaf(path, p, g, b):
            if not mx.issubdtype(p.dtype, mx.floating):
                return _Leaf(p, b)
            b = momentum * b + g.astype(mx.float32)
            p32 = p.astype(mx.float32)
            u = b + weight_decay * p32 if weight_decay and use(path, p) else b
            return _Leaf((p32 - lr * u).astype(p.dtype), b)

        out = tree_map_with_path(leaf, params, grads, state["mu"])
        return _pick(out, 0), {"step": state["step"] + 1, "mu": _pick(out, 1)}

    return Optimizer(init, update, rule)


class _Leaf:
    """Several per-leaf results carried through one ``tree_map`` (not a container, so a leaf)."""

    __slots__ = ("items",)

    def __init__(self, *items):
        self.items = items


def _pick(tree, i):
    """Component ``i`` of a tree of ``_Leaf`` results."""
    return tree_map(lambda o: o.items[i], tree)

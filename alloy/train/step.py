"""The compiled train step: ``step(params, opt_state, batch, key) -> (params, opt_state, metrics)``.

Two layers, so LoRA, data parallel and subset training plug in without forking the step:

``make_step(loss_fn, optimizer, schedule, *, clip_norm=1.0, accum_steps=1, grad_reduce=None)``
    the general step over a *trainable* tree and a *frozen* tree::

        loss_fn(trainable, frozen, batch, key) -> (loss, aux)       # loss: scalar; aux: dict of arrays
        step(trainable, opt_state, batch, key, frozen=None) -> (trainable, opt_state, metrics)

    Gradients are taken w.r.t. ``trainable`` only; ``frozen`` (e.g. the base weights under LoRA
    adapters) is an ordinary argument, never captured, so it is not baked into the graph.
    Inside, per step::

        (loss, aux), g = value_and_grad(loss_fn)(trainable, frozen, batch_k, key_k)   k < accum_steps
        g = mean_k g ;  g = grad_reduce(g)            # data parallel: all_sum / n_workers (optional)
        g, norm = clip_by_global_norm(g, clip_norm)
        lr = schedule(opt_state["step"])
        trainable, opt_state = optimizer.update(g, opt_state, trainable, lr)
        metrics = {"loss", "grad_norm", "lr", **aux}  (aux averaged over micro-batches)

    ``grad_reduce`` is any ``grads -> grads`` callable traced into the compiled update (e.g.
    ``lambda g: tree_map(lambda x: mx.distributed.all_sum(x) / n, g)``); it sees the
    accumulated, not yet clipped gradient, so clipping acts on the global gradient.

``make_train_step(model, optimizer, schedule, *, compute_dtype=None, remat=False, trainable=None,
...)`` is the language-model step over the full params tree (``step(params, opt_state, batch,
key)``); ``trainable`` (a ``(path, leaf) -> bool`` predicate) trains a subset: the tree is split
with ``alloy.params.partition`` inside the step and recombined in its original key order; build
the matching optimizer state with ``init_opt_state(optimizer, params, trainable)``.

Batches: ``{"tokens": (B, T+1) int32}`` -- inputs ``tokens[:, :-1]``, targets ``tokens[:, 1:]`` --
and optionally ``"mask": (B, T)`` (1 where a target counts; synthetic tasks score only answers).
Every call must pass the same keys and shapes (a new shape traces once more, by design).

Compilation: the whole step (accum_steps = 1) is one ``mx.compile``d function of arrays only;
configs are closed over, params / optimizer state / batch / key are arguments, and the step
counter lives in ``opt_state["step"]`` as an array, so it traces once and never retraces.
With ``accum_steps = A > 1`` the batch's leading axis is split into A equal micro-batches; a
compiled gradient function runs per micro-batch (its sum is evaluated between calls to bound
memory) and a compiled update applies the mean. Micro-batches are weighted equally (the exact
full-batch gradient when every micro-batch has the same number of counted targets, as with
packed LM data).

Mixed precision (``compute_dtype=mx.bfloat16``): params stay float32 (master weights; the
optimizer's moments are float32 too); the loss casts them to bf16 with ``alloy.params.cast``,
which keeps ``A_log``, ``D``, ``dt_bias`` in float32; the SSM scans accumulate in float32
whatever the activation dtype; the cross-entropy is computed in float32.

Gradient checkpointing (``remat=True``): each block runs under ``mx.checkpoint`` (activations
recomputed in the backward pass); same values and gradients, less memory.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import mlx.core as mx

from alloy.layers import stack
from alloy.ops.loss import cross_entropy
from alloy.params.flat import FlatLayout
from alloy.params.tree import cast, combine, flatten, partition, tree_map
from alloy.train.optim import Optimizer, accumulate, clip_by_global_norm

__all__ = ["make_lm_loss", "make_step", "make_train_step", "init_opt_state", "make_eval_fn",
           "bits_per_token", "FlatPlan", "lm_flat_plan"]


def _split_batch(batch: dict):
    tokens = batch["tokens"]
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"batch['tokens'] must be (batch, T+1) with T >= 1, got shape {tuple(tokens.shape)}")
    return tokens[:, :-1], tokens[:, 1:], batch.get("mask")


def make_lm_loss(model, *, compute_dtype=None, remat: bool = False,
                 combine_fn: Callable | None = None) -> Callable:
    """Next-token cross-entropy ``loss_fn(trainable, frozen, batch, key) -> (loss, aux)``.

    params = ``combine_fn(trainable, frozen, key)`` (default: ``alloy.params.combine(trainable,
    frozen)``, i.e. the two halves of a ``partition``; a LoRA step passes
    ``lambda a, base, key: apply_lora(base, a, cfg, key)``), cast to ``compute_dtype`` if given.
    loss = mean over counted targets of ``-log softmax(logits)[target]`` (nats, float32).
    aux: ``{"accuracy"}`` (argmax == target over counted targets) when the batch has a mask.
    """
    apply = stack.make_apply(model.config, remat=True) if remat else model.apply

    def loss_fn(trainable, frozen, batch, key):
        params = combine_fn(trainable, frozen, key) if combine_fn is not None else combine(trainable, frozen)
        if compute_dtype is not None:
            params = cast(params, compute_dtype)
        inputs, targets, mask = _split_batch(batch)
        logits, _ = apply(params, inputs)
        loss = cross_entropy(logits, targets, mask)
        aux = {}
        if mask is not None:
            m = mask.astype(mx.float32)
            hit = (mx.argmax(logits, axis=-1) == targets).astype(mx.float32)
            aux["accuracy"] = (hit * m).sum() / mx.maximum(m.sum(), 1.0)
        return loss, aux

    return loss_fn


class FlatPlan(NamedTuple):
    """How a flat step packs the trainable tree (``lm_flat_plan``): the layout, each buffer's
    compute dtype, and whether the optimizer decays it."""

    layout: FlatLayout
    compute: dict
    decay: dict


def lm_flat_plan(params, optimizer: Optimizer, compute_dtype=None) -> FlatPlan:
    """The packing of ``make_train_step(..., flat=True)``: the floating leaves of ``params`` in one
    flat float32 buffer per (compute dtype under ``alloy.params.cast``, weight decay under the
    optimizer's rule) pair, e.g. ``bfloat16_decay`` / ``float32_nodecay``; other leaves stay a tree."""
    if optimizer.decay is None:
        raise ValueError("flat=True needs an optimizer with a weight-decay rule (Optimizer.decay), "
                         "e.g. alloy.train.adamw() or sgd()")
    target = flatten(cast(params, compute_dtype) if compute_dtype is not None else params)

    def group(path, leaf):
        if not isinstance(leaf, mx.array) or not mx.issubdtype(leaf.dtype, mx.floating):
            return None
        dt = str(target[path].dtype).rsplit(".", 1)[-1]
        return f"{dt}_{'decay' if optimizer.decay(path, leaf) else 'nodecay'}"

    layout = FlatLayout(params, group)
    compute = {n: getattr(mx, n.rsplit("_", 1)[0]) for n in layout.groups}
    decay = {n: n.endswith("_decay") for n in layout.groups}
    return FlatPlan(layout, compute, decay)


# With a compute dtype (one micro-batch, no flat packing, no gradient all-reduce: sums across ranks
# stay float32), `make_train_step` differentiates the loss at the cast trainable tree instead of the
# float32 masters: the gradients come out in the compute dtype with the values the masters' gradients
# would have (the cast's VJP only widens them: every cotangent is summed in the compute dtype before
# it), and the global norm / clipping / AdamW widen them inside their own kernels instead of a float32
# copy of every gradient leaf being written and read back (~95M x 6 bytes of casts in the toy step's
# backward). H100 toy step (40 pipelined steps, same job): 69.4 / 69.9 ms on vs 69.5 off, within the
# run-to-run noise; the same peak memory (docs/benchmarks.md session 12).
GRADS_IN_COMPUTE_DTYPE = True


def make_step(loss_fn: Callable, optimizer: Optimizer, schedule: Callable, *,
              clip_norm: float | None = 1.0, accum_steps: int = 1,
              grad_reduce: Callable | None = None, compile: bool = True,
              flat: FlatPlan | None = None, grad_at: Callable | None = None) -> Callable:
    """``step(trainable, opt_state, batch, key, frozen=None) -> (trainable, opt_state, metrics)``.

    See the module docstring for the contract of ``loss_fn`` and ``grad_reduce``. With ``flat``
    (a ``FlatPlan`` of the trainable tree), the step packs the trainable leaves into its buffers,
    casts each buffer once, differentiates through ``FlatLayout.unpack_differentiable`` and runs the
    norm, clipping and optimizer over the buffers (``opt_state`` from ``optimizer.init`` of the
    packed buffers; ``init_opt_state(..., flat=...)``); same values, a few launches instead of
    several per leaf. ``grad_at`` (accum_steps 1, no ``flat``): the loss is differentiated at
    ``grad_at(trainable)`` (e.g. the trainable tree cast to the compute dtype, which ``loss_fn``'s
    own cast then leaves as is), so the gradients come in that tree's dtypes.
    """
    if not isinstance(accum_steps, int) or accum_steps < 1:
        raise ValueError(f"make_step: accum_steps must be a positive int, got {accum_steps!r}")
    if flat is not None and accum_steps != 1:
        raise ValueError(f"make_step: flat packing supports accum_steps=1, got {accum_steps}")
    if grad_at is not None and (flat is not None or accum_steps != 1):
        raise ValueError("make_step: grad_at needs accum_steps=1 and no flat packing (micro-batch gradients "
                         "accumulate in the trainable tree's own dtype)")
    vg = mx.value_and_grad(loss_fn)
    maybe = mx.compile if compile else (lambda f: f)

    def finish(trainable, opt_state, grads, loss, aux):
        if grad_reduce is not None:
            grads = grad_reduce(grads)
        grads, norm = clip_by_global_norm(grads, clip_norm)
        lr = schedule(opt_state["step"])
        if flat is None:
            trainable, opt_state = optimizer.update(grads, opt_state, trainable, lr)
        else:
            trainable, opt_state = optimizer.update(grads, opt_state, trainable, lr,
                                                    decay=lambda path, _: flat.decay[path])
        return trainable, opt_state, {"loss": loss, "grad_norm": norm, "lr": lr, **aux}

    if flat is not None:
        layout = flat.layout

        def flat_loss(bufs, rest, frozen, batch, key):
            cast_bufs = {n: b.astype(flat.compute[n]) for n, b in bufs.items()}
            return loss_fn(layout.unpack_differentiable(cast_bufs, rest), frozen, batch, key)

        vg_flat = mx.value_and_grad(flat_loss)

        def whole_flat(trainable, opt_state, batch, key, frozen):
            packed, rest = layout.split(trainable)
            bufs = layout.pack(packed)
            (loss, aux), grads = vg_flat(bufs, rest, frozen, batch, key)
            grads = {n: g.astype(mx.float32) for n, g in grads.items()}
            bufs, opt_state, metrics = finish(bufs, opt_state, grads, loss, aux)
            return layout.unpack(bufs, rest), opt_state, metrics

        whole_flat_c = maybe(whole_flat)

        def step(trainable, opt_state, batch, key, frozen=None):
            return whole_flat_c(trainable, opt_state, batch, key, {} if frozen is None else frozen)

        return step

    if accum_steps == 1:
        def whole(trainable, opt_state, batch, key, frozen):
            (loss, aux), grads = vg(trainable if grad_at is None else grad_at(trainable), frozen, batch, key)
            return finish(trainable, opt_state, grads, loss, aux)

        whole_c = maybe(whole)

        def step(trainable, opt_state, batch, key, frozen=None):
            return whole_c(trainable, opt_state, batch, key, {} if frozen is None else frozen)

        return step

    A = accum_steps

    def micro(trainable, frozen, batch, key):
        (loss, aux), grads = vg(trainable, frozen, batch, key)
        return loss, aux, grads

    def add(acc, loss, aux, grads):
        return accumulate(acc[0], grads), acc[1] + loss, {k: acc[2][k] + v for k, v in aux.items()}

    def finish_mean(trainable, opt_state, gsum, lsum, asum):
        mean = lambda x: x / A  # noqa: E731
        return finish(trainable, opt_state, tree_map(mean, gsum), mean(lsum), {k: mean(v) for k, v in asum.items()})

    micro_c, add_c, finish_c = maybe(micro), maybe(add), maybe(finish_mean)

    def step(trainable, opt_state, batch, key, frozen=None):
        frozen = {} if frozen is None else frozen
        n = batch["tokens"].shape[0]
        if n % A:
            raise ValueError(f"step: batch size {n} is not divisible by accum_steps {A}")
        m = n // A
        keys = mx.random.split(key, A)
        acc = None
        for k in range(A):
            mb = {name: v[k * m:(k + 1) * m] for name, v in batch.items()}
            loss, aux, grads = micro_c(trainable, frozen, mb, keys[k])
            if acc is None:
                acc = (accumulate(None, grads), loss, aux)
            else:
                acc = add_c(acc, loss, aux, grads)
            mx.eval(acc)
        return finish_c(trainable, opt_state, *acc)

    return step


def init_opt_state(optimizer: Optimizer, params, trainable: Callable | None = None, *,
                   flat: bool = False, compute_dtype=None):
    """The optimizer state for ``make_train_step(..., trainable=trainable)``: over the trainable
    half of ``partition(trainable, params)`` (holes elsewhere), or over all of ``params``; with
    ``flat=True`` over the packed buffers of ``lm_flat_plan(params, optimizer, compute_dtype)``."""
    if flat:
        if trainable is not None:
            raise ValueError("init_opt_state: flat=True covers the whole tree (trainable must be None)")
        plan = lm_flat_plan(params, optimizer, compute_dtype)
        return optimizer.init(plan.layout.pack(plan.layout.split(params)[0]))
    if trainable is None:
        return optimizer.init(params)
    return optimizer.init(partition(trainable, params)[0])


def make_train_step(model, optimizer: Optimizer, schedule: Callable, *, compute_dtype=None,
                    remat: bool = False, trainable: Callable | None = None,
                    clip_norm: float | None = 1.0, accum_steps: int = 1,
                    grad_reduce: Callable | None = None, compile: bool = True,
                    flat: bool = False) -> Callable:
    """The language-model step ``step(params, opt_state, batch, key) -> (params, opt_state, metrics)``.

    ``params`` is the full tree (float32 master weights); with ``trainable`` only the matching
    leaves are updated (and ``opt_state`` must come from ``init_opt_state(optimizer, params,
    trainable)``), the rest pass through unchanged. ``flat=True`` (whole tree, accum_steps 1):
    the packed step of ``make_step(flat=lm_flat_plan(params, optimizer, compute_dtype))``, planned
    at the first call; ``opt_state`` from ``init_opt_state(optimizer, params, flat=True,
    compute_dtype=compute_dtype)``.
    """
    loss_fn = make_lm_loss(model, compute_dtype=compute_dtype, remat=remat)
    if flat:
        if trainable is not None:
            raise ValueError("make_train_step: flat=True trains the whole tree (trainable must be None)")
        built = {}

        def flat_step(params, opt_state, batch, key):
            if "step" not in built:
                built["step"] = make_step(loss_fn, optimizer, schedule, clip_norm=clip_norm, accum_steps=accum_steps,
                                          grad_reduce=grad_reduce, compile=compile,
                                          flat=lm_flat_plan(params, optimizer, compute_dtype))
            return built["step"](params, opt_state, batch, key)

        return flat_step
    # (not under a gradient all-reduce: its sums across ranks stay float32)
    at_compute = GRADS_IN_COMPUTE_DTYPE and compute_dtype is not None and accum_steps == 1 and grad_reduce is None
    inner = make_step(loss_fn, optimizer, schedule, clip_norm=clip_norm, accum_steps=accum_steps,
                      grad_reduce=grad_reduce, compile=compile,
                      grad_at=(lambda t: cast(t, compute_dtype)) if at_compute else None)
    if trainable is None:
        return lambda params, opt_state, batch, key: inner(params, opt_state, batch, key)

    def step(params, opt_state, batch, key):
        t, f = partition(trainable, params)
        t, opt_state, metrics = inner(t, opt_state, batch, key, f)
        return combine(t, f), opt_state, metrics

    return step


def make_eval_fn(model, *, compute_dtype=None, compile: bool = True) -> Callable:
    """``eval_fn(params, batch) -> (loss_sum, count, correct)`` (float32 scalars): summed token
    cross-entropy (nats), number of counted targets and argmax hits, for exact averaging over
    many batches (``loss_sum / count``)."""

    def f(params, batch):
        if compute_dtype is not None:
            params = cast(params, compute_dtype)
        inputs, targets, mask = _split_batch(batch)
        logits, _ = model.apply(params, inputs)
        m = mx.ones(targets.shape, dtype=mx.float32) if mask is None else mask.astype(mx.float32)
        loss_sum = cross_entropy(logits, targets, m, reduction="sum")
        hit = (mx.argmax(logits, axis=-1) == targets).astype(mx.float32)
        return loss_sum, m.sum(), (hit * m).sum()

    return mx.compile(f) if compile else f


def bits_per_token(loss_nats: float) -> float:
    """Cross-entropy in bits: ``loss / ln 2``. With the byte tokenizer one token is one byte, so
    this is bits per byte (the EOS separators count as bytes too)."""
    return loss_nats / math.log(2.0)

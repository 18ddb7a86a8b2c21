"""The serving engine: one worker thread owns the model; requests queue and are interleaved.

MLX is not thread-safe across streams, so exactly one thread (the worker) ever touches the model,
its params, the compiled functions and the ``PrefixCache``. Requests arrive as ``Job``s on a bounded
queue; the worker keeps up to ``max_active`` jobs *active*, each an ``alloy.generate`` generator over
its own batch-1 state, and advances them round-robin one token at a time:

    loop:
        admit queued jobs while len(active) < max_active
        for job in active:  event = next(job.gen)       # one token of this job
                            deliver(job, event)          # thread-safe hand-off to the HTTP side
                            drop job if finished, failed or cancelled

Every job has its own state tree, so outputs never mix and each equals the same request run alone.
Interleaving (rather than a FIFO) keeps short requests from waiting behind long ones. A cancelled
job (client gone, ``Job.cancel()``) is closed at its next turn, freeing its slot. Requests whose
prompts share a prefix reuse its prefilled state through the shared ``PrefixCache`` (every job uses
the same fixed state length ``max_len``, so all snapshots are compatible).

Delivery: the worker calls ``job.sink(kind, payload)`` with kind "event" (a ``GenerationEvent``),
"error" (an exception) or "done" (None, always last). The HTTP app's sinks forward these into an
``asyncio.Queue`` of the server's event loop (``loop.call_soon_threadsafe``); ``ListSink`` collects
them for blocking callers.
"""
from __future__ import annotations

import itertools
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

import mlx.core as mx

from alloy.inference.generate import forget_compiled, generate
from alloy.inference.prefix_cache import PrefixCache
from alloy.inference.sampling import SamplingParams


class QueueFull(Exception):
    """The engine's queue is at capacity."""


@dataclass
class Job:
    """One generation request (batch 1). ``sink(kind, payload)`` receives its events (see module
    docstring); it is called from the worker thread and must not block."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    sink: Callable
    stop_strings: tuple = ()
    seed: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: int = 0

    def cancel(self) -> None:
        self.cancelled.set()


class Engine:
    """Engine(model, params, tokenizer, max_len=2048, max_active=8, max_queue=256,
    prefix_cache=PrefixCache(...) | None, prefill_chunk=512).

    ``submit(job)`` enqueues (raises ``QueueFull``); ``start()`` / ``stop()`` run the worker.
    Counters: ``completed``, ``cancelled``, ``failed``; ``active`` and ``queued`` sizes.
    """

    def __init__(self, model, params, tokenizer, max_len: int = 2048, max_active: int = 8,
                 max_queue: int = 256, prefix_cache: PrefixCache | None = None, prefill_chunk: int = 512,
                 stop_tokens: Sequence[int] | None = None):
        for name, v, lo in (("max_len", max_len, 2), ("max_active", max_active, 1),
                            ("max_queue", max_queue, 1), ("prefill_chunk", prefill_chunk, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"Engine.{name} must be an int >= {lo}, got {v!r}")
        # Lazy arrays belong to the stream of the thread that built them and cannot be evaluated by
        # the worker thread: materialize the params here.
        mx.eval(params)
        self.model, self.params, self.tokenizer = _private_apply(model), params, tokenizer
        self.max_len, self.max_active, self.prefill_chunk = max_len, max_active, prefill_chunk
        self.prefix_cache = prefix_cache
        self.stop_tokens = tuple(tokenizer.eos_token_ids if stop_tokens is None else stop_tokens)
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._active: list = []  # [(job, generator)]
        self._ids = itertools.count(1)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.completed = self.cancelled = self.failed = 0

    # ---- client side (any thread)
    def submit(self, job: Job) -> Job:
        job.id = next(self._ids)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"the server queue is full ({self._queue.maxsize} requests)") from None
        return job

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    @property
    def active(self) -> int:
        return len(self._active)

    def start(self) -> "Engine":
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="alloy-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # ---- worker thread
    def _admit(self, job: Job) -> None:
        if job.cancelled.is_set():
            self.cancelled += 1
            job.sink("done", None)
            return
        gen = generate(self.model, self.params, job.prompt, max_tokens=job.max_tokens, sampling=job.sampling,
                       stop_tokens=self.stop_tokens, stop_strings=job.stop_strings, tokenizer=self.tokenizer,
                       seed=job.seed, prefill_chunk=self.prefill_chunk, max_len=self.max_len,
                       prefix_cache=self.prefix_cache)
        self._active.append((job, gen))

    def _run(self) -> None:
        try:
            self._serve()
        finally:  # this thread's compiled traces go while the interpreter is alive (see forget_compiled)
            forget_compiled(self.model.apply)

    def _serve(self) -> None:
        while not self._stop.is_set():
            while len(self._active) < self.max_active:
                try:
                    job = self._queue.get(timeout=0.05) if not self._active else self._queue.get_nowait()
                except queue.Empty:
                    break
                self._admit(job)
            if not self._active:
                continue
            keep = []
            for job, gen in self._active:
                if self._finish_if_cancelled(job, gen):
                    continue
                try:
                    ev = next(gen)
                except StopIteration:
                    self.completed += 1
                    job.sink("done", None)
                    continue
                except Exception as e:  # a failing request must not take the worker down
                    self.failed += 1
                    job.sink("error", e)
                    job.sink("done", None)
                    continue
                job.sink("event", ev)
                if ev.finish_reason is not None:
                    gen.close()
                    self.completed += 1
                    job.sink("done", None)
                else:
                    keep.append((job, gen))
            self._active = keep
        for job, gen in self._active:  # shutting down: end every stream
            gen.close()
            job.sink("error", RuntimeError("the server is shutting down"))
            job.sink("done", None)
        self._active = []
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            job.sink("error", RuntimeError("the server is shutting down"))
            job.sink("done", None)

    def _finish_if_cancelled(self, job, gen) -> bool:
        if not job.cancelled.is_set():
            return False
        gen.close()
        self.cancelled += 1
        job.sink("done", None)
        return True


def _private_apply(model):
    """``model`` with its own ``apply`` function object.

    ``generate`` caches its compiled functions per ``model.apply``. A compiled function captures any
    array it closes over (e.g. a logit-bias vector) unevaluated, and MLX binds an unevaluated array
    to the stream of the thread that created it, so a cached function built on one thread fails on
    another ("There is no Stream(cpu, N) in current thread"). A private ``apply`` gives every engine
    its own cache entries, built and used only by its worker thread."""
    base = model.apply

    def apply(params, tokens, state=None):
        return base(params, tokens, state)

    return model._replace(apply=apply)


class ListSink:
    """A job sink that appends events to a list and sets ``done`` at the end (for tests / batch)."""

    def __init__(self):
        self.events: list = []
        self.errors: list = []
        self.done = threading.Event()

    def __call__(self, kind, payload):
        if kind == "event":
            self.events.append(payload)
        elif kind == "error":
            self.errors.append(payload)
        else:
            self.done.set()


__all__ = ["Engine", "Job", "ListSink", "QueueFull"]

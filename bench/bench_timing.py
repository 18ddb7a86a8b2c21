"""Timing helpers shared by the scripts in bench/ (each runs as `python bench/<script>.py`, so this
folder is on sys.path and `from bench_timing import timeit` finds this file)."""
from __future__ import annotations

import statistics
import time

import mlx.core as mx


def timeit(fn, reps=20, warm=3, batch=1):
    """Median seconds per call. batch > 1 evaluates `batch` independent calls together and
    divides, amortizing the per-evaluation host/sync cost (~0.1 ms on MLX-CUDA) the way a
    CUDA-event timer of the kernels alone would."""
    run = fn if batch == 1 else (lambda: [fn() for _ in range(batch)])
    for _ in range(warm):
        mx.eval(run())
    mx.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval(run())
        mx.synchronize()
        ts.append((time.perf_counter() - t) / batch)
    return statistics.median(ts)


def timeit_ms(fn, reps=20, warm=3):
    """`timeit` in milliseconds."""
    return timeit(fn, reps, warm) * 1e3


def compiled_grad(f, *args, seed=9):
    """The compiled gradient of sum(f(*args) * ct) (in float32, ct random of f's output shape and
    dtype) w.r.t. every argument: call it with `args` to time a forward + backward."""
    out = f(*args)
    ct = mx.random.normal(out.shape, key=mx.random.key(seed)).astype(out.dtype)
    return mx.compile(mx.grad(lambda *a: (f(*a) * ct).astype(mx.float32).sum(), argnums=tuple(range(len(args)))))

"""Checks shared by the kernel tests (`tests/metal`: GPU property tests, CPU-emulator tests).

    rel_err(a, b)       max |a - b| / max(|b|, 1), after checking shapes match and a is finite
    Counted(kernel)     a kernel whose launches are counted (`.calls`), to check which kernel a
                        dispatch took on a GPU (the emulator's stand-ins count their own)
    arr(rng, shape)     standard-normal values (times scale) in a dtype
    pos(rng, shape, lo, hi)   uniform positive float32 values (decays, dt, beta)
    f64(v)              an mx.array as float64 numpy
    chunk_time(v, K)    (b, l, ...) -> float32 (b, c, K, ...), zero-padded to whole chunks
    ssd_inputs(rng, dtype, b, l, h, g, p, n), ssd_chunked_autodiff(prim, K)
                        the SSD's arguments and cotangents, and float32 autodiff gradients at them
    ssd_diag_case(rng, dt, b, l, h, g, p, K)   inputs of the SSD diagonal-block kernels and float64
                        references of their y and dX
    assert_grads_match(op, args, cts, impl, ref_impl, tol)
                        the gradients of sum_i <op(*args)[i], cts[i]> w.r.t. every argument agree
                        between op(..., impl=impl) and op(..., impl=ref_impl)
    assert_decode_matches(step, fast, ref, tok, state, steps, tol)
                        decoding with params `fast` (e.g. `prepare_decode`'s) and `ref` side by side
                        gives the same logits and every layer's mixer states
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np

DTYPES = {"f32": mx.float32, "bf16": mx.bfloat16}


def rel_err(a, b) -> float:
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.isfinite(a).all()
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1.0)) if a.size else 0.0


class Counted:
    """``kernel`` with its launches counted in ``calls`` (same call signature)."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.kernel(*args, **kwargs)


def arr(rng, shape, dtype=mx.float32, scale=1.0) -> mx.array:
    return mx.array((scale * rng.standard_normal(shape)).astype(np.float32)).astype(dtype)


def pos(rng, shape, lo, hi) -> mx.array:
    return mx.array(rng.uniform(lo, hi, shape).astype(np.float32))


F16 = {"bf16": mx.bfloat16, "fp16": mx.float16}


def f64(v) -> np.ndarray:
    """An mx.array as a float64 numpy array (through float32)."""
    return np.array(v.astype(mx.float32)).astype(np.float64)


def chunk_time(v, K):
    """(b, l, ...) -> float32 (b, c, K, ...): the time axis zero-padded to whole chunks of K and split."""
    b, l = v.shape[:2]
    pad = -l % K
    v = mx.pad(v.astype(mx.float32), [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))
    return v.reshape(b, (l + pad) // K, K, *v.shape[2:])


def ssd_diag_case(rng, dt, b, l, h, g, p, K):
    """The inputs of the SSD diagonal-block kernels OUT / BWD_DX and their tensor-core forms (CB (b, c,
    g, K, K) and acs (b, c, h, K) float32, x / dy (b, l, h, p) and Yo (b, c, g, K, r p) in F16[dt], dt
    (b, l, h), D (h,)) and float64 numpy references of y and dX."""
    dtype = F16[dt]
    nc, r = -(-l // K), h // g
    x, dy = arr(rng, (b, l, h, p), dtype), arr(rng, (b, l, h, p), dtype)
    dtv = pos(rng, (b, l, h), 0.01, 0.3)
    A = -pos(rng, (h,), 0.5, 4.0)
    CB = arr(rng, (b, nc, g, K, K), scale=0.5)
    Yo = arr(rng, (b, nc, g, K, r * p), dtype)
    D = arr(rng, (h,))
    acs = mx.cumsum(chunk_time(dtv, K) * A, axis=2).transpose(0, 1, 3, 2)  # (b, c, h, K)
    ac = f64(acs)
    E = np.exp(ac[..., :, None] - ac[..., None, :]) * np.tril(np.ones((K, K)))  # (b, c, h, l, s)
    M = np.repeat(f64(CB), r, axis=2) * E
    X = f64(chunk_time(x, K)) * f64(chunk_time(dtv, K))[..., None]  # (b, c, K, h, p)
    Yh = f64(Yo).reshape(b, nc, g, K, r, p).transpose(0, 1, 3, 2, 4, 5).reshape(b, nc, K, h, p)
    y = (np.einsum("bchls,bcshp->bclhp", M, X) + np.exp(ac).transpose(0, 1, 3, 2)[..., None] * Yh
         + f64(D)[:, None] * f64(chunk_time(x, K)))
    dX = np.einsum("bchls,bclhp->bcshp", M, f64(chunk_time(dy, K)))
    return (CB, acs, x, dtv, Yo, D, dy), y.reshape(b, nc * K, h, p)[:, :l], dX


# (dtype, b, l, h, g, p, K) cases for `ssd_diag_case` and the chunk-product kernels on the emulator
SSD_DIAG_CASES = [("bf16", 1, 40, 2, 1, 16, 32),     # chunk below the 64-row block, L not whole chunks
                  ("fp16", 2, 150, 4, 2, 64, 64),    # two heads per group, two sequences
                  ("bf16", 1, 300, 3, 1, 64, 256),   # four row blocks per chunk, three heads per group
                  ("bf16", 1, 100, 2, 2, 128, 80),   # a partial second row block, head dim 128
                  ("fp16", 1, 96, 6, 2, 32, 48)]


def ssd_inputs(rng, dtype, b, l, h, g, p, n):
    """The SSD's arguments and cotangents: x (b, l, h, p), dt (b, l, h), A (h,) < 0, B / C (b, l, g, n),
    D (h,), the initial state (b, h, p, n), dy (x's shape) and the final state's cotangent; x, B, C, dy
    in dtype, the rest float32."""
    x = arr(rng, (b, l, h, p), dtype)
    dtv = pos(rng, (b, l, h), 0.01, 0.3)
    A = -pos(rng, (h,), 0.5, 4.0)
    B, C = arr(rng, (b, l, g, n), dtype), arr(rng, (b, l, g, n), dtype)
    D = arr(rng, (h,))
    s0 = arr(rng, (b, h, p, n))
    dy = arr(rng, (b, l, h, p), dtype)
    ds = arr(rng, (b, h, p, n))
    return x, dtv, A, B, C, D, s0, dy, ds


def ssd_chunked_autodiff(prim, K):
    """MLX autodiff of `alloy.ops.ssd.ssd_chunked` in float32 at `ssd_inputs`' values: the gradients
    with respect to (x, dt, A, B, C, D, initial state)."""
    from alloy.ops.ssd import ssd_chunked

    up = [v.astype(mx.float32) for v in prim]
    return mx.vjp(lambda *a: list(ssd_chunked(*a, K)), up[:7], up[7:])[1]


def assert_grads_match(op, args, cts, impl: str, ref_impl: str, tol: float) -> None:
    """op(*args, impl=...) returns a tuple of outputs; cts: cotangents for its first len(cts)."""
    def loss(i):
        return lambda *a: sum((o * c).sum() for o, c in zip(op(*a, impl=i), cts))
    n = tuple(range(len(args)))
    got, want = mx.grad(loss(impl), argnums=n)(*args), mx.grad(loss(ref_impl), argnums=n)(*args)
    for i, (a, b) in enumerate(zip(got, want)):
        assert rel_err(a, b) <= tol, f"gradient of argument {i}: relative error {rel_err(a, b):.3g} > {tol:g}"


def assert_decode_matches(step, fast, ref, tok, state, *, steps: int, tol: float) -> None:
    """``steps`` decode tokens through ``step(params, tok, state)`` (a model's apply, compiled or not)
    with ``fast`` and with ``ref`` params, each from its own states (both start at ``state``; the
    next token comes from ref's logits): logits and every mixer state of every layer within tol."""
    s_f, s_r = state, state
    for _ in range(steps):
        l_f, s_f = step(fast, tok, s_f)
        l_r, s_r = step(ref, tok, s_r)
        assert rel_err(l_f, l_r) <= tol
        for a, b in zip(s_f["layers"], s_r["layers"]):
            for key in b["mixer"]:
                assert rel_err(a["mixer"][key], b["mixer"][key]) <= tol, key
        tok = mx.argmax(l_r[:, -1], -1)[:, None]


def ssd_out_yo_case(rng, dtype, b, l, h, g, p, n, K, x_scale=1.0):
    """Inputs of the chunk-output kernels with Yo inside (CHUNK_OUT_YO_TC / CHUNK_OUT_YO_FX: CB (b, c, g,
    K, K), acs (b, c, h, K) float32; x (b, l, h, p), C (b, l, g, n), starts (b, c, g, n, r p) in dtype;
    dt (b, l, h), D (h,)), the explicit Yo of the
    unfused path (C H as `ssd_chunked` computes it: operands in dtype, rounded to dtype) and the
    float64 reference of y."""
    nc, r = -(-l // K), h // g
    x = arr(rng, (b, l, h, p), dtype, x_scale)
    dtv = pos(rng, (b, l, h), 0.01, 0.3)
    A = -pos(rng, (h,), 0.5, 4.0)
    C = arr(rng, (b, l, g, n), dtype)
    starts = arr(rng, (b, nc, g, n, r * p), dtype, 0.5)
    CB = arr(rng, (b, nc, g, K, K), scale=0.5)
    D = arr(rng, (h,))
    acs = mx.cumsum(chunk_time(dtv, K) * A, axis=2).transpose(0, 1, 3, 2)  # (b, c, h, K)
    Cc = chunk_time(C, K).astype(dtype).transpose(0, 1, 3, 2, 4)  # (b, c, g, K, n)
    Yo = Cc @ starts  # (b, c, g, K, r p) in dtype
    ac = f64(acs)
    E = np.exp(ac[..., :, None] - ac[..., None, :]) * np.tril(np.ones((K, K)))  # (b, c, h, l, s)
    M = np.repeat(f64(CB), r, axis=2) * E
    X = f64(chunk_time(x, K)) * f64(chunk_time(dtv, K))[..., None]  # (b, c, K, h, p)
    Y64 = np.einsum("bckgn,bcgnq->bckgq", f64(chunk_time(C, K)), f64(starts))  # C H in float64
    Yh = Y64.reshape(b, nc, K, g, r, p).reshape(b, nc, K, h, p)
    y = (np.einsum("bchls,bcshp->bclhp", M, X) + np.exp(ac).transpose(0, 1, 3, 2)[..., None] * Yh
         + f64(D)[:, None] * f64(chunk_time(x, K)))
    return (CB, acs, x, dtv, C, starts, D), Yo, y.reshape(b, nc * K, h, p)[:, :l]

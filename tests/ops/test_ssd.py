"""Mamba-2 SSD: the chunked form and the decode step against the sequential reference."""
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from alloy.ops.ssd import ssd, ssd_chunked, ssd_ref, ssd_step

# fp32: chunked and sequential sum the same terms in a different order over <= ~70 steps;
# observed differences are ~1e-7 relative, so 1e-4 relative to the largest value is loose
# enough for any platform and tight enough to catch a wrong decay.
TOL32 = 1e-4
# bf16 inputs: internal math is fp32 either way, only the bf16 rounding of y differs
# (8 bits of mantissa: relative error <= 2**-8).
TOL_BF16 = 1e-2

SEQ = ("x", "dt", "B", "C")  # the arguments with a time axis


def make(seed, b, l, h, p, g, n, D=True, state=True, dtype=mx.float32):
    """Random SSD inputs with realistic magnitudes (dt like softplus outputs, A like -exp(A_log))."""
    rng = np.random.default_rng(seed)
    arr = lambda v: mx.array(v.astype(np.float32))  # noqa: E731
    return dict(
        x=arr(rng.standard_normal((b, l, h, p))).astype(dtype),
        dt=arr(rng.uniform(0.001, 0.5, (b, l, h))).astype(dtype),
        A=arr(rng.uniform(-8.0, -0.5, (h,))),
        B=arr(rng.standard_normal((b, l, g, n))).astype(dtype),
        C=arr(rng.standard_normal((b, l, g, n))).astype(dtype),
        D=arr(rng.standard_normal((h,))) if D else None,
        initial_state=arr(rng.standard_normal((b, h, p, n))) if state else None,
    )


def close(actual, expected, tol):
    """|actual - expected| <= tol * max(1, max|expected|), elementwise."""
    e = np.array(expected.astype(mx.float32))
    a = np.array(actual.astype(mx.float32))
    assert a.shape == e.shape
    np.testing.assert_allclose(a, e, rtol=tol, atol=tol * max(1.0, float(np.abs(e).max(initial=0))))


@st.composite
def cases(draw, max_len=70):
    g = draw(st.integers(1, 3))
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)),
        b=draw(st.integers(1, 3)),
        l=draw(st.integers(1, max_len)),
        h=g * draw(st.integers(1, 3)),
        p=draw(st.integers(1, 8)),
        g=g,
        n=draw(st.integers(1, 16)),
        D=draw(st.booleans()),
        state=draw(st.booleans()),
    )


@given(case=cases(), chunk=st.integers(1, 32))
@example(case=dict(seed=0, b=1, l=1, h=2, p=3, g=1, n=4, D=True, state=True), chunk=8)  # T=1
@example(case=dict(seed=1, b=2, l=70, h=4, p=4, g=2, n=8, D=False, state=False), chunk=32)  # ragged
@example(case=dict(seed=2, b=3, l=33, h=6, p=2, g=3, n=5, D=True, state=True), chunk=1)
def test_chunked_matches_sequential(case, chunk):
    inputs = make(**case)
    y_ref, s_ref = ssd_ref(**inputs)
    y, s = ssd_chunked(**inputs, chunk_size=chunk)
    assert y.dtype == mx.float32 and s.dtype == mx.float32
    close(y, y_ref, TOL32)
    close(s, s_ref, TOL32)


ARGS = ("x", "dt", "A", "B", "C", "D", "initial_state")


def grads(fn, inputs, seed):
    """Gradients of sum(y * w) + sum(state * w2) w.r.t. every input."""
    rng = np.random.default_rng(seed)
    b, l, h, p = inputs["x"].shape
    w = mx.array(rng.standard_normal((b, l, h, p)).astype(np.float32))
    w2 = mx.array(rng.standard_normal(inputs["initial_state"].shape).astype(np.float32))

    def loss(*args):
        y, s = fn(**dict(zip(ARGS, args)))
        return (y * w).sum() + (s * w2).sum()

    return mx.grad(loss, argnums=tuple(range(len(ARGS))))(*(inputs[k] for k in ARGS))


@given(case=cases(max_len=40), chunk=st.integers(1, 16))
@example(case=dict(seed=3, b=2, l=21, h=4, p=3, g=2, n=5, D=True, state=True), chunk=8)
def test_chunked_gradients_match_sequential(case, chunk):
    inputs = make(**{**case, "D": True, "state": True})
    g_ref = grads(ssd_ref, inputs, case["seed"])
    g = grads(lambda **kw: ssd_chunked(**kw, chunk_size=chunk), inputs, case["seed"])
    for name, a, e in zip(ARGS, g, g_ref):
        assert not mx.isnan(a).any(), name
        close(a, e, TOL32)


@given(case=cases(max_len=40), chunk=st.integers(1, 16))
@example(case=dict(seed=4, b=2, l=21, h=4, p=3, g=2, n=5, D=True, state=True), chunk=8)
@example(case=dict(seed=5, b=1, l=16, h=2, p=2, g=1, n=3, D=False, state=False), chunk=16)
def test_written_out_gradient_matches_autodiff(case, chunk):
    """`ssd_chunked_vjp` (the gradient written out) == MLX autodiff of `ssd_chunked`, for every input,
    with and without D / an initial state, ragged lengths and several groups."""
    from alloy.ops.ssd import ssd_chunked_vjp
    inputs = make(**case)
    rng = np.random.default_rng(case["seed"] + 1)
    b, l, h, p = inputs["x"].shape
    dy = mx.array(rng.standard_normal((b, l, h, p)).astype(np.float32))
    ds = mx.array(rng.standard_normal((b, h, p, inputs["B"].shape[-1])).astype(np.float32))
    prim = [inputs[k] for k in ARGS]
    live = [i for i, v in enumerate(prim) if v is not None]

    def f(*args):
        full = list(prim)
        for i, v in zip(live, args):
            full[i] = v
        return list(ssd_chunked(*full, chunk))
    _, want = mx.vjp(f, [prim[i] for i in live], [dy, ds])
    got = ssd_chunked_vjp(*prim, dy, ds, chunk)
    for i, w in zip(live, want):
        assert got[i].shape == w.shape and got[i].dtype == w.dtype, ARGS[i]
        close(got[i], w, TOL32)
    assert all(got[i] is None for i in range(len(ARGS)) if i not in live)


def test_cpu_dispatch_uses_the_written_out_gradient(monkeypatch):
    """ssd(impl="auto") on the CPU: same values and gradients whichever gradient it is set to."""
    import importlib
    ssd_mod = importlib.import_module("alloy.ops.ssd")  # the package re-exports a function named ssd
    inputs = make(6, 2, 30, 4, 3, 2, 5)
    out, calls = {}, []
    real = ssd_mod.ssd_chunked_vjp
    monkeypatch.setattr(ssd_mod, "ssd_chunked_vjp", lambda *a: calls.append(1) or real(*a))
    for mode in ("explicit", "autodiff"):
        monkeypatch.setattr(ssd_mod, "CPU_GRADIENT", mode)
        out[mode] = (ssd(**inputs, chunk_size=8), grads(lambda **kw: ssd(**kw, chunk_size=8), inputs, 6))
        assert bool(calls) == (mode == "explicit")
        calls.clear()
    for a, e in zip(out["explicit"][0] + out["explicit"][1], out["autodiff"][0] + out["autodiff"][1]):
        close(a, e, TOL32)


@given(case=cases(max_len=1))
def test_step_matches_sequential_for_one_token(case):
    inputs = make(**case)
    y_ref, s_ref = ssd_ref(**inputs)
    i = inputs
    y, s = ssd_step(i["x"][:, 0], i["dt"][:, 0], i["A"], i["B"][:, 0], i["C"][:, 0], i["D"], i["initial_state"])
    close(y, y_ref[:, 0], TOL32)
    close(s, s_ref, TOL32)


def test_decode_loop_matches_prefill():
    inputs = make(seed=4, b=2, l=12, h=4, p=3, g=2, n=6)
    y_ref, s_ref = ssd_ref(**inputs)
    state, ys = inputs["initial_state"], []
    for t in range(12):
        step = {k: (v[:, t : t + 1] if k in SEQ else v) for k, v in inputs.items()}
        y, state = ssd(**{**step, "initial_state": state})  # T == 1: the decode-step path
        ys.append(y)
    close(mx.concatenate(ys, axis=1), y_ref, TOL32)
    close(state, s_ref, TOL32)


@given(case=cases(), split=st.floats(0.0, 1.0), chunk=st.integers(1, 32))
def test_split_sequence_equals_whole(case, split, chunk):
    inputs = make(**case)
    l = case["l"]
    if l < 2:
        return
    k = min(l - 1, max(1, int(split * l)))
    head = {n: (v[:, :k] if n in SEQ else v) for n, v in inputs.items()}
    tail = {n: (v[:, k:] if n in SEQ else v) for n, v in inputs.items()}
    y1, s1 = ssd_chunked(**head, chunk_size=chunk)
    y2, s2 = ssd_chunked(**{**tail, "initial_state": s1}, chunk_size=chunk)
    y, s = ssd_chunked(**inputs, chunk_size=chunk)
    close(mx.concatenate([y1, y2], axis=1), y, TOL32)
    close(s2, s, TOL32)


@pytest.mark.parametrize("l", [1, 2, 9, 37, 130])
@pytest.mark.parametrize("chunk_size", [8, 64])
def test_dispatcher_impls_agree(l, chunk_size):
    inputs = make(seed=l, b=2, l=l, h=4, p=3, g=2, n=5)
    y_ref, s_ref = ssd(**inputs, impl="ref")
    for impl in ("chunked", "auto"):
        y, s = ssd(**inputs, chunk_size=chunk_size, impl=impl)
        assert y.shape == y_ref.shape == (2, l, 4, 3)
        close(y, y_ref, TOL32)
        close(s, s_ref, TOL32)


def test_dispatcher_rejects_unknown_impl():
    inputs = make(seed=0, b=1, l=3, h=2, p=2, g=1, n=2)
    with pytest.raises(ValueError, match="'metal'"):
        ssd(**inputs, impl="metal")
    with pytest.raises(ValueError, match="chunk_size"):
        ssd(**inputs, chunk_size=0)


def test_bad_shapes_are_named():
    inputs = make(seed=0, b=1, l=3, h=3, p=2, g=1, n=2)
    with pytest.raises(ValueError, match="groups"):
        ssd_chunked(**{**inputs, "B": mx.zeros((1, 3, 2, 2)), "C": mx.zeros((1, 3, 2, 2))})
    with pytest.raises(ValueError, match="dt"):
        ssd_ref(**{**inputs, "dt": mx.zeros((1, 3))})


@given(case=cases(max_len=40), chunk=st.integers(1, 32))
def test_bf16_inputs_match_fp32_reference(case, chunk):
    inputs = make(**case, dtype=mx.bfloat16)
    up = {k: (None if v is None else v.astype(mx.float32)) for k, v in inputs.items()}
    y_ref, s_ref = ssd_ref(**up)
    y, s = ssd_chunked(**inputs, chunk_size=chunk)
    assert y.dtype == mx.bfloat16 and s.dtype == mx.float32
    close(y, y_ref, TOL_BF16)
    close(s, s_ref, TOL32)  # the state never leaves fp32
    y, s = ssd(**inputs)
    assert y.dtype == mx.bfloat16 and s.dtype == mx.float32
    close(y, y_ref, TOL_BF16)


def test_strong_decay_long_sequence_is_finite_and_exact():
    """dt * A down to -40 per step: cumulative log decays reach ~-1e4 inside one chunk."""
    inputs = make(seed=5, b=1, l=200, h=2, p=2, g=1, n=4)
    inputs["dt"] = inputs["dt"] * 10.0
    y_ref, s_ref = ssd_ref(**inputs)
    y, s = ssd_chunked(**inputs, chunk_size=128)
    close(y, y_ref, TOL32)
    close(s, s_ref, TOL32)
    g = grads(lambda **kw: ssd_chunked(**kw, chunk_size=128), inputs, 5)
    assert all(not mx.isnan(a).any() and mx.isfinite(a).all() for a in g)

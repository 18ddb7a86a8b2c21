"""`alloy.layers.common.matmul_t` (x @ W.T with a written-out gradient whose dW comes out of its GEMM in
W's own layout, switch `LINEAR_VJP`) against MLX autodiff of x @ W.T, through `dense` and the MLP's
stacked gate / up product, in float32 and bf16, with the float32 master cast the train step applies;
and the row threshold that keeps small (decode) calls on the plain product."""
import mlx.core as mx
import numpy as np
import pytest

from alloy.layers import common, mlp
from alloy.layers.common import dense, matmul_t


def _rel(a, b):
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))


def _grads(monkeypatch, on, f, *args):
    monkeypatch.setattr(common, "LINEAR_VJP", on)
    monkeypatch.setattr(common, "LINEAR_VJP_MIN_ROWS", 8)
    return mx.grad(f, argnums=tuple(range(len(args))))(*args)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_matmul_t_gradients_match_autodiff(monkeypatch, dtype):
    k = mx.random.split(mx.random.key(1), 3)
    x = mx.random.normal((3, 7, 24), key=k[0])
    w = mx.random.normal((40, 24), key=k[1]) * 0.2    # float32 masters, cast inside as the train step does
    ct = mx.random.normal((3, 7, 40), key=k[2])

    def f(x, w):
        return (matmul_t(x.astype(dtype), w.astype(dtype)).astype(mx.float32) * ct).sum()
    got, want = _grads(monkeypatch, True, f, x, w), _grads(monkeypatch, False, f, x, w)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert _rel(a, b) <= (1e-6 if dtype == mx.float32 else 1e-2), _rel(a, b)


def test_dense_and_packed_mlp_take_the_custom_gradient(monkeypatch):
    """dense (and the MLP's [W_gate; W_up] product) go through the custom VJP at >= LINEAR_VJP_MIN_ROWS
    rows (counted), the plain product below it; the MLP's weight gradients equal autodiff's."""
    calls = []
    inner = common._matmul_t_vjp
    monkeypatch.setattr(common, "_matmul_t_vjp", lambda x, w: calls.append(x.shape) or inner(x, w))
    k = mx.random.split(mx.random.key(2), 5)
    D, F = 16, 24
    params = {"gate_proj": {"weight": mx.random.normal((F, D), key=k[0]) * 0.2},
              "up_proj": {"weight": mx.random.normal((F, D), key=k[1]) * 0.2},
              "down_proj": {"weight": mx.random.normal((D, F), key=k[2]) * 0.2}}
    x = mx.random.normal((2, 6, D), key=k[3])
    ct = mx.random.normal((2, 6, D), key=k[4])

    def loss(p, x):
        gu = mlp._gate_up_packed(p, x)
        return (dense(p["down_proj"], gu[..., :F] * gu[..., F:]) * ct).sum()
    got = _grads(monkeypatch, True, loss, params, x)
    assert len(calls) >= 2, calls
    calls.clear()
    want = _grads(monkeypatch, False, loss, params, x)
    assert not calls
    for name in params:
        assert _rel(got[0][name]["weight"], want[0][name]["weight"]) <= 1e-6, name
    assert _rel(got[1], want[1]) <= 1e-6
    monkeypatch.setattr(common, "LINEAR_VJP", True)
    monkeypatch.setattr(common, "LINEAR_VJP_MIN_ROWS", 1024)
    dense(params["down_proj"], mx.ones((1, 5, F)))   # a decode-sized call: the plain product
    assert not calls

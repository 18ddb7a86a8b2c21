"""`alloy.layers.common.dense_split` (a linear's output as separately computed contiguous pieces, with
an accumulating written-out gradient) against `dense` + `mx.split` and its autodiff, and Mamba-2's
in_proj through it (`alloy.layers.mamba2.SPLIT_IN_PROJ`) against the sliced single product."""
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from alloy.layers import mamba2
from alloy.layers.common import dense, dense_split


def _rel(a, b):
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_dense_split_matches_dense_then_split(bias, dtype):
    k = mx.random.split(mx.random.key(0), 4)
    widths = (12, 20, 3)
    p = {"weight": (mx.random.normal((35, 16), key=k[0]) * 0.2).astype(dtype)}
    if bias:
        p["bias"] = mx.random.normal((35,), key=k[1]).astype(dtype)
    x = mx.random.normal((2, 9, 16), key=k[2]).astype(dtype)
    cts = [mx.random.normal((2, 9, n), key=mx.random.key(10 + i)).astype(dtype) for i, n in enumerate(widths)]

    def loss(split):
        def f(p, x):
            ys = dense_split(p, x, widths) if split else mx.split(dense(p, x), [12, 32], axis=-1)
            return sum((y * c).astype(mx.float32).sum() for y, c in zip(ys, cts))
        return f
    tol = 1e-5 if dtype == mx.float32 else 2e-2
    for got, want in zip(dense_split(p, x, widths), mx.split(dense(p, x), [12, 32], axis=-1)):
        assert got.shape == want.shape and got.dtype == want.dtype and _rel(got, want) <= tol
    (gp, gx), (wp, wx) = (mx.grad(loss(s), argnums=(0, 1))(p, x) for s in (True, False))
    assert _rel(gx, wx) <= tol
    for name in p:
        assert gp[name].dtype == dtype and _rel(gp[name], wp[name]) <= tol, name


def test_dense_split_refuses_bad_widths_and_falls_back_for_quantized():
    p = {"weight": mx.ones((8, 4))}
    with pytest.raises(ValueError, match="sum to the output width 8"):
        dense_split(p, mx.ones((2, 4)), (3, 4))
    w = mx.random.normal((64, 64), key=mx.random.key(1))
    q, s, b = mx.quantize(w, group_size=32, bits=4)
    pq = {"weight": q, "scales": s, "biases": b}
    x = mx.random.normal((3, 64), key=mx.random.key(2))
    for got, want in zip(dense_split(pq, x, (40, 24)), mx.split(dense(pq, x), [40], axis=-1)):
        assert mx.array_equal(got, want)


def test_mamba2_in_proj_split_matches_sliced_product(monkeypatch):
    cfg = mamba2.Mamba2Settings(d_model=32, d_state=16, head_dim=8, n_groups=2)
    params = mamba2.init(mx.random.key(3), cfg)
    x = mx.random.normal((2, 24, 32), key=mx.random.key(4))
    ct = mx.random.normal((2, 24, 32), key=mx.random.key(5))

    def run(split):
        monkeypatch.setattr(mamba2, "SPLIT_IN_PROJ", split)
        monkeypatch.setattr(mamba2, "SPLIT_IN_PROJ_MIN_ROWS", 1)
        loss = lambda p, x: (mamba2.apply(p, x, None, cfg)[0] * ct).sum()  # noqa: E731
        return mamba2.apply(params, x, None, cfg)[0], mx.grad(loss, argnums=(0, 1))(params, x)
    (y1, (g1, dx1)), (y0, (g0, dx0)) = run(True), run(False)
    assert _rel(y1, y0) <= 1e-5 and _rel(dx1, dx0) <= 1e-4
    for (name, a), (_, b) in zip(tree_flatten(g1), tree_flatten(g0)):
        assert _rel(a, b) <= 1e-4, name

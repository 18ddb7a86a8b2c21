"""`alloy.layers.common.embed`: small tables take their lookup gradient as one GEMM against a one-hot
of the tokens (`ONEHOT_GRAD_MAX_ROWS`), and on a GPU backend also the lookup itself
(`ONEHOT_LOOKUP_MAX_ROWS`, forced here by reporting a backend); values and gradients against autodiff of
the plain gather (a scatter-add), repeated tokens included, eager and compiled, fp32 and bf16."""
import mlx.core as mx
import numpy as np
import pytest

from alloy import metal
from alloy.layers import common


@pytest.mark.parametrize("dtype,tol", [(mx.float32, 1e-5), (mx.bfloat16, 2e-2)])
@pytest.mark.parametrize("max_rows", [4096, 0])  # 0: the gather's own gradient
@pytest.mark.parametrize("onehot_lookup", [False, True])
def test_embed_gradient_matches_the_gather(monkeypatch, dtype, tol, max_rows, onehot_lookup):
    monkeypatch.setattr(common, "ONEHOT_GRAD_MAX_ROWS", max_rows)
    if onehot_lookup:  # the GPU path's one-hot product, run by MLX on this device
        monkeypatch.setattr(metal, "backend", lambda: "cuda")
    rng = np.random.default_rng(0)
    w = mx.array(rng.standard_normal((61, 16)).astype(np.float32)).astype(dtype)
    tok = mx.array(rng.integers(0, 61, (3, 40)).astype(np.int32))  # 120 lookups of 61 rows: repeats
    ct = mx.array(rng.standard_normal((3, 40, 16)).astype(np.float32)).astype(dtype)
    got_y = common.embed({"weight": w}, tok, 16)
    assert mx.array_equal(got_y, w[tok])

    def grad(f):
        return mx.grad(lambda w: (f(w) * ct).astype(mx.float32).sum())(w)
    want = np.array(grad(lambda w: w[tok]).astype(mx.float32))
    for got in (grad(lambda w: common.embed({"weight": w}, tok, 16)),
                mx.compile(lambda w: grad(lambda w: common.embed({"weight": w}, tok, 16)))(w)):
        assert got.dtype == dtype
        np.testing.assert_allclose(np.array(got.astype(mx.float32)), want, rtol=tol, atol=tol * 10)

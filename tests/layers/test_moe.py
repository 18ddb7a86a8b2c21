"""MoE FFN: the gathered top-k path equals the dense every-expert specification."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import alloy  # noqa: F401
import mlx.core as mx

from alloy.layers import moe


@settings(max_examples=15)
@given(E=st.integers(1, 6), k=st.integers(1, 3), gated=st.booleans(), scoring=st.sampled_from(["softmax", "sigmoid"]),
       norm=st.booleans(), shared=st.sampled_from([0, 12]), bias=st.booleans(), latent=st.sampled_from([0, 6]),
       seed=st.integers(0, 50))
def test_gathered_experts_equal_dense_reference(E, k, gated, scoring, norm, shared, bias, latent, seed):
    k = min(k, E)
    cfg = moe.MoESettings(d_model=16, n_experts=E, top_k=k, d_ff=8, gated=gated, scoring=scoring,
                          activation="silu" if gated else "relu2", norm_topk_prob=norm, shared_d_ff=shared,
                          shared_gate=bool(shared), router_bias=bias, routed_scaling_factor=1.5, latent_dim=latent)
    params = moe.init(mx.random.key(seed), cfg)
    if bias:
        params["router"]["bias"] = mx.random.normal((E,), key=mx.random.key(seed + 1))
    x = mx.random.normal((2, 5, 16), key=mx.random.key(seed + 2))
    y, _ = moe.apply(params, x, None, cfg)
    want = moe.moe_ref(params, x.reshape(-1, 16), cfg).reshape(2, 5, 16)
    np.testing.assert_allclose(np.array(y), np.array(want), rtol=1e-4, atol=1e-5)


def test_routing_picks_the_highest_scores_and_renormalises():
    cfg = moe.MoESettings(d_model=4, n_experts=4, top_k=2, d_ff=4)
    params = moe.init(mx.random.key(0), cfg)
    x = mx.random.normal((7, 4), key=mx.random.key(1))
    idx, w = moe.route(params, x, cfg)
    scores = np.array(mx.softmax(x @ params["router"]["weight"].T, axis=-1))
    want = np.argsort(-scores, axis=-1)[:, :2]
    assert (np.sort(np.array(idx), -1) == np.sort(want, -1)).all()
    np.testing.assert_allclose(np.array(w).sum(-1), 1.0, rtol=1e-6)


def test_moe_settings_errors():
    with pytest.raises(ValueError, match="top_k 3 exceeds n_experts 2"):
        moe.MoESettings(d_model=4, n_experts=2, top_k=3)
    with pytest.raises(ValueError, match="shared_gate needs a shared expert"):
        moe.MoESettings(d_model=4, shared_gate=True)

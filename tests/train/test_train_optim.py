"""Optimizers and schedules against independent numpy / math references."""
import math

import numpy as np
import pytest

import alloy
import mlx.core as mx

from alloy.params import flatten
from alloy.train import optim, schedule


def _np_adamw(p, g_seq, lr_seq, b1, b2, eps, wd, decay):
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, (g, lr) in enumerate(zip(g_seq, lr_seq), start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mh = m / (1 - b1 ** t)
        vh = v / (1 - b2 ** t)
        p = p - lr * (mh / (np.sqrt(vh) + eps) + (wd * p if decay else 0.0))
    return p


def test_adamw_matches_numpy_reference_with_decay_only_where_the_rule_says():
    rng = np.random.default_rng(0)
    params = {"embed_tokens": {"weight": mx.array(rng.normal(size=(5, 4)).astype(np.float32))},
              "layers": [{"mixer": {"in_proj": {"weight": mx.array(rng.normal(size=(4, 4)).astype(np.float32))},
                                    "A_log": mx.array(rng.normal(size=(3,)).astype(np.float32)),
                                    "norm": {"weight": mx.array(rng.normal(size=(4,)).astype(np.float32))}}}]}
    grads_seq = [{k: rng.normal(size=np.array(v).shape).astype(np.float32) for k, v in flatten(params).items()}
                 for _ in range(3)]
    lrs = [0.1, 0.05, 0.02]
    opt = optim.adamw(b1=0.8, b2=0.9, eps=1e-6, weight_decay=0.3)
    state = opt.init(params)
    p = params
    for gs, lr in zip(grads_seq, lrs):
        g = alloy.params.unflatten({k: mx.array(v) for k, v in gs.items()})
        p, state = opt.update(g, state, p, mx.array(lr))
    assert int(state["step"]) == 3
    decayed = {"layers.0.mixer.in_proj.weight"}
    for k, v in flatten(params).items():
        want = _np_adamw(np.array(v), [gs[k] for gs in grads_seq], lrs, 0.8, 0.9, 1e-6, 0.3, k in decayed)
        np.testing.assert_allclose(np.array(flatten(p)[k]), want, rtol=1e-5, atol=1e-6, err_msg=k)
    for leaf in alloy.params.leaves(state["mu"]) + alloy.params.leaves(state["nu"]):
        assert leaf.dtype == mx.float32


def test_decay_rule_on_a_real_hybrid_tree(tiny_cfg):
    tiny_cfg["layer_types"] = ["mamba2", "mamba1"]
    tiny_cfg["mixers"] = {"mamba2": tiny_cfg["mixers"]["mamba2"]}
    tiny_cfg["tie_embeddings"] = False
    params = alloy.build(tiny_cfg).init(mx.random.key(0))
    flat = flatten(params)
    rule = optim.decay_rule()
    yes = {k for k, v in flat.items() if rule(k, v)}
    assert "layers.0.mixer.in_proj.weight" in yes and "layers.1.mixer.out_proj.weight" in yes
    assert "layers.0.mixer.conv1d.weight" in yes and "lm_head.weight" in yes
    for k in yes:
        last = k.split(".")[-1]
        assert flat[k].ndim >= 2 and last not in ("A_log", "D", "dt_bias", "bias") and "norm" not in k
        assert not k.startswith("embed_tokens")
    assert "embed_tokens.weight" in {k for k, v in flat.items() if optim.decay_rule(True)(k, v)}
    # every matrix that is not an embedding / norm decays (Mamba-1's A_log is 2-D and still does not)
    assert "layers.1.mixer.A_log" not in yes and flat["layers.1.mixer.A_log"].ndim == 2


def test_clip_by_global_norm():
    rng = np.random.default_rng(1)
    tree = {"a": mx.array(rng.normal(size=(3, 4)).astype(np.float32)), "b": [mx.array(rng.normal(size=(5,)).astype(np.float32))]}
    norm = math.sqrt(sum(float((np.array(x) ** 2).sum()) for x in alloy.params.leaves(tree)))
    clipped, n = optim.clip_by_global_norm(tree, norm / 2)
    assert abs(float(n) - norm) < 1e-4
    assert abs(float(optim.global_norm(clipped)) - norm / 2) < 1e-4
    same, _ = optim.clip_by_global_norm(tree, norm * 2)
    np.testing.assert_allclose(np.array(same["a"]), np.array(tree["a"]), rtol=1e-6)
    assert float(optim.global_norm({})) == 0.0


def test_sgd_momentum_reference():
    p = {"w": mx.array([[1.0, -2.0]])}
    opt = optim.sgd(momentum=0.5, weight_decay=0.1)
    s = opt.init(p)
    g = {"w": mx.array([[0.5, 1.0]])}
    p1, s = opt.update(g, s, p, 0.1)
    p2, s = opt.update(g, s, p1, 0.1)
    w, b = np.array([[1.0, -2.0]]), 0
    for _ in range(2):
        b = 0.5 * b + np.array([[0.5, 1.0]])
        w = w - 0.1 * (b + 0.1 * w)
    np.testing.assert_allclose(np.array(p2["w"]), w, rtol=1e-6)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedules_match_closed_forms(kind):
    peak, total, warm, end = 1e-2, 100, 10, 1e-3
    f = schedule.make_schedule(kind, peak, total, warm, end)
    fc = mx.compile(f)
    for s in [0, 4, 9, 10, 37, 99, 100, 150]:
        if s < warm:
            want = peak * (s + 1) / warm
        else:
            p = min(max((s - warm) / (total - warm), 0.0), 1.0)
            want = {"cosine": end + (peak - end) * 0.5 * (1 + math.cos(math.pi * p)),
                    "linear": peak + (end - peak) * p, "constant": peak}[kind]
        got = float(fc(mx.array(s, dtype=mx.int32)))
        assert abs(got - want) < 1e-7 + 1e-5 * want, (kind, s, got, want)


def test_schedule_and_optimizer_errors_name_the_field():
    with pytest.raises(ValueError, match="total"):
        schedule.warmup_cosine(1e-3, total=5, warmup=10)
    with pytest.raises(ValueError, match="schedule must be one of"):
        schedule.make_schedule("step", 1e-3, 10)
    with pytest.raises(ValueError, match="b2"):
        optim.adamw(b2=1.0)


def test_decay_rule_excludes_norms_biases_and_ssm_params_by_name_whatever_their_rank():
    rule = optim.decay_rule(decay_embeddings=True)
    m = mx.zeros((4, 4))
    for path in ("layers.0.mixer.norm.weight", "layers.0.ffn_norm.weight", "layers.2.mixer.q_norm.weight",
                 "layers.0.mixer.A_log", "layers.0.mixer.D", "layers.0.mixer.dt_bias", "layers.1.ffn.up_proj.bias"):
        assert not rule(path, m), path
    assert rule("layers.1.ffn.up_proj.weight", m) and not rule("layers.1.ffn.up_proj.weight", mx.zeros((4,)))

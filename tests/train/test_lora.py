"""LoRA as a tree delta: targets, merge == unmerged forward on every mixer, gradients, files."""
import json
import math
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import alloy
import alloy.params
import mlx.core as mx

from alloy.layers import common, registered
from alloy.layers.registry import get_ffn, get_mixer
from alloy.ops.loss import cross_entropy
from alloy.params import flatten, lora as L

# Small settings for the built-in kinds; a kind registered later runs with its defaults.
_SMALL = {
    "mamba2": {"d_state": 8, "head_dim": 16, "n_groups": 2, "chunk_size": 4},
    "mamba1": {"d_state": 4, "chunk_size": 4},
    "attention": {"n_heads": 4, "n_kv_heads": 2, "qk_norm": True},
    "sliding_attention": {"n_heads": 4, "n_kv_heads": 1, "window": 3},
    "mlp": {"d_ff": 48},
    "parallel": {"branches": {"ssm": {"kind": "mamba2", "d_state": 8, "head_dim": 16, "chunk_size": 4},
                              "attn": {"kind": "attention", "n_heads": 4}}},
    "rglru": {"width": 32, "n_heads": 4},
    "lightning": {"n_heads": 4, "chunk_size": 4},
    "kda": {"n_heads": 2, "head_dim": 8, "chunk_size": 4},
    "mla": {"n_heads": 2, "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8, "rope": True},
    "gated_deltanet": {"n_k_heads": 2, "n_v_heads": 4, "head_k_dim": 8, "head_v_dim": 8, "chunk_size": 4},
    **{k: {"n_heads": 2, "head_dim": 16, "q_lora_rank": 8, "rope_dims": 4, "window": 3, "o_groups": 2, "o_lora_rank": 4,
           **extra} for k, extra in (("dsv4_sliding", {}), ("hca", {"compress_rate": 3}),
                                     ("csa", {"compress_rate": 2, "index_n_heads": 2, "index_head_dim": 8,
                                              "index_topk": 2}))},
    "hash_moe": {"n_experts": 4, "top_k": 2, "d_ff": 16},
}
V = 61


def every_mixer_config():
    """A hybrid stack using every registered mixer (and every registered FFN)."""
    mixers, ffns = registered("mixer"), registered("ffn")
    n = max(len(mixers), 2)
    layer_types = [mixers[i % len(mixers)] for i in range(n)]
    n = max(n, 2 * len(ffns))  # an FFN on every other layer, cycling through the FFN kinds
    layer_types = [mixers[i % len(mixers)] for i in range(n)]
    ffn_types = [ffns[(i // 2) % len(ffns)] if i % 2 == 0 else "none" for i in range(n)]
    return {
        "vocab_size": V, "d_model": 64, "layer_types": layer_types, "ffn_types": ffn_types,
        "mixers": {k: _SMALL[k] for k in set(layer_types) if k in _SMALL},
        "ffns": {k: _SMALL[k] for k in set(ffn_types) if k in _SMALL},
        "tie_embeddings": False,
    }


BUILTIN_CFG = {  # fixed kinds, for the exact-target test
    "vocab_size": V, "d_model": 32,
    "layer_types": ["mamba2", "attention", "mamba1", "sliding_attention"],
    "ffn_types": ["mlp", "none", "mlp", "none"],
    "mixers": {**{k: _SMALL[k] for k in ("mamba2", "mamba1", "sliding_attention")},
               "attention": {"n_heads": 4, "n_kv_heads": 2, "qk_norm": True},
               "mamba2": {"d_state": 8, "head_dim": 8, "n_groups": 1, "chunk_size": 4}},
    "ffns": {"mlp": {"d_ff": 48}},
    "tie_embeddings": False,
}


def _tokens(b, t, seed=0):
    return mx.array(np.random.default_rng(seed).integers(0, V, (b, t)), dtype=mx.int32)


def _randomize_b(adapters, seed=0, std=0.05):
    """Adapters with non-zero B (a trained adapter), so deltas are not trivially zero."""
    rng = np.random.default_rng(seed)

    def f(path, a):
        if path.endswith("lora_B"):
            return mx.array(rng.normal(0, std, a.shape).astype(np.float32)).astype(a.dtype)
        return a
    return alloy.params.tree_map_with_path(f, adapters)


@pytest.fixture(scope="module")
def every():
    model = alloy.build(every_mixer_config())
    params = model.init(mx.random.key(3))
    cfg = L.LoraConfig(rank=4, alpha=8.0)
    adapters = _randomize_b(L.init_lora(mx.random.key(4), params, cfg))
    mx.eval(params, adapters)
    return model, params, cfg, adapters


@pytest.fixture(scope="module")
def builtin():
    model = alloy.build(BUILTIN_CFG)
    params = model.init(mx.random.key(0))
    mx.eval(params)
    return model, params


def _np(a):
    return np.array(a.astype(mx.float32)) if a.dtype == mx.bfloat16 else np.array(a)


# ----------------------------------------------------------------------------------------------
# targets
# ----------------------------------------------------------------------------------------------

_PROJ = {"mamba2": ["in_proj", "out_proj"], "mamba1": ["in_proj", "x_proj", "dt_proj", "out_proj"],
         "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
         "sliding_attention": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def test_default_targets_are_exactly_the_linear_projections(builtin):
    _, params = builtin
    want = []
    for i, (mk, fk) in enumerate(zip(BUILTIN_CFG["layer_types"], BUILTIN_CFG["ffn_types"])):
        want += [f"layers.{i}.mixer.{n}.weight" for n in _PROJ[mk]]
        if fk == "mlp":
            want += [f"layers.{i}.ffn.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")]
    got = L.lora_targets(params, L.LoraConfig())
    assert sorted(got) == sorted(want)
    never = {"embed_tokens", "lm_head", "norm", "norm_f", "ffn_norm", "q_norm", "k_norm", "conv1d",
             "A_log", "D", "dt_bias", "bias"}
    assert not [p for p in got if never & set(p.split("."))]
    assert all(p.endswith(".weight") and params_leaf(params, p).ndim == 2 for p in got)
    # the tree order is the base tree's
    order = list(flatten(params))
    assert got == sorted(got, key=order.index)


def params_leaf(params, path):
    return flatten(params)[path]


@pytest.mark.parametrize("targets, want", [
    (("q_proj.weight",), ["layers.1.mixer.q_proj.weight", "layers.3.mixer.q_proj.weight"]),
    ((r"re:layers\.1\.mixer\..*",),  # q_norm / k_norm are 1-D: never adapted
     [f"layers.1.mixer.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj")]),
    (("layers.2.**",),  # conv1d (3-D), D, dt_proj.bias, norms: not 2-D; A_log (2-D): never
     ["layers.2.mixer.in_proj.weight", "layers.2.mixer.x_proj.weight", "layers.2.mixer.dt_proj.weight",
      "layers.2.mixer.out_proj.weight", "layers.2.ffn.gate_proj.weight",
      "layers.2.ffn.up_proj.weight", "layers.2.ffn.down_proj.weight"]),
    (("embed_tokens.weight", "lm_head.weight"), ["embed_tokens.weight", "lm_head.weight"]),
])
def test_target_patterns_select_exactly_the_expected_paths(builtin, targets, want):
    _, params = builtin
    assert params["layers"][2]["mixer"]["A_log"].ndim == 2  # mamba1's A_log: 2-D, still excluded
    got = L.lora_targets(params, L.LoraConfig(targets=targets))
    assert got == want


def test_everything_pattern_still_skips_ssm_dynamics_convs_and_vectors(builtin):
    _, params = builtin
    got = L.lora_targets(params, L.LoraConfig(targets=("**",)))
    flat = flatten(params)
    want = [p for p, a in flat.items() if a.ndim >= 2 and p.split(".")[-1] not in ("A_log", "D", "dt_bias")
            and "conv1d" not in p.split(".")]
    assert got == want
    assert "embed_tokens.weight" in got and "layers.2.mixer.A_log" not in got
    assert not [p for p in got if "conv1d" in p]


_OTHER_KINDS = {  # kind -> (role, the leaf names the default targets must take, and must not)
    "gated_deltanet": ("mixer", ["in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"],
                       ["conv1d", "A_log", "dt_bias", "norm"]),
    "short_conv": ("mixer", ["in_proj", "out_proj"], ["conv"]),
    "moe": ("ffn", ["experts.gate_proj", "experts.up_proj", "experts.down_proj"], ["router"]),
}


@pytest.mark.parametrize("kind", sorted(_OTHER_KINDS))
def test_default_targets_cover_the_other_registered_kinds(kind):
    role, want, never = _OTHER_KINDS[kind]
    if kind not in registered(role):
        pytest.skip(f"{role} {kind!r} is not registered")
    cfg = {"vocab_size": V, "d_model": 32, "layer_types": [kind if role == "mixer" else "attention"],
           "ffn_types": [kind if role == "ffn" else "none"]}
    params = alloy.build(cfg).init(mx.random.key(0))
    where = "mixer" if role == "mixer" else "ffn"
    got = L.lora_targets(params, L.LoraConfig())
    attn = [f"layers.0.mixer.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    assert got == (attn if role == "ffn" else []) + [f"layers.0.{where}.{n}.weight" for n in want]
    assert not [p for p in got if set(p.split(".")) & set(never)]
    if kind == "moe":  # stacked experts (E, F, D) get stacked adapters (E, r, D) / (E, F, r)
        ad = L.init_lora(mx.random.key(1), params, L.LoraConfig(rank=3))
        w = params["layers"][0]["ffn"]["experts"]["up_proj"]["weight"]
        pair = ad["layers"][0]["ffn"]["experts"]["up_proj"]["weight"]
        E, F, D = w.shape
        assert pair["lora_A"].shape == (E, 3, D) and pair["lora_B"].shape == (E, F, 3)


def test_adapter_tree_mirrors_targets_with_list_holes(builtin):
    _, params = builtin
    cfg = L.LoraConfig(rank=2, targets=(r"re:layers\.(1|3)\.mixer\.o_proj\.weight",))
    ad = L.init_lora(mx.random.key(0), params, cfg)
    assert list(ad) == ["layers"] and len(ad["layers"]) == 4
    assert ad["layers"][0] == {} and ad["layers"][2] == {}
    assert list(ad["layers"][3]["mixer"]["o_proj"]["weight"]) == ["lora_A", "lora_B"]
    assert list(flatten(ad)) == [f"layers.{i}.mixer.o_proj.weight.lora_{x}" for i in (1, 3) for x in "AB"]


def test_init_shapes_bounds_and_starts_at_the_base(builtin):
    model, params = builtin
    cfg = L.LoraConfig(rank=3)
    ad = L.init_lora(mx.random.key(1), params, cfg)
    flat_p = flatten(params)
    for path in L.lora_targets(params, cfg):
        a = flatten(ad)[path + ".lora_A"]
        b = flatten(ad)[path + ".lora_B"]
        d_out, d_in = flat_p[path].shape
        assert a.shape == (3, d_in) and b.shape == (d_out, 3)
        assert a.dtype == b.dtype == mx.float32
        assert float(mx.abs(a).max()) <= 1 / math.sqrt(d_in) and float(mx.abs(a).max()) > 0
        assert not np.any(np.array(b))
    assert alloy.params.count_params(ad) == L.lora_param_count(params, cfg)
    adapted = L.apply_lora(params, ad, cfg)
    assert list(flatten(adapted)) == list(flatten(params))
    for (k, w), w2 in zip(flatten(params).items(), flatten(adapted).values()):
        assert np.array_equal(np.array(w), np.array(w2)), k
    # untargeted leaves are shared, not copied
    assert adapted["embed_tokens"]["weight"] is params["embed_tokens"]["weight"]


def test_targets_matching_nothing_is_an_error(builtin):
    _, params = builtin
    with pytest.raises(ValueError, match="targets .*match no adaptable"):
        L.init_lora(mx.random.key(0), params, L.LoraConfig(targets=("nonexistent.weight",)))


# ----------------------------------------------------------------------------------------------
# merge == unmerged forward
# ----------------------------------------------------------------------------------------------


@settings(max_examples=15)
@given(d_in=st.integers(1, 9), d_out=st.integers(1, 9), r=st.integers(1, 5),
       alpha=st.floats(0.25, 32.0), stack=st.sampled_from([(), (3,), (2, 2)]), seed=st.integers(0, 2**16))
def test_merge_is_the_low_rank_delta_numpy_reference(d_in, d_out, r, alpha, stack, seed):
    """Eq. (1) and (2) in float64 numpy; a stacked weight (*S, d_out, d_in) is a stack of LoRAs."""
    rng = np.random.default_rng(seed)
    w, a, b = (rng.normal(size=stack + s).astype(np.float32) for s in ((d_out, d_in), (r, d_in), (d_out, r)))
    x = rng.normal(size=stack + (3, d_in)).astype(np.float32)
    cfg = L.LoraConfig(rank=r, alpha=alpha, targets=("proj.weight",))
    tree = {"proj": {"weight": mx.array(w)}, "bias": mx.zeros((2, 2))}
    ad = {"proj": {"weight": {"lora_A": mx.array(a), "lora_B": mx.array(b)}}}
    merged = L.merge_lora(tree, ad, cfg)
    s = alpha / r
    ref = w.astype(np.float64) + s * b.astype(np.float64) @ a.astype(np.float64)
    np.testing.assert_allclose(np.array(merged["proj"]["weight"]), ref, rtol=1e-5, atol=1e-5)
    # eq. (2): x W'^T == x W^T + s (x A^T) B^T, the unmerged LoRA forward (per stacked matrix)
    t = lambda m: np.swapaxes(m, -1, -2)  # noqa: E731
    unmerged_y = x @ t(w) + s * (x @ t(a)) @ t(b)
    merged_y = np.array(mx.array(x) @ merged["proj"]["weight"].swapaxes(-1, -2))
    np.testing.assert_allclose(merged_y, unmerged_y, rtol=1e-4, atol=1e-4)
    assert merged["bias"] is tree["bias"]
    fresh = L.init_lora(mx.random.key(0), tree, cfg)
    assert L.lora_param_count(tree, cfg) == alloy.params.count_params(fresh)


def _unmerged_dense(monkeypatch, by_id, cfg, used):
    """Patch every layer module's ``dense`` to run the unmerged LoRA forward, eq. (2), for the
    weights in ``by_id`` (id(W) -> (path, A, B)); others run the plain dense. The MoE's stacked
    experts run through its ``_gather_mm`` (a @ W[idx]^T): patched the same way, per expert."""
    plain = common.dense
    moe = sys.modules.get("alloy.layers.moe")
    if moe is not None and hasattr(moe, "_gather_mm"):
        plain_gmm = moe._gather_mm

        def gather_mm(a, w, idx):
            hit = by_id.get(id(w))
            if hit is None:
                return plain_gmm(a, w, idx)
            path, la, lb = hit
            used.add(path)
            return plain_gmm(a, w, idx) + cfg.scale * plain_gmm(plain_gmm(a, la, idx), lb, idx)

        monkeypatch.setattr(moe, "_gather_mm", gather_mm)

    def dense(p, x):
        hit = by_id.get(id(p["weight"]))
        if hit is None:
            return plain(p, x)
        path, a, b = hit
        used.add(path)
        y = x @ p["weight"].T + cfg.scale * ((x @ a.T) @ b.T)
        return y + p["bias"] if "bias" in p else y

    kinds = [get_mixer(k) for k in registered("mixer")] + [get_ffn(k) for k in registered("ffn")]
    for spec in kinds:
        mod = sys.modules[spec.apply.__module__]
        if getattr(mod, "dense", None) is plain:
            monkeypatch.setattr(mod, "dense", dense)


def test_merged_forward_equals_unmerged_forward_for_every_mixer(every, monkeypatch):
    model, params, cfg, adapters = every
    assert set(model.config.layer_types) == set(registered("mixer"))
    assert set(model.config.ffn_types) - {"none"} == set(registered("ffn"))
    tokens = _tokens(2, 11, seed=1)
    merged = L.merge_lora(params, adapters, cfg)
    y_merged, _ = model.apply(merged, tokens)
    y_inside, _ = model.apply(L.apply_lora(params, adapters, cfg), tokens)  # apply_lora inside apply
    y_base, _ = model.apply(params, tokens)

    flat_ad = flatten(adapters)
    by_id = {id(w): (p, flat_ad[p + ".lora_A"], flat_ad[p + ".lora_B"])
             for p, w in flatten(params).items() if p + ".lora_A" in flat_ad}
    used: set = set()
    _unmerged_dense(monkeypatch, by_id, cfg, used)
    y_unmerged, _ = model.apply(params, tokens)
    missing = sorted({p for p, _, _ in by_id.values()} - used)
    assert not missing, f"these targets bypass the patched dense / gather_mm: {missing}"

    np.testing.assert_allclose(np.array(y_merged), np.array(y_unmerged), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.array(y_merged), np.array(y_inside))
    # the adapters matter: the comparison is not between two copies of the base model
    assert float(mx.abs(y_merged - y_base).max()) > 1e-3


def test_apply_lora_compiles_and_keeps_order(every):
    model, params, cfg, adapters = every
    tokens = _tokens(2, 6, seed=2)
    fwd = lambda ad, p, t: model.apply(L.apply_lora(p, ad, cfg), t)[0]  # noqa: E731
    np.testing.assert_allclose(np.array(mx.compile(fwd)(adapters, params, tokens)),
                               np.array(fwd(adapters, params, tokens)), rtol=1e-5, atol=1e-5)
    assert list(flatten(L.apply_lora(params, adapters, cfg))) == list(flatten(params))


def test_unmerge_inverts_merge_and_dtypes_are_kept(every):
    _, params, cfg, adapters = every
    merged = L.merge_lora(params, adapters, cfg)
    back = L.unmerge_lora(merged, adapters, cfg)
    targets = set(L.lora_targets(params, cfg))
    for (k, w), m, u in zip(flatten(params).items(), flatten(merged).values(), flatten(back).values()):
        w, m, u = np.array(w), np.array(m), np.array(u)
        if k in targets:
            assert not np.array_equal(w, m), k
            # one fp32 rounding each way: |err| <= a couple of ulps of |W'|
            ulp = np.finfo(np.float32).eps * (1 + np.abs(m).max())
            np.testing.assert_allclose(u, w, rtol=0, atol=4 * ulp)
        else:
            assert np.array_equal(w, m) and np.array_equal(w, u), k
    # bf16 base: merged leaves stay bf16, the fp32 adapters are rounded once into them
    p16 = alloy.params.cast(params, mx.bfloat16)
    m16 = L.merge_lora(p16, adapters, cfg)
    assert [a.dtype for a in flatten(m16).values()] == [a.dtype for a in flatten(p16).values()]
    path = next(iter(targets))
    ref = (_np(flatten(p16)[path]) + np.array(cfg.scale * (flatten(adapters)[path + ".lora_B"]
                                                         @ flatten(adapters)[path + ".lora_A"])))
    np.testing.assert_allclose(_np(flatten(m16)[path]), ref, rtol=2 ** -7, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------


def _loss_fn(model, cfg):
    def loss(adapters, params, tokens):
        logits, _ = model.apply(L.apply_lora(params, adapters, cfg), tokens[:, :-1])
        return cross_entropy(logits, tokens[:, 1:])
    return loss


@pytest.mark.parametrize("which", ["builtin", "every"])
def test_gradients_reach_only_the_adapters_and_lora_a_is_zero_at_init(request, which):
    model, params = request.getfixturevalue(which)[:2]
    cfg = L.LoraConfig(rank=4)
    ad = L.init_lora(mx.random.key(5), params, cfg)
    tokens = _tokens(2, 9, seed=3)
    grads = mx.grad(_loss_fn(model, cfg))(ad, params, tokens)  # params: an argument, not differentiated
    assert list(flatten(grads)) == list(flatten(ad))            # no base-param entry anywhere
    assert len(grads["layers"]) == len(ad["layers"])
    for k, g in flatten(grads).items():
        if k.endswith("lora_A"):
            assert not np.any(np.array(g)), k                   # dL/dA = s B^T dL/dW' = 0 at B = 0
        else:
            assert float(mx.abs(g).max()) > 0, k                # dL/dB = s dL/dW' A^T != 0


def test_adapter_gradients_follow_the_chain_rule(builtin):
    model, params = builtin
    cfg = L.LoraConfig(rank=3, alpha=5.0, targets=("in_proj.weight", "o_proj.weight", "up_proj.weight"))
    ad = _randomize_b(L.init_lora(mx.random.key(6), params, cfg), seed=1)
    tokens = _tokens(2, 9, seed=4)
    g_ad = flatten(mx.grad(_loss_fn(model, cfg))(ad, params, tokens))

    def base_loss(p):
        logits, _ = model.apply(p, tokens[:, :-1])
        return cross_entropy(logits, tokens[:, 1:])
    g_w = flatten(mx.grad(base_loss)(L.merge_lora(params, ad, cfg)))  # dL/dW' at the adapted point
    flat_ad, s = flatten(ad), cfg.scale
    for path in L.lora_targets(params, cfg):
        a, b, gw = (np.array(x, dtype=np.float64) for x in
                    (flat_ad[path + ".lora_A"], flat_ad[path + ".lora_B"], g_w[path]))
        np.testing.assert_allclose(np.array(g_ad[path + ".lora_A"]), s * b.T @ gw, rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(np.array(g_ad[path + ".lora_B"]), s * gw @ a.T, rtol=1e-3, atol=1e-6)


def test_a_few_sgd_steps_on_adapters_lower_the_loss_and_leave_the_base(builtin):
    model, params = builtin
    cfg = L.LoraConfig(rank=4, alpha=8.0)
    ad = L.init_lora(mx.random.key(7), params, cfg)
    tokens = _tokens(2, 17, seed=5)
    vg = mx.value_and_grad(_loss_fn(model, cfg))
    before = {k: np.array(v) for k, v in flatten(params).items()}
    losses = []
    for _ in range(4):
        loss, g = vg(ad, params, tokens)
        ad = alloy.params.tree_map(lambda a, d: a - 0.5 * d, ad, g)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(np.array_equal(before[k], np.array(v)) for k, v in flatten(params).items())


# ----------------------------------------------------------------------------------------------
# dropout
# ----------------------------------------------------------------------------------------------


def test_dropout_drops_whole_input_features_per_call():
    rng = np.random.default_rng(0)
    d_out, d_in, r, p = 5, 400, 2, 0.25
    tree = {"proj": {"weight": mx.zeros((d_out, d_in))}}
    a, b = rng.normal(size=(r, d_in)).astype(np.float32), rng.normal(size=(d_out, r)).astype(np.float32)
    ad = {"proj": {"weight": {"lora_A": mx.array(a), "lora_B": mx.array(b)}}}
    cfg = L.LoraConfig(rank=r, alpha=4.0, dropout=p, targets=("proj.weight",))
    full = cfg.scale * (b @ a)
    # no key, or dropout 0: no dropout
    np.testing.assert_allclose(np.array(L.apply_lora(tree, ad, cfg)["proj"]["weight"]), full, rtol=1e-5)
    cfg0 = L.LoraConfig(rank=r, alpha=4.0, targets=("proj.weight",))
    np.testing.assert_allclose(np.array(L.apply_lora(tree, ad, cfg0, key=mx.random.key(1))["proj"]["weight"]),
                               full, rtol=1e-5)
    d1 = np.array(L.apply_lora(tree, ad, cfg, key=mx.random.key(1))["proj"]["weight"])
    d1b = np.array(L.apply_lora(tree, ad, cfg, key=mx.random.key(1))["proj"]["weight"])
    d2 = np.array(L.apply_lora(tree, ad, cfg, key=mx.random.key(2))["proj"]["weight"])
    assert np.array_equal(d1, d1b) and not np.array_equal(d1, d2)
    dropped = np.all(d1 == 0, axis=0)
    # every column is either dropped entirely or the full column scaled by 1/(1-p)
    np.testing.assert_allclose(d1[:, ~dropped], full[:, ~dropped] / (1 - p), rtol=1e-5, atol=1e-6)
    assert 0.15 < dropped.mean() < 0.35  # 400 Bernoulli(0.25) draws: within ~4.5 sigma


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------


def _bits(a):
    return np.array(a.view(mx.uint16)) if a.dtype == mx.bfloat16 else np.array(a)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_save_load_round_trip_is_bit_exact(builtin, tmp_path, dtype):
    _, params = builtin
    cfg = L.LoraConfig(rank=3, alpha=6.0, dropout=0.1,
                       targets=(r"re:layers\.(1|2)\..*", "down_proj.weight"))
    ad = _randomize_b(L.init_lora(mx.random.key(8), params, cfg, dtype=dtype), seed=2)
    L.save_adapters(tmp_path / "ad", ad, cfg)
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == [L.ADAPTER_CONFIG, L.ADAPTER_WEIGHTS]
    ad2, cfg2 = L.load_adapters(tmp_path / "ad")
    assert cfg2 == cfg
    assert list(flatten(ad2)) == list(flatten(ad))  # key order (x_proj before dt_proj) kept
    assert ad2["layers"][3] == {} and len(ad2["layers"]) == 4  # holes kept
    assert ad2["layers"][0]["ffn"]["down_proj"]["weight"]["lora_A"].shape == (3, 48)
    for k, v in flatten(ad).items():
        v2 = flatten(ad2)[k]
        assert v2.dtype == v.dtype and np.array_equal(_bits(v), _bits(v2)), k


def test_load_errors_are_clear(builtin, tmp_path):
    _, params = builtin
    cfg = L.LoraConfig(rank=2, targets=("q_proj.weight",))
    ad = L.init_lora(mx.random.key(9), params, cfg)
    d = tmp_path / "ad"
    L.save_adapters(d, ad, cfg)
    meta = json.loads((d / L.ADAPTER_CONFIG).read_text())

    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        L.load_adapters(tmp_path / "nowhere")

    def write(m):
        (d / L.ADAPTER_CONFIG).write_text(json.dumps(m))

    write({**meta, "config": {**meta["config"], "ranks": 4}})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['ranks'\]"):
        L.load_adapters(d)
    write({**meta, "config": {**meta["config"], "rank": 0}})
    with pytest.raises(ValueError, match="rank must be a positive int"):
        L.load_adapters(d)
    write({**meta, "version": 99})
    with pytest.raises(ValueError, match="version 99 is not supported"):
        L.load_adapters(d)
    write({**meta, "format": "peft"})
    with pytest.raises(ValueError, match="not an alloy LoRA adapter config"):
        L.load_adapters(d)
    write({**meta, "config": {**meta["config"], "rank": 3}})  # tensors have rank 2
    want = r"lora_A: expected shape \(\.\.\., rank=3, d_in\), got \(2, 32\)"
    with pytest.raises(alloy.params.CheckpointError, match=want):
        L.load_adapters(d)
    tree = json.loads(json.dumps(meta["tree"]))
    tree["layers"][0] = {"mixer": {"in_proj": {"weight": "lora"}}}  # names tensors the file lacks
    write({**meta, "tree": tree})
    with pytest.raises(alloy.params.CheckpointError) as e:
        L.load_adapters(d)
    assert "layers.0.mixer.in_proj.weight.lora_A" in str(e.value)
    tree["layers"][0] = {}
    tree["layers"][1] = {}  # leaves the file's layer-1 tensors unexpected
    write({**meta, "tree": tree})
    with pytest.raises(alloy.params.CheckpointError, match="unexpected"):
        L.load_adapters(d)


def test_a_failed_save_leaves_the_previous_adapters(builtin, tmp_path):
    _, params = builtin
    cfg = L.LoraConfig(rank=2, targets=("q_proj.weight",))
    ad = L.init_lora(mx.random.key(10), params, cfg)
    L.save_adapters(tmp_path / "ad", ad, cfg)
    with pytest.raises(ValueError, match="do not have rank 5"):
        L.save_adapters(tmp_path / "ad", ad, L.LoraConfig(rank=5, targets=("q_proj.weight",)))
    ad2, cfg2 = L.load_adapters(tmp_path / "ad")
    assert cfg2 == cfg and list(flatten(ad2)) == list(flatten(ad))
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == [L.ADAPTER_CONFIG, L.ADAPTER_WEIGHTS]


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field", [
    ({"rank": 0}, "rank"), ({"rank": 2.0}, "rank"), ({"rank": True}, "rank"),
    ({"alpha": 0}, "alpha"), ({"alpha": float("nan")}, "alpha"), ({"alpha": "16"}, "alpha"),
    ({"dropout": 1.0}, "dropout"), ({"dropout": -0.1}, "dropout"),
    ({"targets": ()}, "targets"), ({"targets": ("q_proj", "")}, r"targets\[1\]"),
    ({"targets": ("a..b",)}, r"targets\[0\]"), ({"targets": ("re:(",)}, r"targets\[0\]"),
    ({"targets": (3,)}, r"targets\[0\]"),
])
def test_bad_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"LoraConfig\.{field}"):
        L.LoraConfig(**kwargs)


def test_config_round_trips_and_is_hashable():
    cfg = L.LoraConfig(rank=4, alpha=2, dropout=0.05, targets=["q_proj.weight"])
    assert cfg.targets == ("q_proj.weight",) and isinstance(cfg.alpha, float)
    assert L.LoraConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert hash(cfg) == hash(L.LoraConfig.from_dict(cfg.to_dict()))
    assert L.LoraConfig(targets="q_proj.weight").targets == ("q_proj.weight",)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['bogus'\]"):
        L.LoraConfig.from_dict({"bogus": 1})


def test_apply_errors_name_the_adapter_path(builtin):
    _, params = builtin
    cfg = L.LoraConfig(rank=2, targets=("q_proj.weight",))
    ad = L.init_lora(mx.random.key(11), params, cfg)
    want = r"layers.1.mixer.q_proj.weight.lora_A: expected shape \(3, 32\), got \(2, 32\)"
    with pytest.raises(ValueError, match=want):
        L.apply_lora(params, ad, L.LoraConfig(rank=3, targets=("q_proj.weight",)))
    bad = {"nothere": {"weight": {"lora_A": mx.zeros((2, 4)), "lora_B": mx.zeros((4, 2))}}}
    with pytest.raises(ValueError, match="nothere.weight: no such leaf in params"):
        L.apply_lora(params, bad, cfg)
    with pytest.raises(ValueError, match=r"missing halves: \['x.weight.lora_B'\]"):
        L.apply_lora(params, {"x": {"weight": {"lora_A": mx.zeros((2, 2))}}}, cfg)
    with pytest.raises(ValueError, match="not named"):
        L.apply_lora(params, {"x": {"weight": mx.zeros((2, 2))}}, cfg)

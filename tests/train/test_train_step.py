"""The compiled train step: one trace, exact SGD/AdamW updates, accumulation, subsets, bf16, remat."""
import numpy as np
import pytest

import alloy
import mlx.core as mx

from alloy.layers import stack
from alloy.params import flatten, leaves, tree_map
from alloy.train import optim, schedule, step as S


def _setup(cfg, seed=0):
    model = alloy.build(cfg)
    params = model.init(mx.random.key(seed))
    mx.eval(params)
    return model, params


def _batch(cfg, B=4, T=12, seed=0, mask=False):
    rng = np.random.default_rng(seed)
    b = {"tokens": mx.array(rng.integers(0, cfg["vocab_size"], (B, T + 1)), dtype=mx.int32)}
    if mask:
        b["mask"] = mx.array((rng.random((B, T)) < 0.5).astype(np.float32))
    return b


def _np_loss(model, params, tokens):
    """Reference loss: model.apply + numpy log-softmax (independent of ops.loss)."""
    logits = np.array(model.apply(params, tokens[:, :-1])[0]).astype(np.float64)
    tgt = np.array(tokens[:, 1:])
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, tgt[..., None], -1).mean()


def test_step_traces_once_over_several_steps(tiny_cfg):
    model, params = _setup(tiny_cfg)
    base = S.make_lm_loss(model)
    traces = []

    def counting_loss(t, f, batch, key):
        traces.append(1)  # Python side effect: runs only while tracing
        return base(t, f, batch, key)

    opt = optim.adamw()
    step = S.make_step(counting_loss, opt, schedule.warmup_cosine(1e-2, 20, 2))
    state = opt.init(params)
    key = mx.random.key(0)
    losses = []
    for i in range(5):
        key, sub = mx.random.split(key)
        params, state, metrics = step(params, state, _batch(tiny_cfg, seed=i), sub)
        mx.eval(params, state, metrics)
        losses.append(float(metrics["loss"]))
    assert len(traces) == 1, f"traced {len(traces)} times over 5 steps"
    assert int(state["step"]) == 5
    assert set(metrics) >= {"loss", "grad_norm", "lr"}


def test_sgd_step_equals_params_minus_lr_times_the_reference_gradient(tiny_cfg):
    model, params = _setup(tiny_cfg)
    batch = _batch(tiny_cfg)
    lr = 0.05
    step = S.make_train_step(model, optim.sgd(), schedule.constant(lr), clip_norm=None)
    new, _, metrics = step(params, optim.sgd().init(params), batch, mx.random.key(0))
    assert abs(float(metrics["loss"]) - _np_loss(model, params, batch["tokens"])) < 1e-4
    # reference gradient: autodiff of a hand-written log-softmax loss (no alloy.train code)
    def ref_loss(p):
        logits = model.apply(p, batch["tokens"][:, :-1])[0]
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return -mx.take_along_axis(logp, batch["tokens"][:, 1:, None], axis=-1).mean()

    g = mx.grad(ref_loss)(params)
    for k, v in flatten(params).items():
        want = np.array(v) - lr * np.array(flatten(g)[k])
        np.testing.assert_allclose(np.array(flatten(new)[k]), want, rtol=1e-5, atol=1e-7, err_msg=k)


def test_gradient_accumulation_equals_the_full_batch(tiny_cfg):
    model, params = _setup(tiny_cfg)
    batch = _batch(tiny_cfg, B=4)
    opt = optim.adamw()
    sched = schedule.constant(1e-2)
    outs = []
    for a in (1, 2):
        step = S.make_train_step(model, opt, sched, accum_steps=a)
        p, s, m = step(params, opt.init(params), batch, mx.random.key(0))
        mx.eval(p, s, m)
        outs.append((p, s, m))
    assert abs(float(outs[0][2]["loss"]) - float(outs[1][2]["loss"])) < 1e-5
    assert abs(float(outs[0][2]["grad_norm"]) - float(outs[1][2]["grad_norm"])) < 1e-4
    for k, v in flatten(outs[0][1]["mu"]).items():
        np.testing.assert_allclose(np.array(flatten(outs[1][1]["mu"])[k]), np.array(v), rtol=1e-3, atol=1e-7, err_msg=k)
    with pytest.raises(ValueError, match="divisible"):
        S.make_train_step(model, opt, sched, accum_steps=3)(params, opt.init(params), batch, mx.random.key(0))


def test_trainable_subset_updates_only_matching_leaves(tiny_cfg):
    model, params = _setup(tiny_cfg)
    pred = lambda path, leaf: path.startswith("layers.1.")  # noqa: E731
    opt = optim.adamw(weight_decay=0.5)
    state = S.init_opt_state(opt, params, pred)
    assert set(flatten(state["mu"])) == {k for k in flatten(params) if k.startswith("layers.1.")}
    step = S.make_train_step(model, opt, schedule.constant(1e-2), trainable=pred)
    new, state, _ = step(params, state, _batch(tiny_cfg), mx.random.key(0))
    assert list(flatten(new)) == list(flatten(params))  # key order kept
    for k, v in flatten(params).items():
        same = bool(mx.array_equal(v, flatten(new)[k]))
        assert same != k.startswith("layers.1."), k


def test_grad_reduce_sees_the_gradient_before_the_update(tiny_cfg):
    model, params = _setup(tiny_cfg)
    batch = _batch(tiny_cfg)
    loss_fn = S.make_lm_loss(model)
    sched = schedule.constant(0.1)
    outs = []
    for reduce in (None, lambda g: tree_map(lambda x: 2.0 * x, g)):
        step = S.make_step(loss_fn, optim.sgd(), sched, clip_norm=None, grad_reduce=reduce)
        p, _, m = step(params, optim.sgd().init(params), batch, mx.random.key(0))
        outs.append((p, m))
    for k, v in flatten(params).items():
        d1 = np.array(flatten(outs[0][0])[k]) - np.array(v)
        d2 = np.array(flatten(outs[1][0])[k]) - np.array(v)
        np.testing.assert_allclose(d2, 2 * d1, rtol=1e-3, atol=1e-6, err_msg=k)
    assert abs(float(outs[1][1]["grad_norm"]) - 2 * float(outs[0][1]["grad_norm"])) < 1e-4


def test_frozen_tree_and_combine_fn_form(tiny_cfg):
    """The LoRA-style form: trainable = a small tree, frozen = the base, combined in the loss."""
    model, params = _setup(tiny_cfg)
    scale = {"s": mx.array(1.0)}

    def combine_fn(t, frozen, key):
        return tree_map(lambda p: p * t["s"], frozen)

    loss_fn = S.make_lm_loss(model, combine_fn=combine_fn)
    step = S.make_step(loss_fn, optim.sgd(), schedule.constant(0.1), clip_norm=None)
    new_t, _, m = step(scale, optim.sgd().init(scale), _batch(tiny_cfg), mx.random.key(0), params)
    g = mx.grad(lambda t: loss_fn(t, params, _batch(tiny_cfg), None)[0])(scale)
    assert abs(float(new_t["s"]) - (1.0 - 0.1 * float(g["s"]))) < 1e-6
    assert float(g["s"]) != 0.0


def test_bf16_compute_keeps_fp32_masters_and_ssm_params(tiny_cfg):
    model, params = _setup(tiny_cfg)
    seen = {}
    apply = model.apply

    def spy(p, tokens, state=None):
        for k, v in flatten(p).items():
            seen[k] = v.dtype
        return apply(p, tokens, state)

    model_spy = model._replace(apply=spy)
    opt = optim.adamw()
    step = S.make_train_step(model_spy, opt, schedule.constant(1e-3), compute_dtype=mx.bfloat16)
    new, state, m = step(params, opt.init(params), _batch(tiny_cfg), mx.random.key(0))
    for k, dt in seen.items():
        want = mx.float32 if k.split(".")[-1] in ("A_log", "D", "dt_bias") else mx.bfloat16
        assert dt == want, (k, dt)
    assert all(v.dtype == mx.float32 for v in leaves(new))
    ref = S.make_lm_loss(model)(params, {}, _batch(tiny_cfg), None)[0]
    assert abs(float(m["loss"]) - float(ref)) < 0.05


def test_gradients_at_the_compute_dtype_give_the_same_steps(tiny_cfg, monkeypatch):
    """`GRADS_IN_COMPUTE_DTYPE`: differentiating at the bf16-cast tree (gradients in bf16, widened by the
    clip / AdamW) gives the masters, moments and metrics of differentiating at the float32 masters bit for
    bit over three steps (clipping active), whole tree and a trainable subset; the gradients it hands the
    clip are 16-bit where the compute tree is."""
    model, params = _setup(tiny_cfg)
    opt = optim.adamw()
    seen = []

    def spy(grads, *a):  # the gradients as the step hands them to the clip
        seen.append({g.dtype for g in leaves(grads)})
        return optim.clip_by_global_norm(grads, *a)
    monkeypatch.setattr(S, "clip_by_global_norm", spy)
    runs = {}
    for on in (False, True):
        for sub in (None, lambda path, _: "mixer" in path):
            monkeypatch.setattr(S, "GRADS_IN_COMPUTE_DTYPE", on)
            seen.clear()
            step = S.make_train_step(model, opt, schedule.constant(1e-3), compute_dtype=mx.bfloat16,
                                     clip_norm=0.05, trainable=sub, compile=False)
            p, st = params, S.init_opt_state(opt, params, sub)
            for i in range(3):
                p, st, m = step(p, st, _batch(tiny_cfg, seed=i), mx.random.key(i))
            mx.eval(p, st, m)
            assert (mx.bfloat16 in set().union(*seen)) == on
            runs[on, sub is None] = (p, st, m)
    for whole in (True, False):
        (p0, s0, m0), (p1, s1, m1) = runs[False, whole], runs[True, whole]
        assert float(m0["grad_norm"]) > 0.05  # the clip acted
        for a, b in zip(leaves((p0, s0, m0)), leaves((p1, s1, m1))):
            assert a.dtype == b.dtype and mx.array_equal(a, b)


def test_clip_widens_16_bit_gradients():
    g = {"a": mx.array([[0.5, -1.25], [2.0, 3.0]], dtype=mx.bfloat16), "b": mx.array([1.0, 2.0])}
    clipped, n = optim.clip_by_global_norm(g, 1.0)
    assert clipped["a"].dtype == mx.float32 and clipped["b"].dtype == mx.float32
    s = 1.0 / (float(n) + 1e-6)
    np.testing.assert_allclose(np.array(clipped["a"]), np.array(g["a"].astype(mx.float32)) * s, rtol=1e-6)


def test_remat_gives_the_same_loss_and_gradients(tiny_cfg):
    model, params = _setup(tiny_cfg)
    batch = _batch(tiny_cfg, mask=True)
    outs = []
    for remat in (False, True):
        lf = S.make_lm_loss(model, remat=remat)
        (loss, aux), g = mx.value_and_grad(lf)(params, {}, batch, None)
        outs.append((loss, aux, g))
    assert abs(float(outs[0][0]) - float(outs[1][0])) < 1e-6
    assert float(outs[0][1]["accuracy"]) == float(outs[1][1]["accuracy"])
    for k, v in flatten(outs[0][2]).items():
        np.testing.assert_allclose(np.array(flatten(outs[1][2])[k]), np.array(v), rtol=1e-4, atol=1e-7, err_msg=k)
    # the remat path is really a different function (checkpointed blocks), with the default unchanged
    plain = stack.make_apply(model.config)
    np.testing.assert_array_equal(np.array(plain(params, batch["tokens"])[0]),
                                  np.array(model.apply(params, batch["tokens"])[0]))


def test_loss_decreases_when_fitting_one_batch(tiny_cfg):
    model, params = _setup(tiny_cfg)
    opt = optim.adamw()
    step = S.make_train_step(model, opt, schedule.constant(1e-2))
    state = opt.init(params)
    batch = _batch(tiny_cfg, B=2, T=16)
    first = None
    for _ in range(15):
        params, state, m = step(params, state, batch, mx.random.key(0))
        first = float(m["loss"]) if first is None else first
    assert float(m["loss"]) < first - 1.0


def test_lora_adapters_train_through_make_step_with_the_base_frozen(tiny_cfg):
    lora = pytest.importorskip("alloy.params.lora")
    model, params = _setup(tiny_cfg)
    cfg = lora.LoraConfig(rank=2, alpha=4.0)
    adapters = lora.init_lora(mx.random.key(1), params, cfg)
    loss_fn = S.make_lm_loss(model, combine_fn=lambda a, base, key: lora.apply_lora(base, a, cfg, key))
    opt = optim.adamw()
    step = S.make_step(loss_fn, opt, schedule.constant(1e-2))
    state = opt.init(adapters)
    batch = _batch(tiny_cfg)
    new, state, m = step(adapters, state, batch, mx.random.key(0), params)
    changed = [k for k, v in flatten(adapters).items() if not mx.array_equal(v, flatten(new)[k])]
    assert changed and all(k.endswith(("lora_A", "lora_B")) for k in changed)
    # the trained adapters give the merged model's loss
    merged = lora.merge_lora(params, new, cfg)
    assert abs(float(S.make_lm_loss(model)(merged, {}, batch, None)[0]) -
               float(loss_fn(new, params, batch, None)[0])) < 1e-5


@pytest.mark.parametrize("compute", [None, mx.bfloat16])
def test_flat_step_equals_the_per_leaf_step(tiny_cfg, compute):
    """make_train_step(flat=True) (leaves packed per compute dtype and decay, one cast / norm /
    AdamW update per buffer) gives the per-leaf step's params, moments and metrics over 3 steps, and
    traces once."""
    model, params = _setup(tiny_cfg)
    opt = optim.adamw(weight_decay=0.1)
    sched = schedule.warmup_cosine(1e-2, 20, 2)
    ref_step = S.make_train_step(model, opt, sched, compute_dtype=compute)
    flat_step = S.make_train_step(model, opt, sched, compute_dtype=compute, flat=True)
    plan = S.lm_flat_plan(params, opt, compute)
    want = (mx.bfloat16 if compute else mx.float32)
    assert set(plan.layout.groups) == {f"{str(want).split('.')[-1]}_decay", f"{str(want).split('.')[-1]}_nodecay"} | (
        {"float32_nodecay"} if compute else set())
    rp, rs = params, opt.init(params)
    fp, fs = params, S.init_opt_state(opt, params, flat=True, compute_dtype=compute)
    tol = 1e-5 if compute is None else 2e-3
    for i in range(3):
        rp, rs, rm = ref_step(rp, rs, _batch(tiny_cfg, seed=i), mx.random.key(i))
        fp, fs, fm = flat_step(fp, fs, _batch(tiny_cfg, seed=i), mx.random.key(i))
        for k in ("loss", "grad_norm", "lr"):
            np.testing.assert_allclose(float(fm[k]), float(rm[k]), rtol=tol, err_msg=k)
    want_leaves, got_leaves = flatten(rp), flatten(fp)
    assert list(got_leaves) == list(want_leaves)
    for k, v in want_leaves.items():
        assert got_leaves[k].shape == v.shape and got_leaves[k].dtype == v.dtype, k
        np.testing.assert_allclose(np.array(got_leaves[k]), np.array(v), rtol=tol, atol=tol, err_msg=k)
    mu = plan.layout.unpack(fs["mu"])
    for k, v in flatten(rs["mu"]).items():
        np.testing.assert_allclose(np.array(flatten(mu)[k]), np.array(v), rtol=10 * tol, atol=tol, err_msg=k)
    assert int(fs["step"]) == 3


def test_flat_step_refuses_what_it_does_not_cover(tiny_cfg):
    model, params = _setup(tiny_cfg)
    opt = optim.adamw()
    with pytest.raises(ValueError, match="trainable must be None"):
        S.make_train_step(model, opt, schedule.constant(1e-3), flat=True, trainable=lambda p, x: True)
    bare = optim.Optimizer(opt.init, opt.update)
    with pytest.raises(ValueError, match="weight-decay rule"):
        S.init_opt_state(bare, params, flat=True)
    with pytest.raises(ValueError, match="accum_steps=1"):
        S.make_step(S.make_lm_loss(model), opt, schedule.constant(1e-3), accum_steps=2,
                    flat=S.lm_flat_plan(params, opt))

"""Quantization as a tree transform: what is kept, logits close to full precision (stated bounds),
quantized dense == dense of the dequantized weight, checkpoints round-trip, generation runs."""
import json

import alloy
import mlx.core as mx
import numpy as np
import pytest

from alloy.layers.common import dense, embed
from alloy.params.quantize import apply_spec, dequantize, quantization_spec, quantize
from alloy.params.tree import flatten

# logits of the quantized model vs full precision: max |dl| / max |l| over a 24-token batch
BOUND = {8: 0.02, 4: 0.25}


@pytest.fixture(scope="module")
def model_params(helpers):
    model = alloy.build(helpers.every_mixer_config(init_std=0.5))
    return model, helpers.perturbed(model, 3)


def _rel_err(model, params, qparams):
    tok = mx.array(np.random.default_rng(0).integers(0, 61, (2, 12)), dtype=mx.int32)
    ref, _ = model.apply(params, tok)
    out, _ = model.apply(qparams, tok)
    return (mx.abs(out - ref).max() / mx.abs(ref).max()).item()


def test_sensitive_leaves_stay_full_precision_and_linears_are_quantized(model_params):
    model, params = model_params
    q = quantize(params, bits=4, group_size=32)
    flat = flatten(q)
    assert list(flatten(params)) == [k for k in flat if not k.endswith((".scales", ".biases"))]
    for key, v in flat.items():
        leaf = key.split(".")[-1]
        mod = key.rsplit(".", 1)[0]
        if leaf in ("A_log", "D", "dt_bias") or "norm" in key or "conv1d" in key or \
                key.startswith(("embed_tokens", "lm_head")):
            assert v.dtype == mx.float32 and f"{mod}.scales" not in flat, key
    quantized = {k.rsplit(".", 1)[0] for k in flat if k.endswith(".scales")}
    assert "layers.0.mixer.q_proj" in quantized and any("in_proj" in m for m in quantized)
    assert all(flat[f"{m}.weight"].dtype == mx.uint32 for m in quantized)
    qe = quantize(params, bits=8, group_size=32, embeddings=True)
    assert "scales" in qe["embed_tokens"] and "scales" in qe["lm_head"]


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_logits_are_close_to_full_precision(model_params, bits):
    model, params = model_params
    err = _rel_err(model, params, quantize(params, bits=bits, group_size=32))
    assert 0 < err < BOUND[bits]
    err_emb = _rel_err(model, params, quantize(params, bits=bits, group_size=32, embeddings=True))
    assert 0 < err_emb < 2 * BOUND[bits]


def test_quantized_dense_and_embed_equal_their_dequantized_weights():
    w = mx.random.normal((24, 64), key=mx.random.key(0))
    p = {"weight": w, "lora_A": mx.random.normal((2, 64), key=mx.random.key(2)),
         "lora_B": mx.random.normal((24, 2), key=mx.random.key(3)), "bias": mx.arange(24, dtype=mx.float32)}
    q = quantize({"lin": p}, bits=4, group_size=32)["lin"]
    assert list(q) == ["weight", "scales", "biases", "lora_A", "lora_B", "bias"]  # riders kept
    wd = mx.dequantize(q["weight"], q["scales"], q["biases"], group_size=32, bits=4)
    x = mx.random.normal((3, 5, 64), key=mx.random.key(1))
    ref = x @ wd.T + (x @ p["lora_A"].T) @ p["lora_B"].T + p["bias"]
    np.testing.assert_allclose(np.array(dense(q, x)), np.array(ref), atol=1e-4)
    tok = mx.array([[3, 0, 23]])
    np.testing.assert_allclose(np.array(embed(q, tok, 64)), np.array(wd[tok]), atol=1e-6)
    assert mx.abs(wd - w).max().item() < 0.5  # 4-bit: within a step of the group's range


def test_quantized_checkpoint_round_trips(tmp_path, model_params):
    model, params = model_params
    q = quantize(params, bits=4, group_size=32, embeddings=True)
    alloy.save(tmp_path / "q", model, q)
    meta = json.loads((tmp_path / "q" / "config.json").read_text())
    assert meta["quantization"] == quantization_spec(model, q)
    assert meta["quantization"]["modules"]["layers.0.mixer.q_proj"] == [4, 32]
    model2, q2 = alloy.load(tmp_path / "q")
    assert list(flatten(q2)) == list(flatten(q))
    tok = mx.array([[1, 2, 3, 4]])
    np.testing.assert_array_equal(np.array(model2.apply(q2, tok)[0]), np.array(model.apply(q, tok)[0]))
    # full-precision checkpoints carry no quantization entry
    alloy.save(tmp_path / "f", model, params)
    assert "quantization" not in json.loads((tmp_path / "f" / "config.json").read_text())
    # dequantize inverts the layout
    d = dequantize(model, q)
    assert list(flatten(d)) == list(flatten(params))


def test_bad_settings_and_specs_are_named(model_params):
    model, params = model_params
    with pytest.raises(ValueError, match="bits"):
        quantize(params, bits=7)
    with pytest.raises(ValueError, match="group_size"):
        quantize(params, group_size=48)
    with pytest.raises(ValueError, match="lacks"):
        apply_spec(params, {"modules": {"layers.99.mixer.q_proj": [4, 32]}})


def test_generation_runs_on_a_quantized_model(model_params):
    model, params = model_params
    q = quantize(params, bits=8, group_size=32)
    ev = list(alloy.generate(model, q, [1, 2, 3, 4, 5], max_tokens=5))
    ref = list(alloy.generate(model, params, [1, 2, 3, 4, 5], max_tokens=5))
    assert len(ev) == 5
    assert ev[0].token == ref[0].token  # 8-bit keeps the first greedy choice of this model


def test_gates_and_decay_projections_stay_full_precision():
    from alloy.params.quantize import keep_full_precision
    for path in ("layers.0.ffn.shared_expert_gate", "layers.1.mixer.in_proj_a", "layers.1.mixer.in_proj_b",
                 "layers.2.mixer.dt_proj", "layers.3.ffn.router", "layers.4.mixer.conv_1d",
                 "layers.5.mixer.forget_gate.f_b_proj", "layers.5.mixer.b_proj"):
        assert keep_full_precision(path), path
    for path in ("layers.1.mixer.in_proj_qkv", "layers.0.ffn.shared_expert.up_proj", "layers.2.mixer.x_proj"):
        assert not keep_full_precision(path), path

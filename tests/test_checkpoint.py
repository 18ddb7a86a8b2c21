"""alloy.save / alloy.load: bit-exact round trip in canonical key order, strict and atomic."""
import json

import numpy as np
import pytest

import alloy
import alloy.params as P
import mlx.core as mx

CFG = {"vocab_size": 61, "d_model": 32, "layer_types": ["mamba2", "attention", "mamba1"],
       "ffn_types": ["mlp", "mlp", "none"], "tie_embeddings": False,
       "mixers": {"mamba2": {"head_dim": 16, "d_state": 8}, "attention": {"n_heads": 2}}}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_load_round_trip_bit_exact_in_key_order(tmp_path, dtype):
    model = alloy.build({**CFG, "dtype": dtype})
    params = model.init(mx.random.key(3))
    alloy.save(tmp_path / "ck", model, params)
    model2, params2 = alloy.load(tmp_path / "ck")
    assert model2.config == model.config
    a, b = P.flatten(params), P.flatten(params2)
    assert list(a) == list(b)  # canonical order, not the file's
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert np.array_equal(np.array(a[k].astype(mx.float32)), np.array(b[k].astype(mx.float32))), k
    tokens = mx.array([[1, 2, 3, 4]])
    assert np.array_equal(np.array(model.apply(params, tokens)[0].astype(mx.float32)),
                          np.array(model2.apply(params2, tokens)[0].astype(mx.float32)))
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors"]


def test_load_reports_every_missing_extra_and_misshaped_tensor(tmp_path):
    model = alloy.build(CFG)
    params = model.init(mx.random.key(0))
    alloy.save(tmp_path / "ck", model, params)
    flat = dict(P.flatten(params))
    del flat["layers.0.mixer.A_log"]
    del flat["norm_f.weight"]
    flat["layers.9.mixer.bogus"] = mx.zeros((2,))
    flat["layers.1.mixer.q_proj.weight"] = mx.zeros((5, 32))
    mx.save_safetensors(str(tmp_path / "ck" / "model.safetensors"), flat)
    with pytest.raises(P.CheckpointError) as e:
        alloy.load(tmp_path / "ck")
    msg = str(e.value)
    for key in ("layers.0.mixer.A_log", "norm_f.weight", "layers.9.mixer.bogus", "layers.1.mixer.q_proj.weight"):
        assert key in msg
    assert "(5, 32)" in msg and "(32, 32)" in msg


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        alloy.load(tmp_path / "nope")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="neither an Alloy config"):
        alloy.load(tmp_path / "hf")


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    model = alloy.build(CFG)
    params = model.init(mx.random.key(0))
    alloy.save(tmp_path / "ck", model, params)
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mx, "save_safetensors", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        alloy.save(tmp_path / "ck", model, model.init(mx.random.key(1)))
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors"]

"""ModelConfig: validation names the field, JSON round trip, aliases and hashing."""
import json

import pytest

import alloy
from alloy.config import ModelConfig

BASE = {"vocab_size": 100, "d_model": 64, "layer_types": ["mamba2", "attention"],
        "mixers": {"mamba2": {"head_dim": 16, "d_state": 8}, "attention": {"n_heads": 4}}}


def test_json_round_trip_is_exact_and_hashable():
    cfg = ModelConfig.from_dict({**BASE, "layer_types": ["mamba2", "local", "mamba1", "attention"],
                                 "ffn_types": ["none", "mlp", "none", "big"],
                                 "mixers": {**BASE["mixers"], "local": {"kind": "sliding_attention", "window": 16, "n_heads": 2}},
                                 "ffns": {"big": {"kind": "mlp", "d_ff": 256}}})
    again = ModelConfig.from_json(cfg.to_json())
    assert again == cfg and hash(again) == hash(cfg)
    assert json.loads(again.to_json()) == json.loads(cfg.to_json())
    assert cfg.mixer(1)[0] == "sliding_attention" and cfg.mixer(1)[1].window == 16
    assert cfg.ffn(0) is None and cfg.ffn(3)[1].d_ff == 256


def test_defaults_fill_unlisted_kinds_and_ffns():
    cfg = ModelConfig(vocab_size=10, d_model=32, layer_types=["mamba1"])
    assert cfg.ffn_types == ("mlp",) and cfg.mixer(0)[1].d_state == 16


@pytest.mark.parametrize("patch, message", [
    ({"vocab_size": 0}, "ModelConfig.vocab_size must be a positive int"),
    ({"d_model": "64"}, "ModelConfig.d_model must be a positive int"),
    ({"layer_types": []}, "layer_types must be a non-empty list"),
    ({"layer_types": ["mamba3", "attention"], "mixers": {}}, "unknown mixer kind 'mamba3'; registered: \\["),
    ({"ffn_types": ["mlp"]}, "ffn_types has 1 entries but layer_types has 2"),
    ({"dtype": "float64"}, "ModelConfig.dtype must be one of"),
    ({"colour": "blue"}, r"unknown field\(s\) \['colour'\]"),
    ({"mixers": {"attention": {"n_heads": 5}}}, "mixers.attention \\(attention\\): n_heads 5 must divide d_model 64"),
    ({"mixers": {"attention": {"n_heads": 4, "n_kv_heads": 3}}}, "n_kv_heads 3 must divide n_heads 4"),
    ({"mixers": {"attention": {"window": 8}}}, "use kind sliding_attention"),
    ({"mixers": {"mamba2": {"head_dim": 48}}}, "head_dim 48 must divide d_inner"),
    ({"mixers": {"mamba2": {"heads": 4}}}, r"mixers.mamba2 \(mamba2\): unknown field\(s\) \['heads'\]; allowed:"),
    ({"mixers": {"unused": {}}}, r"\['unused'\] defined but not used"),
    ({"ffns": {"mlp": {"activation": "swish"}}}, "activation must be one of"),
])
def test_bad_configs_name_the_field(patch, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict({**BASE, **patch})


def test_missing_required_and_bad_json(tmp_path):
    with pytest.raises(ValueError, match=r"missing required field\(s\) \['d_model'\]"):
        ModelConfig.from_dict({"vocab_size": 3, "layer_types": ["mamba1"]})
    bad = tmp_path / "c.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        alloy.build(str(bad))


def test_build_accepts_path_dict_and_config(tmp_path):
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps(BASE))
    a, b, c = alloy.build(str(p)), alloy.build(BASE), alloy.build(ModelConfig.from_dict(BASE))
    assert a.config == b.config == c.config
    with pytest.raises(TypeError, match="expected a ModelConfig"):
        alloy.build(42)

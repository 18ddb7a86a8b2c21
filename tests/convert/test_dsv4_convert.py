"""DeepSeek-V4 config conversion without torch: the committed fixture's config, legacy spellings,
and every refusal naming its field."""
import json
from pathlib import Path

import pytest

from alloy.config import ModelConfig
from alloy.convert.hf import hf_to_alloy_config

FIX = Path(__file__).parents[1] / "parity" / "fixtures" / "deepseek_v4" / "config.json"


def _hf(**patch):
    hf = json.loads(FIX.read_text())
    hf.update(patch)
    return hf


def _cfg(hf):
    return ModelConfig.from_dict(hf_to_alloy_config(hf)[1])


def test_fixture_config_maps_every_kind():
    cfg = _cfg(_hf())
    assert cfg.layer_types == ("dsv4_sliding", "csa", "hca", "csa")
    assert cfg.ffn_types == ("hash_moe", "hash_moe", "moe", "moe") and cfg.block_style == "hyper"
    assert dict(cfg.hyper) == {"streams": 3, "sinkhorn_iters": 5, "eps": 1e-6}
    sl, csa, hca = (cfg.mixer(i)[1] for i in (0, 1, 2))
    assert (sl.rope_type, sl.rope_theta) == ("default", 10000.0)
    assert (csa.rope_type, csa.rope_theta, csa.rope_factor, csa.compress_rate) == ("yarn", 160000.0, 4.0, 4)
    assert hca.compress_rate == 8 and csa.index_topk == 3 and sl.rope_dims == 8
    moe = cfg.ffn(2)[1]
    assert moe.router_bias and moe.scoring == "sqrtsoftplus" and moe.swiglu_limit == 0.5 and moe.shared_d_ff == 16


def test_legacy_fields_fold_in_like_the_reference():
    hf = _hf()
    for k in ("layer_types", "mlp_layer_types", "compress_rates", "partial_rotary_factor"):
        hf.pop(k)
    hf.update(compress_ratios=[0, 4, 128, 4], num_hash_layers=2, qk_rope_head_dim=8, compress_rate_hca=8)
    cfg = _cfg(hf)
    assert cfg.layer_types == ("dsv4_sliding", "csa", "hca", "csa")
    assert cfg.ffn_types == ("hash_moe", "hash_moe", "moe", "moe")
    assert cfg.mixer(2)[1].compress_rate == 8 and cfg.mixer(0)[1].rope_dims == 8


@pytest.mark.parametrize("patch,match", [
    ({"num_key_value_heads": 2}, "num_key_value_heads=2"),
    ({"n_shared_experts": 2}, "n_shared_experts=2"),
    ({"norm_topk_prob": False}, "norm_topk_prob=False"),
    ({"scoring_func": "relu"}, "scoring_func='relu'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"mlp_bias": True}, "mlp_bias=True"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
    ({"layer_types": ["sliding_attention"] * 3}, "layer_types must be 4"),
    ({"mlp_layer_types": ["dense"] * 4}, "mlp_layer_types must be 4"),
    ({"compress_rates": {"linear_attention": 4}}, "compress_rates has unknown layer type"),
    ({"rope_parameters": {"main": {"rope_type": "default", "rope_theta": 1e4},
                          "compress": {"rope_type": "llama3", "rope_theta": 1.6e5}}}, "llama3"),
    ({"rope_parameters": {"main": {"rope_type": "default", "rope_theta": 1e4},
                          "compress": {"rope_type": "yarn", "rope_theta": 1.6e5, "factor": 4.0,
                                       "original_max_position_embeddings": 32, "attention_factor": 1.3}}},
     "attention_factor=1.3"),
    ({"rope_parameters": {"main": {"rope_type": "default", "rope_theta": 1e4, "low_freq": 1},
                          "compress": {"rope_type": "default", "rope_theta": 1.6e5}}}, r"rope_parameters.main field\(s\) \['low_freq'\]"),
    ({"mystery_knob": 1}, "mystery_knob"),
])
def test_unsupported_fields_are_refused_by_name(patch, match):
    with pytest.raises(ValueError, match=match):
        _cfg(_hf(**patch))

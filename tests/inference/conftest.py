"""Tiny models shared by the inference tests (fp32, spread-out logits so greedy has no near-ties).

Helpers reach test modules through fixtures (pytest runs with --import-mode=importlib, so test
modules cannot import this file)."""
import types

import alloy  # noqa: F401  (OpenBLAS before mlx.core)
import mlx.core as mx
import pytest

from alloy.layers import registered

# settings for the built-in kinds; any other registered mixer joins with its defaults
KNOWN = {
    "mamba2": {"d_state": 8, "head_dim": 8, "n_groups": 2, "chunk_size": 8},
    "mamba1": {"d_state": 4, "chunk_size": 4},
    "attention": {"n_heads": 4, "n_kv_heads": 2, "qk_norm": True, "partial_rotary_factor": 0.5},
    "sliding_attention": {"n_heads": 4, "n_kv_heads": 1, "window": 5},
    "gated_deltanet": {"n_k_heads": 2, "n_v_heads": 4, "head_k_dim": 8, "head_v_dim": 8, "chunk_size": 8},
    "parallel": {"branches": {"ssm": {"kind": "mamba2", "d_state": 8, "head_dim": 8, "chunk_size": 8},
                              "attn": {"kind": "sliding_attention", "n_heads": 4, "window": 6}}},
    "kda": {"n_heads": 2, "head_dim": 8, "chunk_size": 4},
    "mla": {"n_heads": 2, "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8, "rope": True},
    "lightning": {"n_heads": 4, "chunk_size": 4},
    "rglru": {"width": 32, "n_heads": 4},
    **{k: {"n_heads": 2, "head_dim": 8, "q_lora_rank": 8, "rope_dims": 4, "window": 4, "o_groups": 2, "o_lora_rank": 4,
           **extra} for k, extra in (("dsv4_sliding", {}), ("hca", {"compress_rate": 3}),
                                     ("csa", {"compress_rate": 2, "index_n_heads": 2, "index_head_dim": 4,
                                              "index_topk": 2}))},
}


def every_mixer_config(vocab=61, d_model=32, init_std=0.3):
    kinds = [k for k in registered("mixer") if not k.startswith("test_")]
    return {
        "vocab_size": vocab, "d_model": d_model,
        "layer_types": kinds,
        "ffn_types": ["mlp" if i % 2 else "none" for i in range(len(kinds))],
        "mixers": {k: KNOWN[k] for k in kinds if k in KNOWN},
        "ffns": {"mlp": {"d_ff": 48}},
        "tie_embeddings": False, "init_std": init_std,
    }


def perturbed(model, seed):
    """Params with random (not init-time) values everywhere, so every recurrence matters."""
    params = model.init(mx.random.key(seed))
    params = alloy.params.tree_map(
        lambda a: a + 0.05 * mx.random.normal(a.shape, key=mx.random.key(seed * 7919 + a.size))
        if mx.issubdtype(a.dtype, mx.floating) else a, params)
    mx.eval(params)
    return params


@pytest.fixture(scope="session")
def helpers():
    """every_mixer_config(vocab, d_model, init_std) and perturbed(model, seed)."""
    return types.SimpleNamespace(every_mixer_config=every_mixer_config, perturbed=perturbed)


@pytest.fixture(scope="session")
def hybrid():
    model = alloy.build(every_mixer_config())
    return model, perturbed(model, 1)

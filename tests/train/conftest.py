import alloy  # noqa: F401  (OpenBLAS before mlx)

import pytest

# A deliberately small hybrid: every test here builds it in milliseconds.
TINY_MODEL = {
    "name": "test-tiny",
    "vocab_size": 64,
    "d_model": 32,
    "layer_types": ["mamba2", "attention"],
    "ffn_types": ["mlp", "none"],
    "mixers": {"mamba2": {"d_state": 8, "head_dim": 16, "chunk_size": 8}, "attention": {"n_heads": 2}},
    "ffns": {"mlp": {"d_ff": 48}},
}


@pytest.fixture
def tiny_cfg():
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY_MODEL.items()}

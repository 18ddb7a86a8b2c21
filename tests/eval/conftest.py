import pytest

import alloy  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

TINY = {"name": "eval-tiny", "vocab_size": 257, "d_model": 32,
        "layer_types": ["mamba2", "attention"], "ffn_types": ["mlp", "none"],
        "mixers": {"mamba2": {"d_state": 16, "head_dim": 16, "chunk_size": 16}, "attention": {"n_heads": 2}},
        "ffns": {"mlp": {"d_ff": 64}}, "tie_embeddings": True}


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "tiny"
    model = alloy.build(TINY)
    alloy.save(path, model, model.init(mx.random.key(5)))
    return path


@pytest.fixture(scope="session")
def loaded(checkpoint):
    from alloy.tokenizer import load_model_and_tokenizer
    return load_model_and_tokenizer(checkpoint)

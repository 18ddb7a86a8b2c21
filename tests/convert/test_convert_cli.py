"""`alloy convert`: cast, quantize and re-export a checkpoint (fixtures only, no torch)."""
from pathlib import Path

import numpy as np
import pytest

import alloy
import mlx.core as mx
from alloy.cli import main

FIX = Path(__file__).parents[1] / "parity" / "fixtures"


def _mostly_close(got, want, mean_tol, jump, frac=0.02):
    """Close on average, with at most ``frac`` of logits off by more than ``jump``: reduced precision
    may flip an MoE router's top-k for a token, which moves that token's logits discretely."""
    err = np.abs(got - want)
    assert err.mean() < mean_tol and (err > jump).mean() < frac, (err.mean(), (err > jump).mean())


def _logits(path, ids):
    model, params = alloy.load(path)
    return np.array(model.apply(params, mx.array(ids))[0].astype(mx.float32)), model


@pytest.mark.parametrize("family", ["zamba2", "jamba", "qwen3_next"])
def test_convert_to_bf16_hf_and_quantized(tmp_path, family, capsys):
    src = FIX / family
    ref = np.load(src / "reference.npz")
    ids = ref["ids"][:, :40]
    base, _ = _logits(src, ids)
    assert main(["convert", str(src), str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    got, model = _logits(tmp_path / "bf16", ids)
    assert model.config.dtype == "bfloat16"
    _mostly_close(got, base, mean_tol=0.05, jump=0.25)  # bf16 weights and activations (~3 digits)
    assert main(["convert", str(src), str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert (tmp_path / "hf" / "config.json").read_text().count('"model_type"') == 1
    np.testing.assert_allclose(_logits(tmp_path / "hf", ids)[0], base, atol=1e-6)  # HF -> Alloy -> HF -> Alloy
    assert main(["convert", str(src), str(tmp_path / "q8"), "--quantize", "8", "--group-size", "32"]) == 0
    _mostly_close(_logits(tmp_path / "q8", ids)[0], base, mean_tol=0.03, jump=0.15)  # 8-bit affine, group 32
    assert "converted" in capsys.readouterr().out


def test_convert_errors_are_clear(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["convert", str(FIX / "llama"), str(tmp_path / "o"), "--dtype", "fp8"]) == 2
    assert "--dtype must be one of" in capsys.readouterr().err

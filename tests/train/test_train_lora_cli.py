"""`alloy train --lora BASE`: adapters train on a frozen base and are saved; the base is untouched."""
import json

import numpy as np

import alloy
import mlx.core as mx
from alloy.cli import main
from alloy.params import flatten
from alloy.params.lora import load_adapters


def _base(tmp_path):
    model = alloy.build({"vocab_size": 256, "d_model": 32, "layer_types": ["mamba2", "attention"],
                         "mixers": {"mamba2": {"head_dim": 16, "d_state": 8, "chunk_size": 8},
                                    "attention": {"n_heads": 4}}, "ffns": {"mlp": {"d_ff": 48}}})
    alloy.save(tmp_path / "base", model, model.init(mx.random.key(0)))
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n" * 4}) for i in range(40)))
    return tmp_path / "base", data


def test_lora_run_trains_adapters_and_keeps_the_base(tmp_path, capsys):
    base, data = _base(tmp_path)
    before = (base / "model.safetensors").read_bytes()
    rc = main(["train", "--config", "tiny", "--lora", str(base), "--data", str(data), "--max-steps", "12",
               "--batch-size", "2", "--seq-len", "16", "--out", str(tmp_path / "run"), "--lora-rank", "2",
               "--lr", "0.01"])
    assert rc == 0
    assert (base / "model.safetensors").read_bytes() == before
    adapters, cfg = load_adapters(tmp_path / "run" / "adapters")
    assert cfg.rank == 2
    bs = [v for k, v in flatten(adapters).items() if k.endswith("lora_B")]
    assert bs and any(float(mx.abs(b).max()) > 0 for b in bs)  # B started at zero and moved
    out = capsys.readouterr().out
    assert "trainable (rank 2" in out and "(base) ->" in out
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 12 and np.isfinite(json.loads(lines[-1])["loss"])


def test_lora_and_resume_do_not_combine(tmp_path, capsys):
    base, data = _base(tmp_path)
    assert main(["train", "--lora", str(base), "--resume", str(base), "--data", str(data)]) == 2
    assert "--lora and --resume cannot be combined" in capsys.readouterr().err

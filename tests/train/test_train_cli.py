"""Training configs (bundled and user), their errors, and `alloy train` end to end."""
import json

import pytest
import yaml

import alloy
import mlx.core as mx

from alloy.cli import main
from alloy.params import count_params
from alloy.train.loop import TrainConfig, load_train_config


@pytest.mark.parametrize("name, lo, hi", [("tiny", 5e5, 2e6), ("toy", 80e6, 120e6), ("small", 400e6, 600e6),
                                          ("medium", 1.3e9, 1.8e9), ("mqar", 1e4, 1e6)])
def test_bundled_configs_load_and_have_their_stated_size(name, lo, hi):
    mcfg, tcfg = load_train_config(name)
    n = count_params(alloy.build(mcfg).init(mx.random.key(0)))  # lazy: shapes only
    assert lo <= n <= hi, (name, n)
    assert {"mamba2", "attention"} <= set(mcfg.layer_types)


def _yaml(tmp_path, d):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


@pytest.mark.parametrize("doc, msg", [
    (lambda m: {"model": m, "train": {"batch_sise": 4}}, r"train: unknown key\(s\) \['batch_sise'\]"),
    (lambda m: {"model": m, "optim": {}}, r"unknown top-level key\(s\) \['optim'\]"),
    (lambda m: {"model": {**m, "d_modle": 3}}, r"ModelConfig: unknown field\(s\) \['d_modle'\]"),
    (lambda m: {"train": {}}, "missing the 'model' section"),
    (lambda m: {"model": m, "train": {"dtype": "int8"}}, "train.dtype must be one of"),
    (lambda m: {"model": m, "train": {"batch_size": 6, "accum_steps": 4}}, "divisible by train.accum_steps"),
    (lambda m: {"model": m, "train": {"lr": -1}}, "train.lr must be a non-negative number"),
])
def test_config_errors_name_the_key(tmp_path, tiny_cfg, doc, msg):
    with pytest.raises(ValueError, match=msg):
        load_train_config(_yaml(tmp_path, doc(tiny_cfg)))


def test_cli_reports_config_errors_and_unknown_names(tmp_path, tiny_cfg, capsys):
    assert main(["train", "--config", str(_yaml(tmp_path, {"model": tiny_cfg, "train": {"sed": 1}}))]) == 2
    assert "unknown key(s) ['sed']" in capsys.readouterr().err
    assert main(["train", "--config", "nosuchconfig"]) == 2
    assert "no bundled training config 'nosuchconfig'" in capsys.readouterr().err


def test_alloy_train_end_to_end_on_jsonl(tmp_path, tiny_cfg, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n"}) + "\n" for i in range(80)))
    cfg = _yaml(tmp_path, {"model": {**tiny_cfg, "vocab_size": 256},
                           "train": {"batch_size": 4, "seq_len": 16, "steps": 8, "warmup": 2, "eval_every": 4,
                                     "eval_batches": 2, "log_every": 2, "sample_tokens": 12, "val_fraction": 0.2}})
    out = tmp_path / "run"
    rc = main(["train", "--config", str(cfg), "--data", str(data), "--out", str(out), "--lr", "0.01",
               "--max-steps", "6", "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "validation bits per byte" in text and "sample (greedy, 12 bytes)" in text
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train_recs] == [2, 4, 6] and all(r["lr"] <= 0.01 for r in train_recs)
    assert [r["step"] for r in recs if "val_bpb" in r] == [0, 4, 6]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "latest").read_text().strip() == "ckpt-00000006"
    # resume with more steps continues from step 6 with the stored train config
    rc = main(["train", "--config", str(cfg), "--resume", str(out), "--max-steps", "8", "--no-progress"])
    assert rc == 0
    assert "resumed from" in capsys.readouterr().out
    assert (out / "latest").read_text().strip() == "ckpt-00000008"


def test_alloy_train_on_a_synthetic_task(tmp_path, tiny_cfg, capsys):
    cfg = _yaml(tmp_path, {"model": tiny_cfg, "train": {"data": "copy", "task_size": 4, "batch_size": 4,
                                                         "seq_len": 16, "steps": 4, "warmup": 1,
                                                         "eval_batches": 1, "log_every": 2}})
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    assert "validation answer accuracy" in capsys.readouterr().out


def test_train_config_defaults_round_trip():
    t = TrainConfig()
    assert TrainConfig.from_dict(t.to_dict()) == t

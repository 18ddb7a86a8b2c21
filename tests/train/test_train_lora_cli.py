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


def _run(tmp_path, base, data, out, steps, *extra):
    return main(["train", "--config", "tiny", "--lora", str(base), "--data", str(data), "--max-steps", str(steps),
                 "--batch-size", "2", "--seq-len", "16", "--out", str(out), "--lora-rank", "2", "--lr", "0.01",
                 *extra])


def test_lora_resume_continues_exactly(tmp_path, capsys):
    """12 steps straight == 6 steps, stop, resume, 6 more (same schedule): identical adapters; the CLI
    resumes a LoRA run directory (base and LoRA config from the run)."""
    import dataclasses

    from alloy.params.lora import LoraConfig
    from alloy.train.loop import load_train_config
    from alloy.train.lora_loop import finetune_lora
    base, data = _base(tmp_path)
    _, tcfg = load_train_config("tiny")
    tcfg = dataclasses.replace(tcfg, data=str(data), steps=12, warmup=2, batch_size=2, seq_len=16, lr=0.01,
                               eval_every=0, seed=3)
    lcfg = LoraConfig(rank=2, alpha=4.0)
    quiet = lambda *a: None  # noqa: E731
    finetune_lora(base, lcfg, tcfg, tmp_path / "straight", log=quiet)
    finetune_lora(base, lcfg, tcfg, tmp_path / "split", stop_after=6, log=quiet)
    assert (tmp_path / "split" / "ckpt-00000006" / "adapters").is_dir()
    r = finetune_lora(None, None, tcfg, tmp_path / "split", resume=tmp_path / "split", log=quiet)
    assert r["start_step"] == 6 and r["steps"] == 12
    a, _ = load_adapters(tmp_path / "straight" / "adapters")
    b, cfg = load_adapters(tmp_path / "split" / "adapters")
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys() and cfg == lcfg
    for k in fa:
        assert mx.array_equal(fa[k], fb[k]), k
    steps = [json.loads(x)["step"] for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 12 and steps.count(12) == 1
    # the CLI: --resume of a LoRA run continues it (here: to 14 steps)
    assert main(["train", "--resume", str(tmp_path / "split"), "--max-steps", "14"]) == 0
    assert "resumed LoRA run" in capsys.readouterr().out
    assert (tmp_path / "split" / "ckpt-00000014" / "adapters").is_dir()


def test_lora_resume_refuses_a_full_training_run_and_a_foreign_base(tmp_path, capsys):
    base, data = _base(tmp_path)
    assert main(["train", "--config", "tiny", "--data", str(data), "--max-steps", "12", "--batch-size", "2",
                 "--seq-len", "16", "--out", str(tmp_path / "full"), "--no-progress"]) == 0
    assert main(["train", "--lora", str(base), "--resume", str(tmp_path / "full"), "--data", str(data)]) == 2
    assert "needs a LoRA run to resume" in capsys.readouterr().err
    assert _run(tmp_path, base, data, tmp_path / "lora", 12) == 0
    other = tmp_path / "other"
    other.mkdir()
    assert main(["train", "--lora", str(other), "--resume", str(tmp_path / "lora")]) == 2
    assert "differs from the run's base" in capsys.readouterr().err

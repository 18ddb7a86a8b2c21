"""The research driver: a real (seconds-long) experiment, and the results files / resume logic."""
import json
import math

import pytest

import alloy  # noqa: F401
import mlx.core as mx

from alloy.research import load_results, parse_space, run_experiment, run_research
from alloy.research import runner

TINY = {
    "seed": 0,
    "max_experiments": 2,
    "train": {"batch_size": 4, "seq_len": 32, "lr": 1e-2, "warmup": 0, "corpus_bytes": 300_000,
              "val_fraction": 0.1, "eval_batches": 2},
    "model": {"vocab_size": 256, "ffn": "none", "mixers": {"mamba2": {"head_dim": 8, "chunk_size": 16}}},
    "patterns": {"attention": ["attention"], "mamba2": ["mamba2"], "hybrid": ["mamba2", "attention"]},
    "space": {"pattern": ["hybrid", "mamba2", "attention"], "depth": [1, 2], "d_model": [16, 32],
              "d_state": [8], "n_heads": [2], "n_kv_heads": [1]},
    "start": [{"pattern": "hybrid", "depth": 2, "d_model": 16}],
}


def _val_bpb(space, params, model):
    """Independent check of the recorded metric: mean CE in bits over the same held-out batches."""
    from alloy.ops.loss import cross_entropy
    t = space.train
    corpus = runner._corpus(t.corpus_bytes, t.val_fraction)
    total = n = 0.0
    for b in corpus.val_batches(t.batch_size, t.seq_len, t.eval_batches):
        tok = mx.array(b["tokens"])
        logits, _ = model.apply(params, tok[:, :-1])
        total += cross_entropy(logits, tok[:, 1:], reduction="sum").item()
        n += tok[:, 1:].size
    return total / n / math.log(2)


def test_a_short_real_experiment_learns_and_reports_bits_per_byte():
    s = parse_space(TINY)
    point = s.start[0]
    rec, params = run_experiment(s, point, budget_s=1.0, log=lambda *_: None, return_params=True)
    model = alloy.build(s.to_config(point))
    untrained = _val_bpb(s, model.init(mx.random.key(s.seed)), model)
    assert untrained == pytest.approx(8.0, abs=0.1)  # near-uniform over 256 bytes at init
    assert rec["val_bpb"] == pytest.approx(_val_bpb(s, params, model), rel=1e-5)
    assert rec["steps"] >= 2 and rec["tokens"] == rec["steps"] * 4 * 32
    assert rec["val_bytes"] == 2 * 4 * 32
    assert rec["val_bpb"] < untrained - 0.2  # it trained
    assert rec["train_s"] >= 1.0 and rec["layer_types"] == ["mamba2", "attention"]


def _fake_experiment(calls):
    """run_experiment stand-in: a deterministic score from the point (bigger and hybrid is better)."""
    def fake(space, point, budget_s, log=print):
        point = space.complete(point)
        calls.append(point)
        bonus = {"hybrid": 0.5, "mamba2": 0.25, "attention": 0.0}[point["pattern"]]
        bpb = 6.0 - bonus - point["depth"] * 0.1 - point["d_model"] / 100
        return {"id": runner.experiment_id(space, point, budget_s), "point": point, "layer_types": [],
                "params": 1000 * point["d_model"] * point["depth"], "steps": 10, "tokens": 1280,
                "train_bpb": bpb + 0.1, "val_bpb": bpb, "val_bytes": 256, "budget_s": budget_s,
                "train_s": budget_s, "compile_s": 0.1, "eval_s": 0.1, "finished": "now"}
    return fake


def test_results_files_and_resume(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(runner, "run_experiment", _fake_experiment(calls))
    s = parse_space(TINY)
    out = tmp_path / "run"
    res = run_research(s, out, budget_s=5, log=lambda *_: None)  # max_experiments 2 from the space
    assert len(calls) == 2 and len(res) == 2
    assert s.complete(calls[0]) == s.start[0]
    lines = (out / "results.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == [r["id"] for r in res]
    md = (out / "results.md").read_text()
    best = min(res, key=lambda r: r["val_bpb"])
    assert md.splitlines()[2].startswith(f"| 1 | `{best['id']}`")  # best first
    assert "Best per pattern:" in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # resume: the two recorded experiments are not run again
    res2 = run_research(s, out, budget_s=5, max_experiments=4, log=lambda *_: None)
    assert len(calls) == 4 and [r["id"] for r in res2[:2]] == [r["id"] for r in res]
    assert len({r["id"] for r in res2}) == 4
    assert load_results(out) == res2
    run_research(s, out, budget_s=5, max_experiments=4, log=lambda *_: None)
    assert len(calls) == 4  # nothing left to do

    # a different budget would mix incomparable results: refused
    with pytest.raises(ValueError, match="another search space, training setting or budget"):
        run_research(s, out, budget_s=6, max_experiments=5, log=lambda *_: None)


def test_search_stops_when_the_space_is_exhausted(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(runner, "run_experiment", _fake_experiment(calls))
    s = parse_space({**TINY, "space": {"pattern": ["mamba2", "attention"], "depth": [1], "d_model": [16]},
                     "start": []})
    res = run_research(s, tmp_path, budget_s=1, max_experiments=10, log=lambda *_: None)
    assert sorted(r["point"]["pattern"] for r in res) == ["attention", "mamba2"]


def test_a_corrupt_results_file_is_named(tmp_path):
    (tmp_path / "results.jsonl").write_text('{"id": "a", "point": {}, "val_bpb": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"results.jsonl:2: not valid JSON"):
        load_results(tmp_path)


def test_cli_runs_and_resumes(tmp_path, monkeypatch, capsys):
    import argparse
    import yaml
    from alloy.research import cli
    calls = []
    monkeypatch.setattr(runner, "run_experiment", _fake_experiment(calls))
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(TINY))
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    cli.register(sub)
    argv = ["research", "--budget-minutes", "0.05", "--space", str(path), "--out", str(tmp_path / "o"),
            "--max-experiments", "3"]
    a = p.parse_args(argv)
    a.fn(a)
    assert len(calls) == 3 and calls[0]["pattern"] == "hybrid"
    assert all(r["budget_s"] == pytest.approx(3.0) for r in load_results(tmp_path / "o"))
    a = p.parse_args(argv)
    a.fn(a)
    assert len(calls) == 3
    assert "resuming: 3 experiment(s)" in capsys.readouterr().out
    # a replicate with another seed is a different set of experiments (init and data order change)
    a = p.parse_args(argv[:-4] + ["--out", str(tmp_path / "s1"), "--max-experiments", "1", "--seed", "1"])
    a.fn(a)
    assert len(calls) == 4 and calls[3] == calls[0]
    assert load_results(tmp_path / "s1")[0]["id"] != load_results(tmp_path / "o")[0]["id"]

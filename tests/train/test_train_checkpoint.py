"""Training checkpoints: exact resume, atomic writes, round trips."""
import json
import os

import numpy as np
import pytest

import alloy
import mlx.core as mx

from alloy.params import flatten
from alloy.train import optim
from alloy.train.checkpoint import LATEST_FILE, load_checkpoint, resolve_checkpoint, save_checkpoint
from alloy.train.loop import TrainConfig, train


def _corpus(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "docs.jsonl"
    with open(p, "w") as f:
        for i in range(60):
            f.write(json.dumps({"tokens": rng.integers(1, 64, rng.integers(5, 40)).tolist()}) + "\n")
    return p


def _tcfg(data, **kw):
    base = dict(data=str(data), batch_size=4, seq_len=16, steps=6, warmup=2, lr=1e-2, eval_every=0,
                eval_batches=1, log_every=1, sample_tokens=0, val_fraction=0.1)
    base.update(kw)
    return TrainConfig(**base)


def test_resume_is_bit_exact(tmp_path, tiny_cfg):
    data = _corpus(tmp_path)
    mcfg = alloy.ModelConfig.from_dict(tiny_cfg)
    tcfg = _tcfg(data)
    train(mcfg, tcfg, tmp_path / "a", progress=False, log=lambda *a: None, plot=False)
    half = train(mcfg, tcfg, tmp_path / "b", stop_after=3, progress=False, log=lambda *a: None, plot=False)
    assert half["steps"] == 3
    resumed = train(mcfg, tcfg, tmp_path / "c", resume=tmp_path / "b", progress=False, log=lambda *a: None,
                    plot=False)
    assert resumed["start_step"] == 3 and resumed["steps"] == 6
    a, c = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "c")
    for k, v in flatten(a["params"]).items():
        assert mx.array_equal(v, flatten(c["params"])[k]), k
    for k, v in flatten(a["opt_state"]).items():
        assert mx.array_equal(v, flatten(c["opt_state"])[k]), k
    assert a["data_position"] == c["data_position"] and mx.array_equal(a["key"], c["key"])
    # the run without the restart differs from one that skipped the restored state
    fresh = train(mcfg, _tcfg(data, seed=1), tmp_path / "d", stop_after=3, progress=False,
                  log=lambda *a: None, plot=False)
    assert not all(mx.array_equal(v, flatten(fresh["params_tree"])[k]) for k, v in flatten(half["params_tree"]).items())


def _state(cfg, seed=0):
    model = alloy.build(cfg)
    params = model.init(mx.random.key(seed))
    opt = optim.adamw()
    return dict(model=model, params=params, opt_state=opt.init(params), step=7, key=mx.random.key(3),
                data_position={"epoch": 1, "index": 5}, train_config={"lr": 0.1})


def test_checkpoint_round_trip_and_resolve(tmp_path, tiny_cfg):
    st = _state(tiny_cfg)
    save_checkpoint(tmp_path / "run" / "ckpt-00000007", **st)
    (tmp_path / "run" / LATEST_FILE).write_text("ckpt-00000007\n")
    got = load_checkpoint(tmp_path / "run")
    assert got["step"] == 7 and got["data_position"] == {"epoch": 1, "index": 5}
    assert got["train_config"] == {"lr": 0.1} and mx.array_equal(got["key"], st["key"])
    assert list(flatten(got["params"])) == list(flatten(st["params"]))
    assert all(mx.array_equal(v, flatten(got["params"])[k]) for k, v in flatten(st["params"]).items())
    assert alloy.load(got["path"])[0].config == st["model"].config  # a plain alloy checkpoint too
    with pytest.raises(FileNotFoundError, match="neither a training checkpoint"):
        resolve_checkpoint(tmp_path)


def test_failed_save_leaves_the_old_checkpoint_and_no_temp(tmp_path, tiny_cfg):
    path = tmp_path / "ckpt"
    save_checkpoint(path, **_state(tiny_cfg, 0))
    before = sorted(os.listdir(path))
    bad = _state(tiny_cfg, 1)
    bad["opt_state"] = {"x": object()}  # not serialisable: the optimizer file write fails
    with pytest.raises(TypeError):
        save_checkpoint(path, **bad)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert sorted(os.listdir(path)) == before
    got = load_checkpoint(path)
    assert all(mx.array_equal(v, flatten(got["params"])[k]) for k, v in flatten(_state(tiny_cfg, 0)["params"]).items())

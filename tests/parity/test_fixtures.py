"""Committed Hugging Face fixtures (made by make_fixtures.py with transformers) load into Alloy with
the same logits and the same cached greedy tokens — no torch needed."""
from pathlib import Path

import numpy as np
import pytest

import alloy
import mlx.core as mx

FIXTURES = sorted(p for p in (Path(__file__).parent / "fixtures").iterdir() if p.is_dir())


def test_every_registered_family_has_a_fixture():
    from alloy.convert.registry import converters
    import json
    covered = {json.loads((p / "config.json").read_text())["model_type"] for p in FIXTURES}
    wrappers = {"qwen3_5", "qwen3_5_moe"}  # multimodal wrappers: exercised by the live test
    families = {t for c in converters() for t in c.model_types} - wrappers
    assert families <= covered, f"families without a fixture: {sorted(families - covered)}"


@pytest.fixture(scope="module", params=FIXTURES, ids=[p.name for p in FIXTURES])
def loaded(request):
    model, params = alloy.load(request.param)
    return model, params, np.load(request.param / "reference.npz")


def test_logits_match_transformers(loaded):
    model, params, ref = loaded
    got, _ = model.apply(params, mx.array(ref["ids"]))
    np.testing.assert_allclose(np.array(got), ref["logits"], atol=1e-3, rtol=0)  # the bound, fp32


def test_cached_greedy_matches_transformers(loaded):
    model, params, ref = loaded
    prompt, want = ref["ids"][:1], ref["greedy"].tolist()
    state = model.init_state(1, prompt.shape[1] + len(want))
    logits, state = model.apply(params, mx.array(prompt), state)
    got = []
    for _ in range(len(want)):
        tok = int(mx.argmax(logits[0, -1]))
        got.append(tok)
        logits, state = model.apply(params, mx.array([[tok]]), state)
    assert got == want


def test_corrupted_safetensors_fails_cleanly(tmp_path):
    import shutil
    src = next(p for p in FIXTURES if p.name == "llama")
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    data = (dst / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises((ValueError, OSError)) as e:
        alloy.load(dst)
    assert "model.safetensors" in str(e.value)


def test_sharded_checkpoint_with_index_loads_identically(tmp_path):
    import json
    import shutil
    from safetensors.numpy import load_file, save_file
    src = next(p for p in FIXTURES if p.name == "jamba")
    for f in ("config.json", "reference.npz"):
        shutil.copy(src / f, tmp_path / f)
    tensors = load_file(str(src / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / fname))
        weight_map.update({k: fname for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model, params = alloy.load(tmp_path)
    ref = np.load(tmp_path / "reference.npz")
    got, _ = model.apply(params, mx.array(ref["ids"]))
    np.testing.assert_allclose(np.array(got), ref["logits"], atol=1e-3, rtol=0)

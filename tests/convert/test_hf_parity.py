"""Hugging Face checkpoints load into Alloy with the same logits, decode the same greedy ids, and
export back to a layout transformers reloads with equal logits.

Fixtures are tiny random models that transformers builds and saves locally (no downloads).
"""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
T = pytest.importorskip("transformers")

import alloy  # noqa: E402
import mlx.core as mx  # noqa: E402

from alloy.convert import load_hf  # noqa: E402
from alloy.params import CheckpointError  # noqa: E402
from alloy.convert.testing import GDN, V, configs, perturb  # noqa: E402

CONFIGS = configs(T)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def fixture(request, tmp_path_factory):
    name = request.param
    torch.manual_seed(0)
    hf = perturb(T.AutoModelForCausalLM.from_config(CONFIGS[name]).eval(), torch)
    path = tmp_path_factory.mktemp(name)
    hf.save_pretrained(path)
    return name, hf, path


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor(ids), use_cache=False).logits.float().numpy()


def test_logits_match_transformers(fixture):
    name, hf, path = fixture
    ids = np.random.default_rng(1).integers(0, V, (2, 13))
    model, params = alloy.load(path)
    ours, _ = model.apply(params, mx.array(ids))
    np.testing.assert_allclose(np.array(ours), _hf_logits(hf, ids), atol=1e-4, rtol=1e-4)


def test_cached_greedy_ids_match_transformers_generate(fixture):
    name, hf, path = fixture
    prompt = np.random.default_rng(2).integers(0, V, (1, 6))
    n = 8
    seq = prompt.copy()  # the reference: greedy by full uncached forwards in transformers
    for _ in range(n):
        seq = np.concatenate([seq, _hf_logits(hf, seq)[:, -1].argmax(-1)[:, None]], axis=1)
    want = seq[0, 6:].tolist()
    model, params = load_hf(path)
    state = model.init_state(1, 6 + n)
    logits, state = model.apply(params, mx.array(prompt), state)
    got = []
    for _ in range(n):
        tok = int(mx.argmax(logits[0, -1]))
        got.append(tok)
        logits, state = model.apply(params, mx.array([[tok]]), state)
    assert got == want


def test_export_round_trip_reloads_in_transformers(fixture, tmp_path):
    name, hf, path = fixture
    model, params = alloy.load(path)
    alloy.save(tmp_path / "out", model, params, format="hf")
    again = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = np.random.default_rng(3).integers(0, V, (1, 9))
    np.testing.assert_allclose(_hf_logits(again, ids), _hf_logits(hf, ids), atol=1e-5, rtol=1e-5)
    model2, params2 = alloy.load(tmp_path / "out")
    assert model2.config == model.config


def test_unknown_config_field_is_refused(fixture, tmp_path):
    name, hf, path = fixture
    cfg = json.loads((path / "config.json").read_text())
    cfg["mystery_knob"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"\['mystery_knob'\] are not understood"):
        alloy.load(tmp_path)


def test_missing_and_extra_tensors_reported_together(tmp_path):
    hf = T.AutoModelForCausalLM.from_config(CONFIGS["llama"])
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.0.self_attn.q_proj.weight"] = sd["model.layers.0.self_attn.q_proj.weight"][:8]
    sd["model.layers.0.self_attn.mystery.weight"] = np.zeros(3, np.float32)
    from safetensors.numpy import save_file
    save_file(sd, str(tmp_path / "model.safetensors"))
    CONFIGS["llama"].save_pretrained(tmp_path)
    with pytest.raises(CheckpointError) as e:
        alloy.load(tmp_path)
    msg = str(e.value)
    for k in ("layers.1.ffn.up_proj.weight", "layers.0.mixer.q_proj.weight", "layers.0.mixer.mystery.weight"):
        assert k in msg


def test_unsupported_values_and_types_are_named(tmp_path):
    cfg = CONFIGS["llama"].to_dict()
    cfg["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope_type 'dynamic' is not supported"):
        alloy.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="no converter for Hugging Face model_type 'gpt2'"):
        alloy.load(tmp_path)


def test_hub_id_without_network_says_so(monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="could not download"):
        alloy.load("nobody-here/definitely-not-a-model")


def test_multimodal_wrapper_loads_text_only(tmp_path):
    tc = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, **GDN, layer_types=["linear_attention", "full_attention"])
    cfg = T.Qwen3_5Config(text_config=tc, vision_config=dict(depth=1, hidden_size=16, intermediate_size=16,
                                                             num_heads=2, out_hidden_size=32))
    torch.manual_seed(0)
    mm = T.Qwen3_5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in mm.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    mm.save_pretrained(tmp_path)
    ids = np.random.default_rng(4).integers(0, V, (1, 9))
    with torch.no_grad():
        want = mm(input_ids=torch.tensor(ids), use_cache=False).logits.float().numpy()
    model, params = alloy.load(tmp_path)
    got, _ = model.apply(params, mx.array(ids))
    np.testing.assert_allclose(np.array(got), want, atol=1e-4, rtol=1e-4)

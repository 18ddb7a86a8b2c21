"""Speculative decoding for hybrids: greedy output == the target's own greedy output, for drafts
that agree often (the target itself), sometimes (a perturbed copy) or rarely (an unrelated model)."""
import alloy
import mlx.core as mx
import numpy as np
import pytest

from alloy.inference import speculative_generate
from alloy.inference.speculative import SpeculativeStats


def _greedy(model, params, prompt, n):
    return [e.token for e in alloy.generate(model, params, prompt, max_tokens=n)]


def test_speculative_greedy_equals_target_greedy(hybrid, helpers):
    model, params = hybrid
    small = alloy.build({"vocab_size": 61, "d_model": 16, "layer_types": ["mamba2", "attention"],
                         "mixers": {"mamba2": {"d_state": 4, "head_dim": 8}, "attention": {"n_heads": 2}},
                         "ffn_types": ["none", "mlp"], "init_std": 0.3, "tie_embeddings": False})
    close = alloy.params.tree_map(lambda a: a + 0.01 * mx.random.normal(a.shape, key=mx.random.key(a.ndim)),
                                  params)
    prompt = np.random.default_rng(5).integers(0, 61, 7).tolist()
    want = _greedy(model, params, prompt, 14)
    rates = {}
    for name, (draft, dparams) in {"self": (model, params), "close": (model, close),
                                   "small": (small, helpers.perturbed(small, 9))}.items():
        stats = SpeculativeStats()
        ev = list(speculative_generate(model, params, draft, dparams, prompt, max_tokens=14, k=3,
                                       stats=stats))
        assert [e.token for e in ev] == want, name
        assert [e.index for e in ev] == list(range(14)) and ev[-1].finish_reason == "length"
        rates[name] = stats.acceptance_rate
        if name != "self":
            assert stats.replays > 0  # the rollback path ran
    assert rates["self"] == 1.0 and 0 < rates["close"] < 1  # partial acceptance: rollback mid-draft
    assert rates["small"] < rates["self"]


def test_speculative_stops_and_validates(hybrid):
    model, params = hybrid
    prompt = [3, 1, 4, 1, 5]
    want = _greedy(model, params, prompt, 8)
    ev = list(speculative_generate(model, params, model, params, prompt, max_tokens=8, k=2,
                                   stop_tokens=[want[4]]))
    assert [e.token for e in ev] == want[:want.index(want[4]) + 1] and ev[-1].finish_reason == "stop"
    other = alloy.build({"vocab_size": 7, "d_model": 8, "layer_types": ["mamba2"],
                         "mixers": {"mamba2": {"head_dim": 8, "d_state": 4}}})
    with pytest.raises(ValueError, match="vocab_size"):
        list(speculative_generate(model, params, other, other.init(mx.random.key(0)), prompt))
    with pytest.raises(ValueError, match="k must"):
        list(speculative_generate(model, params, model, params, prompt, k=0))

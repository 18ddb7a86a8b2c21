"""Search spaces: validation, point -> config, experiment ids, and the proposal strategy."""
import copy

import pytest
from hypothesis import given, strategies as st

import alloy  # noqa: F401
from alloy.research import experiment_id, load_space, parse_space, propose
from alloy.research.space import neighbours

SPACE = {
    "seed": 3,
    "train": {"batch_size": 2, "seq_len": 16, "corpus_bytes": 100_000},
    "model": {"vocab_size": 256, "ffn": "mlp", "mixers": {"mamba2": {"head_dim": 8, "chunk_size": 8}}},
    "patterns": {"attention": ["attention"], "mamba2": ["mamba2"],
                 "hybrid": ["mamba2", "mamba2", "mamba2", "attention"]},
    "space": {"pattern": ["hybrid", "mamba2", "attention"], "depth": [2, 4, 6], "d_model": [16, 32, 48],
              "d_state": [8, 16], "n_heads": [2, 4, 8], "n_kv_heads": [1, 2]},
    "start": [{"pattern": "hybrid", "depth": 4, "d_model": 32}, {"pattern": "attention", "depth": 4, "d_model": 32}],
}


def space(**edits):
    d = copy.deepcopy(SPACE)
    d.update(edits)
    return parse_space(d)


def test_point_to_config_tiles_the_pattern_and_routes_dimensions_by_settings_fields():
    s = space()
    cfg = s.to_config({"pattern": "hybrid", "depth": 6, "d_model": 48, "d_state": 16, "n_heads": 4, "n_kv_heads": 2})
    assert cfg.layer_types == ("mamba2", "mamba2", "mamba2", "attention", "mamba2", "mamba2")
    assert cfg.ffn_types == ("mlp",) * 6 and cfg.d_model == 48
    m_kind, m = cfg.mixer(0)
    a_kind, a = cfg.mixer(3)
    assert (m_kind, m.d_state, m.head_dim, m.chunk_size) == ("mamba2", 16, 8, 8)
    assert (a_kind, a.n_heads, a.n_kv_heads) == ("attention", 4, 2)
    # missing dimensions take their first value
    assert s.complete({"pattern": "mamba2"}) == {"pattern": "mamba2", "depth": 2, "d_model": 16, "d_state": 8,
                                                 "n_heads": 2, "n_kv_heads": 1}


def test_experiment_ids_follow_the_model_config_the_training_and_the_budget():
    s = space()
    a = {"pattern": "attention", "depth": 2, "d_model": 32, "d_state": 8}
    assert experiment_id(s, a, 10) == experiment_id(s, {**a, "d_state": 16}, 10)  # attention ignores d_state
    assert experiment_id(s, a, 10) != experiment_id(s, {**a, "n_heads": 4}, 10)
    assert experiment_id(s, a, 10) != experiment_id(s, a, 20)
    other = space(train={**SPACE["train"], "lr": 1e-3})
    assert experiment_id(s, a, 10) != experiment_id(other, a, 10)
    assert experiment_id(s, a, 10).startswith("attention-L2-d32-")


@pytest.mark.parametrize("edit,match", [
    ({"bogus": 1}, r"unknown key\(s\) \['bogus'\]"),
    ({"space": {"pattern": ["hybrid"], "width": [1]}}, r"unknown dimension\(s\) \['width'\]"),
    ({"space": {"pattern": ["hybrid"], "depth": [2, "4"]}}, "space.depth values must be positive ints"),
    ({"space": {"pattern": ["hybrid", "rwkv"]}}, r"\['rwkv'\] not defined under patterns"),
    ({"patterns": {"hybrid": ["mamba3"]}}, "unknown mixer kind 'mamba3'"),
    ({"start": [{"pattern": "hybrid", "depth": 3}]}, r"start\[0\].*depth = 3 is not in the space"),
    ({"space": {"pattern": ["attention"], "d_model": [16, 20], "n_heads": [4, 8]},
      "start": [{"pattern": "attention", "d_model": 16, "n_heads": 8},
                {"pattern": "attention", "d_model": 20, "n_heads": 8}]}, r"start\[1\].*n_heads 8 must divide d_model 20"),
    ({"train": {"lr": 0}}, "train.lr must be positive"),
    ({"train": {"steps": 5}}, r"train: unknown key\(s\) \['steps'\]"),
    ({"model": {"d_model": 5}}, r"model: unknown key\(s\) \['d_model'\]"),
])
def test_bad_spaces_are_refused_naming_the_key(edit, match):
    with pytest.raises(ValueError, match=match):
        space(**edit)


def test_the_bundled_space_loads_and_starts_with_the_three_way_comparison():
    s = load_space("space")
    assert [p["pattern"] for p in s.start] == ["hybrid", "mamba2", "attention"]
    sizes = {(p["depth"], p["d_model"]) for p in s.start}
    assert len(sizes) == 1  # equal depth and width: only the mixers differ
    with pytest.raises(FileNotFoundError):
        load_space("/nonexistent/space.yaml")


def test_neighbours_of_ordered_and_categorical_dimensions():
    assert neighbours((2, 4, 6), 2) == [4] and neighbours((2, 4, 6), 4) == [2, 6]
    assert neighbours(("a", "b", "c"), "b") == ["a", "c"]


def _record(s, point, bpb, budget=10):
    return {"id": experiment_id(s, point, budget), "point": s.complete(point), "val_bpb": bpb}


def test_propose_runs_the_start_points_first_in_order():
    s = space()
    first = propose(s, [], 10)
    assert s.complete(first) == s.start[0]
    assert s.complete(propose(s, [_record(s, first, 3.0)], 10)) == s.start[1]


@given(bpbs=st.lists(st.floats(1.0, 8.0), min_size=0, max_size=6), seed=st.integers(0, 5))
def test_propose_mutates_the_best_into_an_unseen_valid_neighbour(bpbs, seed):
    s = space(seed=seed)
    results = [_record(s, p, 5.0 + i) for i, p in enumerate(s.start)]
    p = s.start[0]
    for b in bpbs:  # walk: each proposal gets a score and joins the results
        p = propose(s, results, 10)
        results.append(_record(s, p, b))
    best = min(results, key=lambda r: r["val_bpb"])["point"]
    nxt = s.complete(propose(s, results, 10))
    assert s.is_valid(nxt)
    assert experiment_id(s, nxt, 10) not in {r["id"] for r in results}
    changed = [d for d in nxt if nxt[d] != best[d]]
    assert 1 <= len(changed) <= 2
    for d in changed:
        assert nxt[d] in neighbours(s.space[d], best[d])
    assert propose(s, results, 10) == propose(s, list(results), 10)  # deterministic


def test_propose_returns_none_when_the_space_is_exhausted():
    s = space(space={"pattern": ["attention"], "depth": [2], "d_model": [32], "d_state": [8, 16]}, start=[])
    first = propose(s, [], 10)
    assert first is not None
    assert propose(s, [_record(s, first, 4.0)], 10) is None  # the other d_state is the same model

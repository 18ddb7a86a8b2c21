import zlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import alloy  # noqa: F401
import mlx.core as mx

from alloy.params import (
    KEEP_FP32,
    cast,
    combine,
    count_params,
    filter_tree,
    flatten,
    leaves,
    merge,
    partition,
    path_matches,
    paths,
    tree_bytes,
    tree_map,
    tree_map_with_path,
    unflatten,
)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def same(a, b, path="<root>"):
    """Exact structural equality: container types, dict key order, leaf identity."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} vs {list(b)}"
        for k in a:
            same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: lengths {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}.{i}")
    else:
        assert a is b, f"{path}: different leaf objects"


def model_tree():
    arr = lambda *s: mx.zeros(s)  # noqa: E731
    return {
        "embed": {"weight": arr(8, 4)},
        "layers": [
            {"mixer": {"in_proj": {"weight": arr(4, 4)}, "A_log": arr(2)}, "norm": {"weight": arr(4)}},
            {"mixer": {"q_proj": {"weight": arr(4, 4)}}, "norm": {"weight": arr(4)}},
            {"mixer": {"in_proj": {"weight": arr(4, 4)}, "A_log": arr(2)}, "norm": {"weight": arr(4)}},
        ],
        "final_norm": {"weight": arr(4)},
    }


# Random trees: dict keys unordered w.r.t. sorting, digit-like keys, empty containers, tuples,
# and non-array leaves.
_key = st.text(alphabet="abcz_019", min_size=1, max_size=3)
_leaf = st.one_of(
    st.integers(0, 3).map(lambda n: mx.zeros((n,))),
    st.integers(-5, 5),
    st.floats(allow_nan=False),
    st.none(),
    st.text(max_size=3),
)
_tree = st.recursive(
    _leaf,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.lists(kids, max_size=3).map(tuple),
        st.dictionaries(_key, kids, max_size=4),
    ),
    max_leaves=20,
)
# Trees that unflatten(flatten(.)) reproduces: no empty containers, no tuples, no index-like keys.
_plain_key = st.text(alphabet="abcz_x", min_size=1, max_size=3)
_plain_tree = st.recursive(
    _leaf,
    lambda kids: st.one_of(
        st.lists(kids, min_size=1, max_size=4),
        st.dictionaries(_plain_key, kids, min_size=1, max_size=4),
    ),
    max_leaves=20,
)


def _pred(salt):
    return lambda path, leaf: zlib.crc32(f"{salt}/{path}".encode()) % 3 == 0


# ---------------------------------------------------------------------------------------------
# flatten / unflatten
# ---------------------------------------------------------------------------------------------


def test_flatten_dotted_keys_in_traversal_order():
    t = model_tree()
    assert list(flatten(t)) == [
        "embed.weight",
        "layers.0.mixer.in_proj.weight",
        "layers.0.mixer.A_log",
        "layers.0.norm.weight",
        "layers.1.mixer.q_proj.weight",
        "layers.1.norm.weight",
        "layers.2.mixer.in_proj.weight",
        "layers.2.mixer.A_log",
        "layers.2.norm.weight",
        "final_norm.weight",
    ]
    assert flatten(t)["layers.1.norm.weight"] is t["layers"][1]["norm"]["weight"]
    assert list(flatten({"w": 1}, prefix="model")) == ["model.w"]
    assert paths(t) == list(flatten(t))
    lv = leaves(t)
    assert len(lv) == 10 and all(a is b for a, b in zip(lv, flatten(t).values()))


def test_unflatten_inverts_flatten_with_nested_lists_and_order():
    t = {"z": [[1, 2], [{"b": 3, "a": [4]}]], "a": {"y": 5, "x": None}}
    back = unflatten(flatten(t))
    assert back == t
    assert list(back) == ["z", "a"] and list(back["a"]) == ["y", "x"]
    assert list(back["z"][1][0]) == ["b", "a"]
    assert isinstance(back["z"], list) and isinstance(back["z"][0], list)


def test_unflatten_orders_list_items_by_index_not_by_key_order():
    # Checkpoint files list keys lexicographically: layers.10 before layers.2.
    flat = {f"layers.{i}.w": i for i in sorted(range(12), key=str)}
    t = unflatten(flat)
    assert t == {"layers": [{"w": i} for i in range(12)]}


def test_unflatten_keeps_non_index_digit_levels_as_dicts():
    assert unflatten({"a.0": 1, "a.2": 2}) == {"a": {"0": 1, "2": 2}}
    assert unflatten({"a.1": 1, "a.2": 2}) == {"a": {"1": 1, "2": 2}}
    assert unflatten({"a.0": 1, "a.1": 2}) == {"a": [1, 2]}


@pytest.mark.parametrize(
    "flat",
    [{"a": 1, "a.b": 2}, {"a.b": 2, "a": 1}, {"a..b": 1}, {".a": 1}],
)
def test_unflatten_rejects_ambiguous_paths(flat):
    with pytest.raises(ValueError):
        unflatten(flat)


@pytest.mark.parametrize("bad", [{"a.b": 1}, {"": 1}])
def test_flatten_rejects_keys_that_cannot_round_trip(bad):
    with pytest.raises(ValueError):
        flatten({"x": bad})
    with pytest.raises(TypeError):
        flatten({1: 2})


@given(_plain_tree)
def test_flatten_unflatten_round_trip(t):
    if not isinstance(t, (dict, list)):
        return
    back = unflatten(flatten(t))
    same(back, t)


# ---------------------------------------------------------------------------------------------
# tree_map
# ---------------------------------------------------------------------------------------------


def test_tree_map_preserves_structure_order_and_types():
    t = {"b": (1, [2, 3]), "a": {"y": 4, "x": None}}
    out = tree_map(lambda x: None if x is None else x * 10, t)
    assert out == {"b": (10, [20, 30]), "a": {"y": 40, "x": None}}
    assert list(out) == ["b", "a"] and list(out["a"]) == ["y", "x"]
    assert isinstance(out["b"], tuple) and isinstance(out["b"][1], list)


def test_tree_map_multiple_trees_and_prefix_rule():
    a = {"x": 1, "y": [2, 3]}
    b = {"y": [20, 30], "x": 10}  # key order differs: a's order wins
    out = tree_map(lambda u, v: u + v, a, b)
    assert out == {"x": 11, "y": [22, 33]} and list(out) == ["x", "y"]
    # where the first tree has a leaf, the other's subtree is passed whole
    assert tree_map(lambda u, v: (u, v), {"x": 1}, {"x": [1, 2]}) == {"x": (1, [1, 2])}


@pytest.mark.parametrize("other", [{"x": 1}, {"x": 1, "y": [1], "z": 0}, {"x": 1, "y": [1, 2]}, {"x": 1, "y": 5}])
def test_tree_map_structure_mismatch_raises(other):
    with pytest.raises(ValueError, match="'y'|at ''"):
        tree_map(lambda u, v: u, {"x": 1, "y": [1]}, other)


def test_tree_map_with_path_gives_dotted_paths():
    got = []
    out = tree_map_with_path(lambda p, x, y: got.append((p, x, y)) or p, {"a": [1, {"b": 2}]}, {"a": [3, {"b": 4}]})
    assert got == [("a.0", 1, 3), ("a.1.b", 2, 4)]
    assert out == {"a": ["a.0", {"b": "a.1.b"}]}


# ---------------------------------------------------------------------------------------------
# merge / filter / partition / combine
# ---------------------------------------------------------------------------------------------


def test_merge_update_wins_base_order_kept_new_keys_appended():
    base = {"b": 1, "a": {"x": 1, "y": 2}, "l": [1, {"p": 1}]}
    upd = {"new": 9, "a": {"z": 3, "x": 10}, "l": [{}, {"q": 2}, 7]}
    out = merge(base, upd)
    assert out == {"b": 1, "a": {"x": 10, "y": 2, "z": 3}, "l": [1, {"p": 1, "q": 2}, 7], "new": 9}
    assert list(out) == ["b", "a", "l", "new"] and list(out["a"]) == ["x", "y", "z"]
    assert base == {"b": 1, "a": {"x": 1, "y": 2}, "l": [1, {"p": 1}]}  # not mutated
    assert merge({"a": 1}, {"a": {"b": 2}}) == {"a": {"b": 2}}


def test_merge_filtered_update_replaces_only_its_leaves():
    t = model_tree()
    new = tree_map(lambda x: x + 1, filter_tree(lambda p, x: p.endswith("A_log"), t))
    out = merge(t, new)
    for p, x in flatten(out).items():
        if p.endswith("A_log"):
            assert x is flatten(new)[p]
        else:
            assert x is flatten(t)[p]
    assert paths(out) == paths(t)


def test_filter_tree_keeps_list_indices_and_drops_emptied_containers():
    t = model_tree()
    f = filter_tree(lambda p, x: p.endswith("A_log"), t)
    assert list(f) == ["layers"]
    assert isinstance(f["layers"], list) and len(f["layers"]) == 3
    assert f["layers"][1] == {}
    assert list(f["layers"][0]) == ["mixer"] and list(f["layers"][0]["mixer"]) == ["A_log"]
    assert f["layers"][2]["mixer"]["A_log"] is t["layers"][2]["mixer"]["A_log"]
    assert paths(f) == ["layers.0.mixer.A_log", "layers.2.mixer.A_log"]
    assert filter_tree(lambda p, x: False, t) == {}


def test_partition_keeps_skeleton_with_holes():
    t = {"b": 1, "a": {"x": 2, "y": 3}, "e": {}, "l": [4, 5]}
    m, r = partition(lambda p, x: p in ("a.y", "l.1"), t)
    assert m == {"b": {}, "a": {"x": {}, "y": 3}, "e": {}, "l": [{}, 5]}
    assert r == {"b": 1, "a": {"x": 2, "y": {}}, "e": {}, "l": [4, {}]}
    assert list(m) == list(r) == ["b", "a", "e", "l"]


def test_partition_halves_work_with_mx_grad():
    t = model_tree()
    train, frozen = partition(lambda p, x: "A_log" in p, t)

    def loss(tr):
        full = combine(tr, frozen)
        return sum((x * x).sum() for x in leaves(full) if isinstance(x, mx.array)) + sum(
            x.sum() for x in leaves(tr))

    g = mx.grad(loss)(train)
    assert paths(g) == paths(train) == ["layers.0.mixer.A_log", "layers.2.mixer.A_log"]


@given(_tree, st.integers(0, 10**6))
def test_combine_inverts_partition_exactly(t, salt):
    p = _pred(salt)
    m, r = partition(p, t)
    same(combine(m, r), t)
    flat = flatten(t) if isinstance(t, (dict, list, tuple)) else None
    if flat is not None:
        assert list(flatten(m)) == [k for k, v in flat.items() if p(k, v)]
        assert list(flatten(r)) == [k for k, v in flat.items() if not p(k, v)]


@given(_tree, st.integers(0, 10**6))
def test_filter_tree_matches_flat_filter_and_combines_back(t, salt):
    if not isinstance(t, (dict, list, tuple)):
        return
    p = _pred(salt)
    keep = filter_tree(p, t)
    drop = filter_tree(lambda k, v: not p(k, v), t)
    flat = flatten(t)
    got = flatten(keep)
    assert list(got) == [k for k, v in flat.items() if p(k, v)]
    assert all(got[k] is flat[k] for k in got)
    both = flatten(combine(keep, drop))
    assert set(both) == set(flat) and all(both[k] is flat[k] for k in flat)


def test_combine_rejects_overlapping_leaves():
    with pytest.raises(ValueError, match="a.b"):
        combine({"a": {"b": 1}}, {"a": {"b": 2}})
    with pytest.raises(ValueError, match="'a'"):
        combine({"a": [1]}, {"a": 2})


# ---------------------------------------------------------------------------------------------
# sizes and dtypes
# ---------------------------------------------------------------------------------------------


def test_count_params_and_tree_bytes():
    t = {"w": mx.zeros((3, 4), dtype=mx.bfloat16), "b": [mx.zeros((5,), dtype=mx.float32)],
         "i": mx.zeros((2,), dtype=mx.int64), "step": 7, "n": None}
    assert count_params(t) == 12 + 5 + 2
    assert tree_bytes(t) == 12 * 2 + 5 * 4 + 2 * 8
    assert count_params({}) == 0 and tree_bytes([]) == 0


def test_cast_keeps_ssm_leaves_fp32_and_leaves_ints_alone():
    t = {
        "layers": [{"mixer": {
            "A_log": mx.zeros((2,), dtype=mx.bfloat16),   # stored 16-bit: brought back to fp32
            "D": mx.zeros((2,)),
            "dt_bias": mx.zeros((2,)),
            "in_proj": {"weight": mx.zeros((2, 2))},
            "A_log_other": mx.zeros((2,)),
        }}],
        "ids": mx.zeros((3,), dtype=mx.int32),
        "step": 3,
    }
    out = cast(t, mx.bfloat16)
    m = out["layers"][0]["mixer"]
    assert KEEP_FP32 == ("A_log", "D", "dt_bias", "slope_rate")  # slope_rate: lightning-attention decays
    assert m["A_log"].dtype == mx.float32
    assert m["D"].dtype == mx.float32 and m["dt_bias"].dtype == mx.float32
    assert m["in_proj"]["weight"].dtype == mx.bfloat16
    assert m["A_log_other"].dtype == mx.bfloat16
    assert out["ids"] is t["ids"] and out["step"] == 3
    assert m["D"] is t["layers"][0]["mixer"]["D"]  # already fp32: untouched
    assert paths(out) == paths(t)

    all16 = cast(t, mx.float16, keep=None)
    assert all(x.dtype == mx.float16 for p, x in flatten(all16).items() if "mixer" in p)
    by_fn = cast(t, mx.float16, keep=lambda p: p.endswith("weight"))
    assert by_fn["layers"][0]["mixer"]["in_proj"]["weight"].dtype == mx.float32
    assert by_fn["layers"][0]["mixer"]["A_log"].dtype == mx.float16


# ---------------------------------------------------------------------------------------------
# path patterns
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern, yes, no",
    [
        ("q_proj", ["layers.3.attn.q_proj", "q_proj"], ["layers.3.attn.xq_proj", "layers.3.attn.q_proj.weight"]),
        ("attn.*_proj.weight", ["layers.0.attn.q_proj.weight", "attn.o_proj.weight"],
         ["layers.0.mixer.q_proj.weight", "layers.0.attn.q.weight"]),
        ("layers.1.*", ["layers.1.norm"], ["layers.1.attn.q_proj", "layers.11.norm", "layers.1"]),
        ("layers.1.**", ["layers.1", "layers.1.norm", "layers.1.attn.q_proj.weight"], ["layers.10.norm"]),
        ("layers.*.**.weight", ["layers.0.weight", "layers.2.attn.q_proj.weight"], ["layers.2.attn.bias"]),
        ("*.[qk]_proj", ["attn.q_proj", "attn.k_proj"], ["attn.v_proj"]),
        ("*.[!qk]_proj", ["attn.v_proj"], ["attn.q_proj"]),
        ("?_proj", ["a.v_proj"], ["a.vv_proj"]),
        ("**", ["a", "a.b.c"], []),
        (r"re:layers\.(0|2)\..*proj", ["layers.0.attn.q_proj", "layers.2.in_proj"],
         ["layers.1.in_proj", "x.layers.0.in_proj", "layers.0.in_proj.weight"]),
    ],
)
def test_path_matches_syntax(pattern, yes, no):
    for p in yes:
        assert path_matches(p, pattern), (pattern, p)
        assert path_matches(p, ["nomatch", pattern])
    for p in no:
        assert not path_matches(p, pattern), (pattern, p)
    assert not path_matches("a.b", [])


def test_tree_functions_do_not_mutate_inputs():
    t = model_tree()
    snapshot = flatten(t)
    partition(lambda p, x: "norm" in p, t)
    filter_tree(lambda p, x: "norm" in p, t)
    merge(t, {"embed": {"weight": 1}})
    cast(t, mx.float16)
    after = flatten(t)
    assert list(after) == list(snapshot) and all(after[k] is snapshot[k] for k in after)
    assert np.array(t["embed"]["weight"]).dtype == np.float32

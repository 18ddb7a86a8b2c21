import json
import math
import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import alloy  # noqa: F401
import mlx.core as mx

from alloy.params import (
    CheckpointError,
    atomic_path,
    atomic_write,
    flatten,
    load_into,
    load_json,
    load_safetensors,
    load_tree_msgpack,
    save_json,
    save_safetensors,
    save_tree_msgpack,
)
from alloy.params import io as pio

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

_UINT_OF = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}


def bits(a: mx.array) -> np.ndarray:
    """The raw bits of ``a`` (so NaN payloads and -0.0 compare exactly)."""
    if a.dtype == mx.bool_:
        return np.array(a)
    if a.dtype == mx.complex64:
        return np.array(a).view(np.uint64)
    return np.array(a.view(_UINT_OF[a.dtype.size]))


def same_bits(a, b, path="<root>"):
    """Exact equality: container types, key order, leaf types, array dtype/shape/bits."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} vs {list(b)}"
        for k in a:
            same_bits(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same_bits(x, y, f"{path}.{i}")
    elif isinstance(a, mx.array):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
        assert np.array_equal(bits(a), bits(b)), f"{path}: bits differ"
    elif isinstance(a, (np.ndarray, np.generic)):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), path
    elif isinstance(a, float):
        assert math.copysign(1, a) == math.copysign(1, b) and (a == b or (a != a and b != b)), path
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def rand_bits(shape, dtype, seed=0):
    """Arbitrary bit patterns of ``dtype`` (incl. NaNs/infs/subnormals for floats)."""
    rng = np.random.default_rng(seed)
    n = mx.array(rng.integers(0, 2**63, size=shape, dtype=np.uint64))
    if dtype == mx.bool_:
        return (n % 2) == 1
    return n.astype(_UINT_OF[dtype.size]).view(dtype) if dtype.size < 8 else n.view(dtype)


def model_tree():
    # deliberately not alphabetical, and > 10 layers so lexicographic != index order
    return {
        "embed": {"weight": rand_bits((6, 4), mx.bfloat16, 1)},
        "layers": [
            {"mixer": {"in_proj": {"weight": rand_bits((4, 3), mx.float16, 10 + i)},
                       "A_log": rand_bits((3,), mx.float32, 30 + i)},
             "norm": {"weight": rand_bits((4,), mx.bfloat16, 50 + i)}}
            for i in range(12)
        ],
        "final_norm": {"weight": rand_bits((4,), mx.float32, 2)},
        "pos": rand_bits((2, 2), mx.int32, 3),
    }


class ShapeOnly:
    """A template leaf with only shape/dtype: anything else (evaluation) would blow up."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), dtype


def shape_template(tree):
    return alloy.params.tree_map(lambda x: ShapeOnly(x.shape, x.dtype), tree)


def listdir(d):
    return sorted(os.listdir(d))


# ---------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------


def test_safetensors_round_trip_bit_exact_with_template_order(tmp_path):
    t = model_tree()
    path = tmp_path / "model.safetensors"
    save_safetensors(path, t, metadata={"format": "alloy", "step": "3"})
    flat, meta = load_safetensors(path, return_metadata=True)
    assert meta == {"format": "alloy", "step": "3"}
    assert set(flat) == set(flatten(t))
    # natural order: layers.2 before layers.10
    order = list(flat)
    assert order.index("layers.2.norm.weight") < order.index("layers.10.norm.weight")
    back = load_into(shape_template(t), flat)
    same_bits(back, t)  # structure, key order, dtypes (bf16/fp16/fp32/int32) and bits
    assert listdir(tmp_path) == ["model.safetensors"]


def test_save_safetensors_accepts_flat_dict_and_writes_exact_path(tmp_path):
    flat = {"b.weight": mx.arange(3, dtype=mx.int32), "a.0.w": mx.ones((2,), dtype=mx.uint8)}
    save_safetensors(tmp_path / "weights", flat)  # no extension: none appended
    assert listdir(tmp_path) == ["weights"]
    got = load_safetensors(tmp_path / "weights")
    assert set(got) == set(flat)
    for k in flat:
        same_bits(got[k], flat[k])


def test_save_safetensors_rejects_non_array_leaves(tmp_path):
    with pytest.raises(TypeError, match="step"):
        save_safetensors(tmp_path / "x.safetensors", {"w": mx.ones(2), "step": 3})
    with pytest.raises(TypeError, match="n"):
        save_safetensors(tmp_path / "x.safetensors", {"w": mx.ones(2)}, metadata={"n": 3})
    assert listdir(tmp_path) == []


def test_load_directory_single_file(tmp_path):
    t = model_tree()
    save_safetensors(tmp_path / "model.safetensors", t)
    same_bits(load_into(shape_template(t), load_safetensors(tmp_path)), t)


def _write_sharded(d, t, n_shards=3):
    flat = flatten(t)
    keys = list(flat)
    wmap = {}
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: flat[k] for k in keys[s::n_shards]}
        save_safetensors(d / name, part)
        wmap.update({k: name for k in part})
    save_json(d / "model.safetensors.index.json",
              {"metadata": {"total_size": 0}, "weight_map": dict(sorted(wmap.items()))})
    return wmap


def test_load_sharded_directory_loads_every_shard(tmp_path):
    t = model_tree()
    _write_sharded(tmp_path, t)
    flat = load_safetensors(tmp_path)
    assert set(flat) == set(flatten(t))
    same_bits(load_into(shape_template(t), flat), t)


def test_sharded_index_naming_absent_keys_or_shards_is_an_error(tmp_path):
    t = model_tree()
    wmap = _write_sharded(tmp_path, t)
    wmap = dict(wmap, **{"ghost.weight": "model-00001-of-00003.safetensors",
                         "other.weight": "model-00002-of-00003.safetensors"})
    save_json(tmp_path / "model.safetensors.index.json", {"weight_map": wmap})
    with pytest.raises(CheckpointError) as e:
        load_safetensors(tmp_path)
    assert "ghost.weight" in str(e.value) and "other.weight" in str(e.value)
    wmap["x"] = "model-00009-of-00009.safetensors"
    save_json(tmp_path / "model.safetensors.index.json", {"weight_map": wmap})
    with pytest.raises(CheckpointError, match="model-00009-of-00009"):
        load_safetensors(tmp_path)


def test_load_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_safetensors(tmp_path / "nope.safetensors")
    (tmp_path / "adapters.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="adapters.safetensors"):
        load_safetensors(tmp_path)


# ---------------------------------------------------------------------------------------------
# load_into
# ---------------------------------------------------------------------------------------------


def test_load_into_reports_every_problem_in_one_error():
    template = {"a": {"w": ShapeOnly((2, 3), mx.float32), "b": ShapeOnly((3,), mx.float32)},
                "layers": [{"w": ShapeOnly((4,), mx.float32)}, {"w": ShapeOnly((4,), mx.float32)}],
                "c": ShapeOnly((1,), mx.float32)}
    flat = {"a.w": mx.zeros((3, 2)), "layers.0.w": mx.zeros((5,)), "c": mx.zeros((1,)),
            "extra.one": mx.zeros(1), "extra.two": mx.zeros(1)}
    with pytest.raises(CheckpointError) as e:
        load_into(template, flat)
    msg = str(e.value)
    for name in ("a.b", "layers.1.w", "extra.one", "extra.two", "a.w", "layers.0.w"):
        assert name in msg
    assert "missing keys (2)" in msg and "unexpected keys (2)" in msg and "shape mismatches (2)" in msg
    assert "a.w: expected (2, 3), got (3, 2)" in msg
    assert "layers.0.w: expected (4,), got (5,)" in msg
    err = e.value
    assert isinstance(err, ValueError)
    assert err.missing == ["a.b", "layers.1.w"] and err.unexpected == ["extra.one", "extra.two"]
    assert [m[0] for m in err.mismatched] == ["a.w", "layers.0.w"]

    # non-strict: extra keys ignored, missing and mis-shaped still errors
    with pytest.raises(CheckpointError) as e2:
        load_into(template, flat, strict=False)
    assert "extra.one" not in str(e2.value) and "a.b" in str(e2.value) and "a.w" in str(e2.value)


def test_load_into_non_strict_ignores_unexpected_and_casts_on_request():
    template = {"w": ShapeOnly((2,), mx.bfloat16), "i": ShapeOnly((2,), mx.int32)}
    flat = {"i": mx.array([1, 2], dtype=mx.int32), "w": mx.array([1.5, 2.5]), "junk": mx.zeros(1)}
    out = load_into(template, flat, strict=False)
    assert list(out) == ["w", "i"] and out["w"].dtype == mx.float32 and out["w"] is flat["w"]
    out = load_into(template, flat, strict=False, cast_to_template=True)
    assert out["w"].dtype == mx.bfloat16 and out["i"] is flat["i"]
    with pytest.raises(CheckpointError, match="junk"):
        load_into(template, flat)


def test_load_into_accepts_lazy_mx_template():
    template = {"w": mx.zeros((2, 2)) * 3.0, "b": mx.ones((2,)) + 1}  # lazy, never evaluated
    flat = {"b": mx.array([7.0, 8.0]), "w": mx.ones((2, 2))}
    out = load_into(template, flat)
    assert list(out) == ["w", "b"] and out["b"] is flat["b"]


# ---------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------


def test_atomic_write_str_and_bytes(tmp_path):
    atomic_write(tmp_path / "a.txt", "héllo")
    atomic_write(tmp_path / "sub" / "b.bin", b"\x00\x01")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo"
    assert (tmp_path / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    assert listdir(tmp_path) == ["a.txt", "sub"] and listdir(tmp_path / "sub") == ["b.bin"]


def test_atomic_write_failure_mid_write_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "ckpt.json"
    target.write_text("old")
    written = []
    real_fsync = os.fsync

    def boom(fd):
        written.append(os.fstat(fd).st_size)  # the temp file already holds the new bytes
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, "new content")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert written == [len("new content")]
    assert target.read_text() == "old"
    assert listdir(tmp_path) == ["ckpt.json"]


def test_atomic_write_failure_at_rename_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "state.msgpack"
    target.write_bytes(b"old")

    def boom(src, dst):
        assert os.path.exists(src)
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="rename failed"):
        save_tree_msgpack(target, {"a": 1})
    assert target.read_bytes() == b"old"
    assert listdir(tmp_path) == ["state.msgpack"]


def test_save_safetensors_failure_mid_write_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "model.safetensors"
    save_safetensors(target, {"w": mx.ones((2,))})
    before = target.read_bytes()

    def partial_then_fail(file, arrays, metadata=None):
        with open(file, "wb") as f:
            f.write(b"\x10\x00partial")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(pio.mx, "save_safetensors", partial_then_fail)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        save_safetensors(target, {"w": mx.zeros((2,))})
    assert target.read_bytes() == before
    assert listdir(tmp_path) == ["model.safetensors"]


def test_atomic_path_keeps_suffix_renames_on_success_and_cleans_on_error(tmp_path):
    with atomic_path(tmp_path / "model.safetensors") as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".safetensors") and not tmp.exists()
        mx.save_safetensors(str(tmp), {"w": mx.ones(1)})  # would append a suffix if it lacked one
    assert listdir(tmp_path) == ["model.safetensors"]

    with pytest.raises(KeyError):
        with atomic_path(tmp_path / "model.safetensors") as tmp:
            tmp.write_bytes(b"half")
            raise KeyError("boom")
    assert listdir(tmp_path) == ["model.safetensors"]
    assert "w" in load_safetensors(tmp_path / "model.safetensors")


# ---------------------------------------------------------------------------------------------
# JSON and msgpack
# ---------------------------------------------------------------------------------------------


def test_json_round_trip_keeps_order_and_indent(tmp_path):
    obj = {"z": 1, "a": [1, {"y": None, "b": "é"}]}
    save_json(tmp_path / "config.json", obj)
    text = (tmp_path / "config.json").read_text(encoding="utf-8")
    assert text == json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    back = load_json(tmp_path / "config.json")
    assert back == obj and list(back) == ["z", "a"] and list(back["a"][1]) == ["y", "b"]


_DTYPES = [mx.bool_, mx.uint8, mx.uint16, mx.uint32, mx.uint64, mx.int8, mx.int16, mx.int32,
           mx.int64, mx.float16, mx.bfloat16, mx.float32, mx.float64, mx.complex64]


def test_msgpack_round_trip_bit_exact_all_types(tmp_path):
    tree = {
        "z_first": {f"{d}".split(".")[-1]: rand_bits((3, 2), d, i) for i, d in enumerate(_DTYPES)},
        "scalar0d": mx.array(3, dtype=mx.int32),
        "empty": mx.zeros((0, 4), dtype=mx.bfloat16),
        "opt": [{"m": rand_bits((2,), mx.float32, 7), "v": rand_bits((2,), mx.float32, 8)}, None],
        "step": 2**62 + 1,
        "neg": -3,
        "lr": 1e-3,
        "negzero": -0.0,
        "nan": float("nan"),
        "flag": True,
        "name": "run",
        "blob": b"\x00\xff",
        "pair": (1, [2.5, (None,)]),
        "np": np.arange(4, dtype=np.int16).reshape(2, 2),
        "np_scalar": np.int64(-7),
        "a_last": {},
        "int_keys": {3: "x", 1: "y"},
    }
    path = tmp_path / "state.msgpack"
    save_tree_msgpack(path, tree)
    back = load_tree_msgpack(path)
    same_bits(back, tree)
    assert listdir(tmp_path) == ["state.msgpack"]


_mx_leaf = st.tuples(st.sampled_from(_DTYPES), st.lists(st.integers(0, 3), max_size=3),
                     st.integers(0, 2**31)).map(lambda a: rand_bits(tuple(a[1]), a[0], a[2]))
_msg_tree = st.recursive(
    st.one_of(_mx_leaf, st.integers(-(2**63), 2**64 - 1), st.floats(), st.booleans(), st.none(),
              st.text(max_size=4)),
    lambda kids: st.one_of(st.lists(kids, max_size=3), st.lists(kids, max_size=3).map(tuple),
                           st.dictionaries(st.text(min_size=1, max_size=3), kids, max_size=3)),
    max_leaves=10,
)


@given(_msg_tree)
def test_msgpack_round_trip_property(tmp_path_factory, tree):
    path = tmp_path_factory.mktemp("mp") / "t.msgpack"
    save_tree_msgpack(path, tree)
    same_bits(load_tree_msgpack(path), tree)


def test_msgpack_rejects_unsupported_leaves_and_foreign_files(tmp_path):
    with pytest.raises(TypeError, match="a.1"):
        save_tree_msgpack(tmp_path / "x.msgpack", {"a": [1, object()]})
    assert listdir(tmp_path) == []
    (tmp_path / "y.msgpack").write_bytes(b"\x93\x01\x02\x03")
    with pytest.raises(ValueError, match="not an alloy tree"):
        load_tree_msgpack(tmp_path / "y.msgpack")

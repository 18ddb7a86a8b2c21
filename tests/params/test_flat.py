"""FlatLayout: pack / unpack round trips, the differentiable unpack's gradient against autodiff of
the tree form, bad buffers and groups refused by name."""
import mlx.core as mx
import numpy as np
import pytest

from alloy.params import flatten
from alloy.params.flat import FlatLayout


def _tree():
    k = mx.random.key(0)
    ks = mx.random.split(k, 4)
    return {"a": {"w": mx.random.normal((3, 4), key=ks[0]), "b": mx.random.normal((4,), key=ks[1])},
            "layers": [{"w": mx.random.normal((2, 2, 3), key=ks[2])},
                       {"table": mx.array([3, 1, 2], mx.int32), "s": mx.random.normal((5,), key=ks[3])}]}


def _group(path, leaf):
    if not mx.issubdtype(leaf.dtype, mx.floating):
        return None
    return "mat" if leaf.ndim >= 2 else "vec"


def test_pack_unpack_round_trip_keeps_structure_and_values():
    t = _tree()
    L = FlatLayout(t, _group)
    packed, rest = L.split(t)
    bufs = L.pack(packed)
    assert {k: v.shape for k, v in bufs.items()} == {"mat": (24,), "vec": (9,)}
    back = L.unpack(bufs, rest)
    assert list(flatten(back)) == list(flatten(t))
    for k, v in flatten(t).items():
        assert mx.array_equal(flatten(back)[k], v), k
    np.testing.assert_array_equal(np.array(bufs["mat"][:12]), np.array(t["a"]["w"]).reshape(-1))


def test_differentiable_unpack_gradient_equals_autodiff_of_the_tree():
    t = _tree()
    L = FlatLayout(t, _group)
    packed, rest = L.split(t)
    bufs = L.pack(packed)

    def loss_tree(tr):  # "layers.1.s" unused: its cotangent is zero
        return (tr["a"]["w"] ** 2).sum() + (mx.sin(tr["layers"][0]["w"])).sum() + (tr["a"]["b"] * 3).sum()

    got = mx.grad(lambda b: loss_tree(L.unpack_differentiable(b, rest)))(bufs)
    want = L.pack(mx.grad(loss_tree)(packed))
    for k in bufs:
        np.testing.assert_allclose(np.array(got[k]), np.array(want[k]), rtol=1e-6, err_msg=k)
    assert float(mx.abs(got["vec"][4:]).sum()) == 0.0


def test_bad_buffers_and_groups_are_refused_by_name():
    t = _tree()
    L = FlatLayout(t, _group)
    bufs = L.pack(L.split(t)[0])
    with pytest.raises(ValueError, match="buffer 'mat' has shape"):
        L.unpack({**bufs, "mat": bufs["mat"][:-1]}, L.split(t)[1])
    with pytest.raises(ValueError, match=r"no buffer for group\(s\) \['vec'\]"):
        L.unpack({"mat": bufs["mat"]}, L.split(t)[1])
    with pytest.raises(ValueError, match="leaf 'a.w' has shape"):
        L.pack({**t, "a": {"w": mx.zeros((4, 3 + 1)), "b": t["a"]["b"]}})
    with pytest.raises(ValueError, match="without dots"):
        FlatLayout(t, lambda p, x: "a.b")

"""Data parallel: 2 processes under MLX's launcher (ring backend) == 1 process on the whole batch;
the single-process path is a no-op; shard / bucketing logic against plain references.

On a host with 2 GPUs and MLX's CUDA build, ``ALLOY_DP_BACKEND=nccl python -m pytest
tests/train/test_distributed.py`` runs the same 2-rank checks over NCCL.
"""
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import alloy
import alloy.params
import mlx.core as mx

from alloy.params import flatten, load_safetensors
from alloy.train import distributed as dist

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import _dp_worker as W  # noqa: E402


# ----------------------------------------------------------------------------------------------
# two processes, ring backend, MLX's launcher
# ----------------------------------------------------------------------------------------------


def _launcher():
    """MLX's launcher: the ``mlx.launch`` console script beside this Python, else on PATH."""
    beside = Path(sys.executable).parent / "mlx.launch"
    if beside.is_file():
        return str(beside)
    return shutil.which("mlx.launch")


def _free_port_pair():
    """A port P with P and P+1 free on 127.0.0.1 (the launcher gives rank i port P + i)."""
    for _ in range(200):
        p = random.randrange(20000, 60000)
        socks = []
        try:
            for q in (p, p + 1):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", q))
            return p
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free pair of ports found on 127.0.0.1")


BACKEND = os.environ.get("ALLOY_DP_BACKEND", "ring")


def _launch(out_dir: Path, timeout=120):
    if BACKEND == "nccl":  # one process per GPU; the launcher sets CUDA_VISIBLE_DEVICES per rank
        where = ["--nccl-port", str(_free_port_pair()), "--env", "NCCL_NVLS_ENABLE=0"]
    else:
        where = ["--starting-port", str(_free_port_pair())]
    cmd = [_launcher(), "--backend", BACKEND, "-n", "2", *where,
           "--", sys.executable, str(HERE / "_dp_worker.py"), str(out_dir), BACKEND]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # stdin: an open pipe we never write to. The launcher forwards its stdin to the ranks and
    # would spin on an always-readable /dev/null.
    proc = subprocess.Popen(cmd, cwd=HERE.parent.parent, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's own session: it and its ranks
        out, _ = proc.communicate()
        pytest.fail(f"mlx.launch timed out after {timeout}s:\n{out.decode(errors='replace')}")
    return proc.returncode, out.decode(errors="replace")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    if _launcher() is None:
        pytest.skip("MLX's launcher (mlx.launch) is not installed")
    out_dir = tmp_path_factory.mktemp("dp")
    for attempt in range(2):  # a port taken between the probe and the bind: retry once
        code, log = _launch(out_dir)
        files = [out_dir / f"rank{r}.safetensors" for r in (0, 1)]
        if code == 0 and all(f.is_file() for f in files):
            break
    else:
        pytest.fail(f"mlx.launch failed (exit {code}):\n{log}")
    assert "rank 0/2 done" in log and "rank 1/2 done" in log, log
    print(log)
    return [load_safetensors(f) for f in files]


def _section(flat, name):
    return {k[len(name) + 1:]: v for k, v in flat.items() if k.startswith(name + ".")}


@pytest.fixture(scope="module")
def single():
    """The reference: one process, rank 0's init, the whole global batch."""
    model = alloy.build(W.MODEL)
    params = model.init(mx.random.key(0))
    loss, grads = mx.value_and_grad(W.make_loss(model))(params, W.global_tokens())
    mx.eval(loss, grads)
    return params, loss, flatten(grads)


def test_two_rank_average_equals_one_process_on_the_whole_batch(two_ranks, single):
    params, loss, full = single
    for r, flat in enumerate(two_ranks):
        # broadcast: both ranks hold rank 0's init bit for bit (rank 1 started from its own)
        for k, v in flatten(params).items():
            assert np.array_equal(np.array(_section(flat, "params")[k]), np.array(v)), (r, k)
        local = _section(flat, "local")
        for variant in ("avg", "per_leaf", "small", "compiled"):
            got = _section(flat, variant)
            assert sorted(got) == sorted(full)
            for k, g in full.items():
                np.testing.assert_allclose(np.array(got[k]), np.array(g), rtol=1e-4, atol=1e-6,
                                           err_msg=f"rank {r} {variant} {k}")
        # the halves alone are not the answer: the check above can fail
        worst = max(float(mx.abs(local[k] - g).max()) for k, g in full.items())
        assert worst > 1e-4
        np.testing.assert_allclose(flat["loss.mean"].item(), loss.item(), rtol=1e-5)


def test_ranks_agree_bit_for_bit_after_an_sgd_step(two_ranks, single):
    r0, r1 = two_ranks
    assert not np.array_equal(np.array(_section(r0, "own")["embed_tokens.weight"]),
                              np.array(_section(r1, "own")["embed_tokens.weight"]))
    for name in ("avg", "per_leaf", "small", "compiled", "stepped", "mixed"):
        a, b = _section(r0, name), _section(r1, name)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype
            assert np.array_equal(np.array(a[k].astype(mx.float32)),
                                  np.array(b[k].astype(mx.float32))), (name, k)
    params, _, full = single
    stepped = _section(r0, "stepped")
    for k, p in flatten(params).items():
        np.testing.assert_allclose(np.array(stepped[k]), np.array(p - W.LR * full[k]), rtol=1e-5, atol=1e-7)


def test_mixed_dtype_buckets_average_exactly(two_ranks):
    mixed = _section(two_ranks[0], "mixed")
    assert mixed["a"].dtype == mx.float32 and mixed["b"].dtype == mx.bfloat16
    assert mixed["c.1.w"].dtype == mx.bfloat16
    # mean of (r + 1) * x over r in {0, 1} = 1.5 x, exact in both dtypes for these small values
    np.testing.assert_array_equal(np.array(mixed["a"]), 1.5 * np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(np.array(mixed["b"].astype(mx.float32)), 1.5 * np.arange(5))
    np.testing.assert_array_equal(np.array(mixed["c.1.w"].astype(mx.float32)), [3.0, 3.0, 3.0])


# ----------------------------------------------------------------------------------------------
# one process: everything is a no-op
# ----------------------------------------------------------------------------------------------


def test_single_process_is_a_no_op():
    group = dist.init()
    assert dist.world(group) == (0, 1) and dist.world() == (0, 1)
    assert dist.is_main() and dist.is_main(group)
    grads = {"w": mx.ones((3, 2)), "layers": [{}, {"b": mx.zeros((2,))}]}
    assert dist.average_gradients(grads) is grads
    assert dist.average_gradients(grads, group, bucket_bytes=0) is grads
    assert dist.broadcast(grads) is grads
    assert dist.all_mean(grads) is grads
    batch = {"tokens": mx.zeros((4, 3), dtype=mx.int32)}
    assert dist.shard(batch, 0, 1) is batch


def test_init_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        dist.init(backend="gloo")


# ----------------------------------------------------------------------------------------------
# shard
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3, 6])
def test_shards_concatenate_back_to_the_batch(size):
    rng = np.random.default_rng(size)
    batch = {"tokens": mx.array(rng.integers(0, 9, (6, 5))), "mask": mx.array(rng.random((6, 5)) > 0.5),
             "step": 7}
    parts = [dist.shard(batch, r, size) for r in range(size)]
    assert all(p["step"] == 7 and p["tokens"].shape == (6 // size, 5) for p in parts)
    for k in ("tokens", "mask"):
        np.testing.assert_array_equal(np.concatenate([np.array(p[k]) for p in parts]), np.array(batch[k]))
    np.testing.assert_array_equal(np.array(dist.shard(mx.arange(6), 1, 3)), [2, 3])


def test_shard_errors_name_the_problem():
    with pytest.raises(ValueError, match="batch size 5 is not divisible by the world size 2"):
        dist.shard({"tokens": mx.zeros((5, 3))}, 0, 2)
    with pytest.raises(ValueError, match="disagree on the batch size"):
        dist.shard({"tokens": mx.zeros((4, 3)), "mask": mx.zeros((2, 3))}, 0, 2)
    with pytest.raises(ValueError, match="need 0 <= rank < size, got rank=2, size=2"):
        dist.shard(mx.zeros((4,)), 2, 2)
    with pytest.raises(TypeError, match="rank must be an int"):
        dist.shard(mx.zeros((4,)), 0.0, 2)


# ----------------------------------------------------------------------------------------------
# bucketing, against a fake 4-rank group whose all_sum is "every rank holds the same x"
# ----------------------------------------------------------------------------------------------


class _FakeGroup:
    def rank(self):
        return 0

    def size(self):
        return 4


@pytest.fixture
def fake_sum(monkeypatch):
    calls = []

    def all_sum(x, group, stream):
        calls.append((x.dtype, x.size))
        return x * 4 + 1  # 4 identical ranks, plus a marker: the mean comes out as x + 1/4

    monkeypatch.setattr(dist, "_all_sum", all_sum)
    return calls


@pytest.mark.parametrize("bucket_bytes, n_calls", [(dist.DEFAULT_BUCKET_BYTES, 2), (0, 7), (64, 5)])
def test_buckets_fuse_by_dtype_and_restore_the_tree(fake_sum, bucket_bytes, n_calls):
    rng = np.random.default_rng(0)
    grads = {
        "a": mx.array(rng.normal(size=(5, 4)).astype(np.float32)),                  # 80 B
        "layers": [{}, {"w": mx.array(rng.normal(size=(3, 7)).astype(np.float32)),   # 84 B
                        "h": mx.array(rng.normal(size=(6,))).astype(mx.bfloat16)}, {}],
        "b": mx.array(rng.normal(size=(2, 2, 2)).astype(np.float32)),               # 32 B
        "c": mx.array(rng.normal(size=(4,))).astype(mx.bfloat16),
        "d": mx.array(rng.normal(size=(9,)).astype(np.float32)),                    # 36 B
        "e": mx.array(rng.normal(size=(1,)).astype(np.float32)),
    }
    out = dist.average_gradients(grads, _FakeGroup(), bucket_bytes=bucket_bytes)
    assert len(fake_sum) == n_calls
    assert sum(n for _, n in fake_sum) == alloy.params.count_params(grads)
    assert out["layers"][0] == {} and out["layers"][2] == {} and len(out["layers"]) == 3
    assert list(flatten(out)) == list(flatten(grads))
    for (k, g), o in zip(flatten(grads).items(), flatten(out).values()):
        assert o.dtype == g.dtype and o.shape == g.shape, k
        want = np.array(g.astype(mx.float32)) + 0.25
        tol = 1e-2 if g.dtype == mx.bfloat16 else 1e-6
        np.testing.assert_allclose(np.array(o.astype(mx.float32)), want, rtol=tol, atol=tol, err_msg=k)


def test_average_gradients_rejects_non_array_leaves(fake_sum):
    with pytest.raises(TypeError, match=r"not arrays: \['n'\]"):
        dist.average_gradients({"w": mx.ones((2,)), "n": 3}, _FakeGroup())

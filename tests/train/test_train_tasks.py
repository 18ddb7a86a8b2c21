"""MQAR and selective copying: answers checked against an independent decoding of each row."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import alloy  # noqa: F401

from alloy.train.tasks import TaskData, copy_batch, masked_accuracy, mqar_batch


@given(seed=st.integers(0, 1000), num_kv=st.integers(1, 8), extra=st.integers(0, 20), vocab=st.integers(20, 100))
def test_mqar_every_scored_target_is_the_value_bound_to_the_query_key(seed, num_kv, extra, vocab):
    T = 4 * num_kv - 1 + extra
    b = mqar_batch(np.random.default_rng(seed), 3, T, num_kv, vocab)
    tok, mask = b["tokens"], b["mask"]
    assert tok.shape == (3, T + 1) and mask.shape == (3, T)
    K = (vocab - 1) // 2
    for row, m in zip(tok, mask):
        kv = dict(zip(row[0:2 * num_kv:2].tolist(), row[1:2 * num_kv:2].tolist()))
        assert len(kv) == num_kv and all(1 <= k <= K for k in kv) and all(K < v < vocab for v in kv.values())
        scored = np.nonzero(m)[0]
        assert len(scored) == num_kv and (scored >= 2 * num_kv).all()
        assert sorted(row[scored].tolist()) == sorted(kv)  # every key queried once
        for t in scored:
            assert row[t + 1] == kv[row[t]]
        rest = np.ones(T + 1, bool)
        rest[:2 * num_kv] = False
        rest[scored] = rest[scored + 1] = False
        assert (row[rest] == 0).all()


@given(seed=st.integers(0, 1000), n=st.integers(1, 6), extra=st.integers(0, 10))
def test_copy_scored_targets_are_the_context_data_tokens_in_order(seed, n, extra):
    T = 2 * n + extra
    b = copy_batch(np.random.default_rng(seed), 2, T, n, 16)
    C = T - n
    for row, m in zip(b["tokens"], b["mask"]):
        data = row[:C][row[:C] != 0]
        assert len(data) == n and row[C] == 1 and (data >= 2).all()
        assert np.nonzero(m)[0].tolist() == list(range(C, C + n))
        assert row[C + 1:].tolist() == data.tolist()


def test_task_streams_are_pure_functions_of_seed_and_index():
    td = TaskData("mqar", 4, 63, 8, 64, seed=5)
    a, p = td.next_batch({"index": 7})
    b, _ = td.next_batch({"index": 7})
    assert p == {"index": 8} and (a["tokens"] == b["tokens"]).all()
    c, _ = td.next_batch({"index": 8})
    assert not (a["tokens"] == c["tokens"]).all()
    val = td.val_batches(2)
    assert not any((v["tokens"] == a["tokens"]).all() for v in val)


def test_masked_accuracy_scores_answers_only():
    b = mqar_batch(np.random.default_rng(0), 2, 31, 4, 32)
    tgt = b["tokens"][:, 1:]
    logits = np.eye(32)[tgt] * 5.0
    assert masked_accuracy(logits, b) == 1.0
    wrong = np.where(b["mask"][..., None] > 0, np.roll(logits, 1, axis=-1), logits)
    assert masked_accuracy(wrong, b) == 0.0


def test_bad_task_sizes_are_clear_errors():
    with pytest.raises(ValueError, match="must be >= 4 \\* num_kv"):
        TaskData("mqar", 2, 15, 8, 64)
    with pytest.raises(ValueError, match="num_kv must be in"):
        TaskData("mqar", 2, 255, 40, 64)
    with pytest.raises(ValueError, match="task must be one of"):
        TaskData("recall", 2, 15, 2, 64)
    with pytest.raises(ValueError, match="num_tokens"):
        TaskData("copy", 2, 10, 8, 64)

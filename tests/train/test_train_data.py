"""Byte tokenizer, JSONL streaming with clear errors, packing, seeded shuffling, resume, splits."""
import json

import msgpack
import numpy as np
import pytest
from hypothesis import given, strategies as st

import alloy  # noqa: F401

from alloy.train import corpus as C
from alloy.train.data import ByteTokenizer, PackedData, TextCorpus, jsonl_corpus, pack, read_jsonl, split_documents


@given(st.text(max_size=50).filter(lambda s: "\x00" not in s))
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(np.concatenate([ids, [tok.eos_id]])) == text


def _write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("".join(line + "\n" for line in lines))
    return p


def test_jsonl_text_and_tokens_documents(tmp_path):
    p = _write(tmp_path, "d.jsonl", [json.dumps({"text": "héllo"}), "", json.dumps({"tokens": [5, 6, 7]})])
    docs = list(read_jsonl(p, ByteTokenizer()))
    assert [n for n, _ in docs] == ["d.jsonl:1", "d.jsonl:3"]
    assert docs[0][1].tolist() == list("héllo".encode()) and docs[1][1].tolist() == [5, 6, 7]


@pytest.mark.parametrize("line, msg", [
    ('{"text": "a"', "d.jsonl:2: invalid JSON"),
    ('[1, 2]', "d.jsonl:2: expected a JSON object"),
    ('{"txt": "a"}', "d.jsonl:2: expected exactly one of 'text' or 'tokens'"),
    ('{"text": 3}', "d.jsonl:2: 'text' must be a string"),
    ('{"tokens": [1, "a"]}', "d.jsonl:2: 'tokens' must be a list of ints"),
    ('{"tokens": [1, 300]}', r"d.jsonl:2: token 300 out of range \[0, 256\)"),
])
def test_bad_jsonl_lines_name_file_and_line(tmp_path, line, msg):
    p = _write(tmp_path, "d.jsonl", [json.dumps({"text": "ok"}), line])
    with pytest.raises(ValueError, match=msg):
        list(read_jsonl(p, ByteTokenizer()))


def test_empty_and_missing_files(tmp_path):
    for content in ("", "\n  \n"):
        (tmp_path / "e.jsonl").write_text(content)
        with pytest.raises(ValueError, match=r"e.jsonl: empty file"):
            list(read_jsonl(tmp_path / "e.jsonl", ByteTokenizer()))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        jsonl_corpus(tmp_path / "nope.jsonl", ByteTokenizer(), 256, 0.0)


def test_packing_puts_eos_after_every_document_and_windows_cover_every_target():
    docs = [np.arange(1, 6), np.arange(10, 13), np.arange(20, 29)]
    stream = pack(docs, eos_id=0, vocab_size=256)
    assert stream.tolist() == [1, 2, 3, 4, 5, 0, 10, 11, 12, 0] + list(range(20, 29)) + [0]
    data = PackedData(stream, batch_size=2, seq_len=4, seed=3)
    n = data.n_windows
    assert n == (len(stream) - 1) // 4
    pos, seen = data.init_position(), []
    for _ in range(n // 2):
        b, pos = data.next_batch(pos)
        assert b["tokens"].shape == (2, 5) and b["tokens"].dtype == np.int32
        seen += [tuple(r) for r in b["tokens"]]
    # one epoch visits each window exactly once; windows overlap by one token, so each target
    # position of the stream (1 .. n*T) is predicted exactly once
    want = {tuple(stream[j * 4: j * 4 + 5]) for j in range(n)}
    assert set(seen) == want and len(seen) == n


def test_shuffle_is_seeded_and_resume_continues_exactly():
    stream = (np.arange(2000) % 251).astype(np.uint8)
    a = PackedData(stream, batch_size=3, seq_len=8, seed=1)
    straight, pos = [], a.init_position()
    for _ in range(200):  # crosses several epochs (83 windows)
        b, pos = a.next_batch(pos)
        straight.append(b["tokens"])
    pos = a.init_position()
    resumed = []
    for i in range(200):
        if i == 77:  # save and restore the position through msgpack
            pos = msgpack.unpackb(msgpack.packb(pos))
        b, pos = a.next_batch(pos)
        resumed.append(b["tokens"])
    assert all((x == y).all() for x, y in zip(straight, resumed))
    other = PackedData(stream, batch_size=3, seq_len=8, seed=2).next_batch({"epoch": 0, "index": 0})[0]
    assert not (other["tokens"] == straight[0]).all()
    e1 = a.next_batch({"epoch": 1, "index": 0})[0]
    assert not (e1["tokens"] == straight[0]).all()  # a new permutation each epoch


def test_validation_split_is_by_document_name_and_stable():
    docs = [(f"doc{i}", np.full(3, i % 200, np.uint8)) for i in range(500)]
    tr, va = split_documents(docs, 0.1)
    tr2, va2 = split_documents(list(reversed(docs)), 0.1)
    key = lambda xs: sorted(int(x[0]) for x in xs)  # noqa: E731
    assert key(va) == key(va2) and key(tr) == key(tr2)
    assert 20 < len(va) < 90 and len(tr) + len(va) == 500
    corpus = TextCorpus.from_documents("t", docs, 0, 256, 0.1)
    assert len(corpus.val) == 4 * len(va)
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(docs, 1.0)


def test_too_small_corpus_is_a_clear_error():
    with pytest.raises(ValueError, match="corpus too small"):
        PackedData(np.zeros(5, np.uint8), batch_size=1, seq_len=8)


def test_stdlib_corpus_is_deterministic_and_offline():
    files = C.stdlib_files()
    rels = [r for r, _ in files]
    assert rels == sorted(rels) and "os.py" in rels
    assert not any("site-packages" in r or "__pycache__" in r for r in rels)
    corpus = C.stdlib_corpus(val_fraction=0.2, max_bytes=200_000)
    again = C.stdlib_corpus(val_fraction=0.2, max_bytes=200_000)
    assert np.array_equal(corpus.train, again.train) and np.array_equal(corpus.val, again.val)
    assert len(corpus.train) + len(corpus.val) >= 200_000 and corpus.train.dtype == np.uint8
    first = files[0][1].read_bytes()
    text = corpus.train.tobytes() + corpus.val.tobytes()
    assert first[:200] in text

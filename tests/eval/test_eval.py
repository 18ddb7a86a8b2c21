"""Eval: scores equal sums of log-probs computed by hand from single unpadded ``model.apply`` calls."""
import json
import math
import types
from importlib import resources

import numpy as np
import pytest

import alloy  # noqa: F401
import mlx.core as mx

from alloy.eval import AlloyLM, evaluate_choices, parse_choice_item, perplexity, read_choice_jsonl


def _hand_logprobs(model, params, ids):
    """log p(ids[t] | ids[:t]) for t >= 1, numpy log-softmax of one batch-1 forward."""
    logits, _ = model.apply(params, mx.array([ids], dtype=mx.int32))
    z = np.array(logits.astype(mx.float32), dtype=np.float64)[0]
    logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    return np.array([logp[t - 1, ids[t]] for t in range(1, len(ids))]), logp


def _hand_choice_scores(model, params, tok, item):
    ctx = tok.encode(item.context)
    out = []
    for c in item.continuations:
        cont = tok.encode(c)
        lp, _ = _hand_logprobs(model, params, ctx + cont)
        out.append(float(lp[len(ctx) - 1:].sum()))
    return out


@pytest.mark.parametrize("sample", ["mmlu_sample.jsonl", "hellaswag_sample.jsonl"])
def test_choice_scores_and_predictions_equal_hand_computation(loaded, sample):
    model, params, tok = loaded
    items = read_choice_jsonl(resources.files("alloy") / "data" / "eval" / sample)
    assert len(items) >= 5
    r = evaluate_choices(model, params, tok, items, batch_size=3)  # batches mix rows of several lengths
    for item, p in zip(items, r["predictions"]):
        hand = _hand_choice_scores(model, params, tok, item)
        np.testing.assert_allclose(p["scores"], hand, rtol=1e-4, atol=1e-3)
        assert p["pred"] == int(np.argmax(hand))
        norm = [s / len(c.encode()) for s, c in zip(hand, item.continuations)]
        assert p["pred_norm"] == int(np.argmax(norm))
    assert r["acc"] == np.mean([p["pred"] == it.label for p, it in zip(r["predictions"], items)])


def test_item_formats_and_errors():
    a = parse_choice_item({"question": "Q?", "choices": ["x", "y"], "answer": 1})
    assert a.context == "Question: Q?\nAnswer:" and a.continuations == (" x", " y") and a.label == 1
    b = parse_choice_item({"ctx": "C", "endings": ["e1", "e2", "e3"], "label": 2})
    assert b.context == "C" and b.continuations == (" e1", " e2", " e3")
    with pytest.raises(ValueError, match="'answer' must be an int in \\[0, 2\\)"):
        parse_choice_item({"question": "Q", "choices": ["x", "y"], "answer": 2})
    with pytest.raises(ValueError, match="'endings' must be a list"):
        parse_choice_item({"ctx": "C", "endings": "abc", "label": 0})
    with pytest.raises(ValueError, match="expected MMLU-style keys"):
        parse_choice_item({"text": "x"})


def test_perplexity_equals_hand_sum_over_windows(loaded):
    model, params, tok = loaded
    texts = ["héllo wörld, a tiny document", "x = [i * i for i in range(10)]\n"]
    bos = tok.eos_token_ids[0]
    for seq_len in (7, 1000):
        r = perplexity(model, params, tok, texts, seq_len=seq_len, batch_size=2)
        nll, n = 0.0, 0
        for t in texts:
            ids = [bos] + tok.encode(t)
            for a in range(0, len(ids) - 1, seq_len):
                lp, _ = _hand_logprobs(model, params, ids[a:a + seq_len + 1])
                nll -= lp.sum()
                n += len(lp)
        n_bytes = sum(len(t.encode()) for t in texts)
        assert r["tokens"] == n == n_bytes  # byte tokenizer with a BOS: every byte is predicted
        assert r["nll"] == pytest.approx(nll, rel=1e-5)
        assert r["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)
        assert r["bits_per_byte"] == pytest.approx(nll / (n_bytes * math.log(2)), rel=1e-5)


def _req(*args):
    return types.SimpleNamespace(args=args)  # duck-types lm_eval's Instance


def test_harness_adapter_methods(loaded):
    model, params, tok = loaded
    lm = AlloyLM(model, params, tok, batch_size=2, max_gen_toks=12)
    ctx = "The answer is"
    for k in range(200):  # a context whose greedy next token (by hand) is printable ASCII
        gctx = f"{k}:"
        _, logp = _hand_logprobs(model, params, tok.encode(gctx))
        nxt = int(np.argmax(logp[-1]))
        if 32 <= nxt < 127:
            break
    reqs = [_req(ctx, " forty-two"), _req(gctx, chr(nxt)), _req("", "standalone")]
    out = lm.loglikelihood(reqs)
    lp, _ = _hand_logprobs(model, params, tok.encode(ctx + " forty-two"))
    assert out[0][0] == pytest.approx(lp[len(tok.encode(ctx)) - 1:].sum(), rel=1e-4)
    assert out[0][1] is False and out[1][1] is True
    lp, _ = _hand_logprobs(model, params, [tok.eos_token_ids[0]] + tok.encode("standalone"))
    assert out[2][0] == pytest.approx(lp.sum(), rel=1e-4)

    (roll,) = lm.loglikelihood_rolling([_req("rolling text")])
    lp, _ = _hand_logprobs(model, params, [tok.eos_token_ids[0]] + tok.encode("rolling text"))
    assert roll == pytest.approx(lp.sum(), rel=1e-4)

    from alloy.inference.generate import generate
    full = "".join(e.text for e in generate(model, params, tok.encode(ctx), max_tokens=12, tokenizer=tok,
                                            stop_tokens=tok.eos_token_ids))
    (plain,) = lm.generate_until([_req(ctx, {"max_gen_toks": 12})])
    assert plain == full
    stop = next(full[i:i + 1] for i in range(2, len(full)) if full[i].isascii() and full[i].isprintable())
    (cut,) = lm.generate_until([_req(ctx, {"until": [stop], "max_gen_toks": 12, "do_sample": False})])
    assert cut == full[:full.index(stop)]


def test_cli_choice_and_perplexity(checkpoint, tmp_path, capsys):
    from alloy.cli import main
    assert main(["eval", "choice", "--model", str(checkpoint), "--data", "sample:mmlu", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["items"] == 6 and 0 <= r["acc"] <= 1
    data = tmp_path / "t.jsonl"
    data.write_text('{"text": "hello there"}\n{"text": "general kenobi"}\n')
    assert main(["eval", "perplexity", "--model", str(checkpoint), "--data", str(data), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["documents"] == 2 and r["tokens"] == len("hello there") + len("general kenobi")
    assert main(["eval", "perplexity", "--model", str(checkpoint), "--max-bytes", "3000", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["bytes"] >= 3000 * 0.9 and r["bits_per_byte"] > 0

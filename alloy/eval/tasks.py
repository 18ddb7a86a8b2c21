"""Perplexity / bits-per-byte and multiple-choice log-likelihood scoring.

Perplexity. Each document is tokenized, prefixed with the tokenizer's first EOS id when it has one
(so every text token is predicted; otherwise the first token is context only), and cut into windows
of at most ``seq_len`` predicted tokens; window k starts where window k-1 ended, conditioned on that
one preceding token. With N predicted tokens, total negative log-likelihood L (nats) and B the UTF-8
bytes of the predicted text:

    ppl = exp(L / N)            bits_per_byte = L / (B ln 2)

Bits per byte compares models with different tokenizers; for a byte tokenizer N = B.

Multiple choice. JSONL, one item per line, in either format (see docs/eval.md):

    MMLU-style       {"question": str, "choices": [str, ...], "answer": int}
                     context "Question: {question}\\nAnswer:", continuations " {choice}"
    HellaSwag-style  {"ctx": str, "endings": [str, ...], "label": int}
                     context ctx, continuations " {ending}"

Each choice is scored by the summed log-likelihood of its continuation given the context; the
prediction is the argmax (``acc``) and the argmax of the sum divided by the continuation's UTF-8
byte length (``acc_norm``, as lm-evaluation-harness does with characters).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from alloy.eval.scoring import continuation_logprobs, sequence_logprobs
from alloy.train.data import iter_jsonl


# ---------------------------------------------------------------------------------------------
# perplexity

def perplexity(model, params, tokenizer, texts: Iterable[str], seq_len: int = 512,
               batch_size: int = 8) -> dict:
    """{"documents", "tokens", "bytes", "nll" (nats), "ppl", "bits_per_byte"} over ``texts``."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"perplexity: seq_len must be a positive int, got {seq_len!r}")
    bos = list(tokenizer.eos_token_ids[:1]) if getattr(tokenizer, "eos_token_ids", ()) else []
    windows, n_docs, n_bytes = [], 0, 0
    for text in texts:
        ids = list(bos) + list(tokenizer.encode(text))
        if len(ids) < 2:
            continue
        n_docs += 1
        n_bytes += len(text.encode("utf-8")) if bos else len(tokenizer.decode(ids[1:]).encode("utf-8"))
        for a in range(0, len(ids) - 1, seq_len):
            windows.append(ids[a:a + seq_len + 1])
    if not windows:
        raise ValueError("perplexity: no document with at least 2 tokens")
    nll, n_tok = 0.0, 0
    for lp, _ in sequence_logprobs(model, params, windows, batch_size):
        nll -= float(np.sum(lp))
        n_tok += len(lp)
    return {"documents": n_docs, "tokens": n_tok, "bytes": n_bytes, "nll": nll, "ppl": math.exp(nll / n_tok),
            "bits_per_byte": nll / (n_bytes * math.log(2)) if n_bytes else float("nan")}


def read_text_jsonl(path) -> list[str]:
    """The "text" field of every line of a JSONL file (errors name the file and line)."""
    out = []
    for where, _, obj in iter_jsonl(path):
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ValueError(f"{where}: expected an object with a string 'text'")
        out.append(obj["text"])
    if not out:
        raise ValueError(f"{path}: no documents")
    return out


def stdlib_texts(max_bytes: int = 200_000, split: str = "val", val_fraction: float = 0.01) -> list[str]:
    """Text of the embedded ``stdlib`` corpus (``alloy.train.corpus``): the files of its validation
    split (``split="val"``, held out from ``alloy train``) or all files, up to ``max_bytes``."""
    from alloy.train.corpus import stdlib_files
    from alloy.train.data import _is_val

    if split not in ("val", "all"):
        raise ValueError(f"stdlib_texts: split must be 'val' or 'all', got {split!r}")
    out, total = [], 0
    for rel, path in stdlib_files():
        if split == "val" and not _is_val(rel, val_fraction):
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        if not text:
            continue
        text = text[:max(max_bytes - total, 0)]
        out.append(text)
        total += len(text.encode("utf-8"))
        if total >= max_bytes:
            break
    return out


# ---------------------------------------------------------------------------------------------
# multiple choice

@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice item: a context, candidate continuations and the index of the right one."""

    context: str
    continuations: tuple
    label: int


def parse_choice_item(obj, where: str = "item") -> ChoiceItem:
    """An MMLU-style or HellaSwag-style JSON object -> ChoiceItem (errors name ``where``)."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object")
    if "question" in obj:
        ctx, choices, label, names = obj.get("question"), obj.get("choices"), obj.get("answer"), \
            ("question", "choices", "answer")
        context = f"Question: {ctx}\nAnswer:" if isinstance(ctx, str) else None
    elif "ctx" in obj:
        ctx, choices, label, names = obj.get("ctx"), obj.get("endings"), obj.get("label"), ("ctx", "endings", "label")
        context = ctx
    else:
        raise ValueError(f"{where}: expected MMLU-style keys (question, choices, answer) or HellaSwag-style "
                         f"keys (ctx, endings, label), got {sorted(obj)}")
    if not isinstance(ctx, str) or not ctx:
        raise ValueError(f"{where}: '{names[0]}' must be a non-empty string")
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)):
        raise ValueError(f"{where}: '{names[1]}' must be a list of >= 2 non-empty strings")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise ValueError(f"{where}: '{names[2]}' must be an int in [0, {len(choices)}), got {label!r}")
    return ChoiceItem(context, tuple(" " + c for c in choices), label)


def read_choice_jsonl(path) -> list[ChoiceItem]:
    items = []
    for where, _, obj in iter_jsonl(path):
        items.append(parse_choice_item(obj, where))
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def score_choices(model, params, tokenizer, item: ChoiceItem, batch_size: int = 16) -> list[float]:
    """Summed log-likelihood of each continuation of ``item`` given its context."""
    ctx = list(tokenizer.encode(item.context))
    pairs = [(ctx, list(tokenizer.encode(c))) for c in item.continuations]
    return [s for s, _, _ in continuation_logprobs(model, params, pairs, batch_size)]


def evaluate_choices(model, params, tokenizer, items: Sequence[ChoiceItem], batch_size: int = 16) -> dict:
    """{"items", "acc", "acc_norm", "predictions": [{"pred", "pred_norm", "label", "scores"}]}."""
    preds = []
    for item in items:
        scores = score_choices(model, params, tokenizer, item, batch_size)
        norm = [s / len(c.encode("utf-8")) for s, c in zip(scores, item.continuations)]
        preds.append({"pred": int(np.argmax(scores)), "pred_norm": int(np.argmax(norm)), "label": item.label,
                      "scores": scores})
    n = len(preds)
    return {"items": n, "acc": sum(p["pred"] == p["label"] for p in preds) / n,
            "acc_norm": sum(p["pred_norm"] == p["label"] for p in preds) / n, "predictions": preds}

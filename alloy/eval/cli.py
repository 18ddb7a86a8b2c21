"""``alloy eval``: perplexity / bits-per-byte and multiple-choice accuracy.

    alloy eval perplexity --model CKPT [--data stdlib | FILE.jsonl] [--max-bytes 200000] [--seq-len 512]
    alloy eval choice --model CKPT --data FILE.jsonl | sample:mmlu | sample:hellaswag

Prints one JSON object (``--json``) or a short summary.
"""
from __future__ import annotations

import json
import time
from importlib import resources


def _sample(name: str) -> str:
    files = {"mmlu": "mmlu_sample.jsonl", "hellaswag": "hellaswag_sample.jsonl"}
    if name not in files:
        raise ValueError(f"--data sample:{name}: known samples are {sorted(files)}")
    return str(resources.files("alloy") / "data" / "eval" / files[name])


def _perplexity(args):
    from alloy.eval.tasks import perplexity, read_text_jsonl, stdlib_texts
    from alloy.tokenizer import load_model_and_tokenizer
    model, params, tok = load_model_and_tokenizer(args.model)
    if args.data == "stdlib":
        texts = stdlib_texts(args.max_bytes, args.split)
        source = f"stdlib ({args.split} split, {args.max_bytes} bytes max)"
    else:
        texts, source = read_text_jsonl(args.data), args.data
    t0 = time.perf_counter()
    r = perplexity(model, params, tok, texts, seq_len=args.seq_len, batch_size=args.batch_size)
    r.update(data=source, seconds=round(time.perf_counter() - t0, 2))
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{source}: {r['documents']} documents, {r['tokens']} tokens, {r['bytes']} bytes\n"
              f"perplexity {r['ppl']:.3f}   bits/byte {r['bits_per_byte']:.4f}   ({r['seconds']} s)")


def _choice(args):
    from alloy.eval.tasks import evaluate_choices, read_choice_jsonl
    from alloy.tokenizer import load_model_and_tokenizer
    path = _sample(args.data[7:]) if args.data.startswith("sample:") else args.data
    model, params, tok = load_model_and_tokenizer(args.model)
    items = read_choice_jsonl(path)
    if args.limit:
        items = items[:args.limit]
    r = evaluate_choices(model, params, tok, items, batch_size=args.batch_size)
    r["data"] = args.data
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{args.data}: {r['items']} items   acc {r['acc']:.3f}   acc_norm {r['acc_norm']:.3f}")


def register(sub) -> None:
    p = sub.add_parser("eval", help="perplexity / bits-per-byte and multiple-choice accuracy")
    ev = p.add_subparsers(dest="eval_command", required=True)
    a = ev.add_parser("perplexity", help="perplexity and bits per byte on text")
    a.add_argument("--model", required=True, help="checkpoint directory")
    a.add_argument("--data", default="stdlib", help="'stdlib' (the embedded corpus) or a JSONL of {\"text\": ...}")
    a.add_argument("--split", default="val", choices=("val", "all"), help="stdlib files: held-out split or all")
    a.add_argument("--max-bytes", type=int, default=200_000, help="stdlib: stop after this many bytes")
    a.add_argument("--seq-len", type=int, default=512, help="predicted tokens per window")
    a.add_argument("--batch-size", type=int, default=8)
    a.add_argument("--json", action="store_true")
    a.set_defaults(fn=_perplexity)
    c = ev.add_parser("choice", help="multiple-choice log-likelihood accuracy (MMLU / HellaSwag style)")
    c.add_argument("--model", required=True, help="checkpoint directory")
    c.add_argument("--data", required=True, help="JSONL file, or sample:mmlu / sample:hellaswag")
    c.add_argument("--limit", type=int, default=0, help="first N items only (0 = all)")
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=_choice)



"""``alloy bench`` and ``alloy generate`` subcommands.

    alloy bench --config hybrid-tiny --prompt-len 512 --gen-len 128 --batch 1 [--quantize 4]
    alloy generate --config hybrid-tiny --prompt "Hello" --max-tokens 64 --temperature 0.8

``--config`` takes a bundled config name (``alloy/configs/<name>.json``), a JSON file or JSON text
(random weights from ``--seed``); ``--checkpoint`` an Alloy checkpoint directory instead.
``generate`` streams over byte-level tokens (ids 0..255 are UTF-8 bytes), so it needs a model with
vocab_size >= 256.
"""
from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path

import mlx.core as mx


def _config_source(text: str):
    if text.lstrip().startswith("{") or Path(text).is_file():
        return text
    path = resources.files("alloy") / "configs" / f"{text}.json"
    if not path.is_file():
        names = sorted(p.name[:-5] for p in (resources.files("alloy") / "configs").iterdir()
                       if p.name.endswith(".json"))
        raise ValueError(f"--config {text!r} is not a JSON file, JSON text or bundled config {names}")
    return str(path)


def load_model(args):
    """(model, params) from --checkpoint or --config (+ --dtype, --seed, --quantize), prepared for
    decoding (`prepare_decode`)."""
    import dataclasses

    from alloy.inference.generate import prepare_decode
    from alloy.model import as_config, build
    from alloy.params.quantize import quantize

    args.tokenizer = None
    if args.checkpoint:  # an Alloy / HF checkpoint or an `alloy train` run directory, with its tokenizer
        from alloy.tokenizer import load_model_and_tokenizer
        model, params, args.tokenizer = load_model_and_tokenizer(args.checkpoint)
    else:
        cfg = as_config(_config_source(args.config or "hybrid-tiny"))
        if args.dtype:
            cfg = dataclasses.replace(cfg, dtype=args.dtype)
        model = build(cfg)
        params = model.init(mx.random.key(args.seed))
    if args.quantize:
        params = quantize(params, bits=args.quantize, group_size=args.group_size,
                          embeddings=args.quantize_embeddings)
    mx.eval(params)
    return model, prepare_decode(model, params)


def _model_flags(p):
    g = p.add_mutually_exclusive_group()
    g.add_argument("--config", default=None, help="bundled config name, JSON file or JSON text "
                                                  "(default: hybrid-tiny)")
    g.add_argument("--checkpoint", default=None, help="Alloy checkpoint directory")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="override the config's dtype (random weights only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantize", type=int, choices=(4, 8), default=None, help="affine group quantization")
    p.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128))
    p.add_argument("--quantize-embeddings", action="store_true")


def default_chunk() -> int:
    """The prefill chunk when --chunk is not given: 2048 tokens on a GPU (one launch sequence per
    2,048-token prompt: 60,880 vs 24,490 tok/s at 512 for the Mamba-2 1.3B shape on an H100), 512 on
    the CPU (smaller activations)."""
    return 2048 if mx.default_device() == mx.gpu else 512


def _bench(args):
    from alloy.inference.bench import format_result, run
    model, params = load_model(args)
    r = run(model, params, prompt_len=args.prompt_len, gen_len=args.gen_len, batch=args.batch,
            prefill_chunk=args.chunk or default_chunk(), seed=args.seed, repeats=args.repeats, kv_bits=args.kv_bits)
    if args.kv_bits:
        r["kv_bits"] = args.kv_bits
    if args.quantize:
        r["quantize"] = {"bits": args.quantize, "group_size": args.group_size}
    if args.hardware:
        r["roofline"] = roofline_fraction(model, r, args.hardware, args.quantize, args.group_size)
    print(json.dumps(r) if args.json else format_result(r))
    if args.hardware and not args.json:
        f = r["roofline"]
        print(f"roofline on {f['hardware']}: prefill {f['prefill_tok_s']:,.0f} tok/s "
              f"({100 * f['prefill_fraction']:.1f}% reached), decode {f['decode_tok_s']:,.0f} tok/s "
              f"({100 * f['decode_fraction']:.1f}% reached)")


def roofline_fraction(model, r: dict, hardware: str, bits=None, group_size: int = 64) -> dict:
    """The measured rates as fractions of the analytic roofline (``alloy.roofline``) for the same
    shapes: prefill of the whole prompt, and decode at the midpoint context of the generation."""
    from alloy.roofline import roofline
    wd = f"int{bits}-g{group_size}" if bits else None
    pre = roofline(model.config, hardware, "prefill", batch=r["batch"], seq_len=r["prompt_len"], weight_dtype=wd)
    dec = roofline(model.config, hardware, "decode", batch=r["batch"],
                   context=r["prompt_len"] + r["gen_len"] // 2, weight_dtype=wd)
    p_tps, d_tps = r["batch"] * r["prompt_len"] / pre.time_s, r["batch"] / dec.time_s
    return {"hardware": hardware, "prefill_tok_s": p_tps, "decode_tok_s": d_tps,
            "prefill_fraction": r["prompt_tok_s"] / p_tps, "decode_fraction": r["decode_tok_s"] / d_tps}


def _generate(args):
    from alloy.inference.generate import ByteTokenizer, generate
    model, params = load_model(args)
    tokenizer = args.tokenizer
    if tokenizer is None:
        if model.config.vocab_size < 256:
            raise ValueError(f"generate: byte-level prompts need vocab_size >= 256, the model has "
                             f"{model.config.vocab_size}")
        tokenizer = ByteTokenizer()
    ev = None
    for ev in generate(model, params, args.prompt, max_tokens=args.max_tokens, tokenizer=tokenizer,
                       stop_tokens=tuple(getattr(tokenizer, "eos_token_ids", ())),
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                       stop_strings=tuple(args.stop), seed=args.seed, prefill_chunk=args.chunk or default_chunk(),
                       kv_bits=args.kv_bits):
        sys.stdout.write(ev.text)
        sys.stdout.flush()
    if ev is not None:
        n = ev.index + 1
        rate = (n - 1) / (ev.elapsed - ev.ttft) if n > 1 and ev.elapsed > ev.ttft else float("nan")
        print(f"\n[{n} tokens, TTFT {ev.ttft * 1e3:.1f} ms, {rate:.1f} tok/s decode, "
              f"finish: {ev.finish_reason}]", file=sys.stderr)


def register(sub) -> None:
    b = sub.add_parser("bench", help="time prefill, decode and TTFT on random-token prompts")
    _model_flags(b)
    b.add_argument("--prompt-len", type=int, default=512)
    b.add_argument("--gen-len", type=int, default=128)
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--chunk", type=int, default=None, help="prefill chunk length (default: 2048 on a GPU, 512 on the CPU)")
    b.add_argument("--repeats", type=int, default=1, help="timed runs (the best is reported)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--kv-bits", type=int, choices=(4, 8), default=None,
                   help="store attention KV caches quantized (affine groups along the head dim)")
    b.add_argument("--hardware", default=None,
                   help="also print the fraction of this hardware's roofline reached (e.g. H100, M3-Max)")
    b.set_defaults(fn=_bench)

    g = sub.add_parser("generate", help="stream a completion over byte-level tokens")
    _model_flags(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--kv-bits", type=int, choices=(4, 8), default=None,
                   help="store attention KV caches quantized (affine groups along the head dim)")
    g.add_argument("--chunk", type=int, default=None, help="prefill chunk length (default: 2048 on a GPU, 512 on the CPU)")
    g.set_defaults(fn=_generate)

"""``alloy serve --model PATH [--host 127.0.0.1] [--port 8000]``: run the OpenAI-compatible API.

Binds to loopback unless ``--host`` says otherwise (the API has no authentication).
"""
from __future__ import annotations

import sys
from pathlib import Path


def build_engine(args):
    """(engine, model name) from parsed arguments (loads the model and tokenizer)."""
    from alloy.inference.generate import prepare_decode
    from alloy.inference.prefix_cache import PrefixCache
    from alloy.serve.engine import Engine
    from alloy.tokenizer import load_model_and_tokenizer

    model, params, tok = load_model_and_tokenizer(args.model)
    params = prepare_decode(model, params)  # once at load: e.g. the whole-stack decode kernel's weights
    cache = PrefixCache(max_bytes=args.prefix_cache_mb << 20, every=args.snapshot_every) \
        if args.prefix_cache_mb > 0 else None
    engine = Engine(model, params, tok, max_len=args.max_len, max_active=args.max_active,
                    max_queue=args.max_queue, prefix_cache=cache, prefill_chunk=args.chunk)
    name = args.model_name or Path(args.model).resolve().name
    return engine, name


def _serve(args):
    try:
        import uvicorn
    except ImportError:
        raise ValueError("alloy serve needs the serve extra: pip install 'alloy[serve]'") from None
    from alloy.serve.app import create_app

    engine, name = build_engine(args)
    app = create_app(engine, name, max_body_bytes=args.max_body_kb << 10)
    print(f"alloy serve: model '{name}' at http://{args.host}:{args.port}/v1 "
          f"(context {args.max_len}, {args.max_active} active)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API (completions, chat, streaming)")
    p.add_argument("--model", required=True, help="checkpoint directory (Alloy, Hugging Face or an alloy "
                                                 "train run directory)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="the model id clients use (default: directory name)")
    p.add_argument("--max-len", type=int, default=2048, help="context length: prompt + max_tokens")
    p.add_argument("--max-active", type=int, default=8, help="requests generating at once (interleaved)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond which 429 is returned")
    p.add_argument("--max-body-kb", type=int, default=1024, help="largest request body accepted")
    p.add_argument("--prefix-cache-mb", type=int, default=1024, help="prefix cache size (0 = off)")
    p.add_argument("--snapshot-every", type=int, default=256, help="prefix snapshots every N prompt tokens")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk length")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(fn=_serve)

"""``alloy roofline CONFIG --hardware H100 --mode decode --context 32768``."""
from __future__ import annotations

import json

from alloy.roofline.hardware import PRESETS
from alloy.roofline.report import MODES, roofline


def run(args) -> None:
    report = roofline(args.config, args.hardware, args.mode, batch=args.batch, seq_len=args.seq_len,
                      context=args.context, chunk=args.chunk, dtype=args.dtype,
                      weight_dtype=args.weight_dtype, kv_dtype=args.kv_dtype,
                      compute_dtype=args.compute_dtype)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_markdown())


def register(sub) -> None:
    """``alloy roofline``."""
    p = sub.add_parser("roofline", help="analytical FLOPs / bytes / bottleneck / time of a config",
                       description="Roofline of a model config (a JSON path or a bundled name such as "
                                   "hybrid-tiny) on a hardware preset. Nothing is built or run.")
    p.add_argument("config", help="ModelConfig JSON path or bundled config name")
    p.add_argument("--hardware", default="H100", help=f"preset: {', '.join(PRESETS)} (default H100)")
    p.add_argument("--mode", default="decode", choices=MODES)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=None, help="prefill length (default 2048)")
    p.add_argument("--context", type=int, default=None, help="cached tokens for decode / mini-prefill (default 4096)")
    p.add_argument("--chunk", type=int, default=None, help="mini-prefill chunk length (default --seq-len or 512)")
    p.add_argument("--dtype", default=None, help="activation dtype fp32 / bf16 / fp16 (default: the config's)")
    p.add_argument("--weight-dtype", default=None, help="fp32 / bf16 / fp16 / fp8 / int8[-gN] / int4[-gN]")
    p.add_argument("--kv-dtype", default=None, help="KV cache dtype (default: --dtype)")
    p.add_argument("--compute-dtype", default=None, help="matmul compute dtype (default: --dtype)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(fn=run)

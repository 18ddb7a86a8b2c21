"""``alloy`` command line."""
from __future__ import annotations

import argparse
import sys

import alloy  # noqa: F401  (OpenBLAS before mlx)


def _demo(args):
    from alloy import demo
    demo.run(args.config, batch=args.batch, prompt_len=args.prompt_len, decode_steps=args.steps,
             seed=args.seed)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="alloy", description="Hybrid SSM-Attention language models on MLX")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="build the bundled hybrid, run, compile and time it")
    d.add_argument("--config", default=None, help="model config JSON (default: bundled hybrid-tiny)")
    d.add_argument("--batch", type=int, default=4)
    d.add_argument("--prompt-len", type=int, default=256)
    d.add_argument("--steps", type=int, default=32, help="decode steps to time")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=_demo)
    args = p.parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"alloy: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

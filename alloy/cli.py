"""``alloy`` command line."""
from __future__ import annotations

import argparse
import sys

import alloy  # noqa: F401  (OpenBLAS before mlx)


import importlib

# Each module contributes subcommands through ``register(subparsers)``; a module that is not part of
# this build (its package is absent) is skipped, so areas can land independently.
COMMAND_MODULES = ("alloy.demo", "alloy.train.cli", "alloy.inference.cli", "alloy.roofline.cli",
                   "alloy.research.cli", "alloy.convert.cli", "alloy.serve.cli", "alloy.eval.cli", "alloy.chat")


def _load(name):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            return None
        raise


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="alloy", description="Hybrid SSM-Attention language models on MLX")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        mod = _load(name)
        if mod is not None:
            mod.register(sub)
    args = p.parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"alloy: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``alloy research --budget-minutes M --space SPACE.yaml [--out DIR] [--max-experiments N]``."""
from __future__ import annotations

import dataclasses


def run(args) -> None:
    from alloy.research.runner import run_research
    from alloy.research.space import load_space
    if args.budget_minutes <= 0:
        raise ValueError(f"--budget-minutes must be positive, got {args.budget_minutes}")
    space = load_space(args.space)
    if args.seed is not None:
        space = dataclasses.replace(space, seed=args.seed)
    run_research(space, args.out, args.budget_minutes * 60.0, args.max_experiments)


def register(sub) -> None:
    """``alloy research``."""
    p = sub.add_parser(
        "research", help="architecture search: train each proposal for a fixed wall-clock budget",
        description="Runs experiments from a search space (layer pattern, depth, width, state size, heads, "
                    "KV heads), each trained for --budget-minutes of wall-clock time on the embedded stdlib "
                    "byte corpus; records validation bits per byte in OUT/results.jsonl, results.md and "
                    "results.png. Re-running the same command resumes.")
    p.add_argument("--budget-minutes", type=float, required=True,
                   help="training wall-clock budget of each experiment, in minutes (e.g. 0.5)")
    p.add_argument("--space", default="space",
                   help="search space YAML (default: the bundled alloy/configs/research/space.yaml)")
    p.add_argument("--out", default="runs/research", help="results directory (default runs/research)")
    p.add_argument("--max-experiments", type=int, default=None,
                   help="stop once this many experiments are recorded (default: the space's max_experiments)")
    p.add_argument("--seed", type=int, default=None,
                   help="override the space's seed (model init, data order, proposals): a replicate run")
    p.set_defaults(fn=run)

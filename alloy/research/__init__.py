"""Autoresearch: architectures from a search space, each trained for a fixed wall-clock budget on the
embedded stdlib byte corpus, scored by validation bits per byte; the next one proposed from the
results so far. See ``alloy.research.runner`` for the strategy and docs/research.md for a run.

    from alloy.research import load_space, run_research
    run_research(load_space("space"), "runs/research", budget_s=60, max_experiments=6)
"""
from alloy.research.runner import (  # noqa: F401
    load_results,
    propose,
    results_markdown,
    run_experiment,
    run_research,
)
from alloy.research.space import SearchSpace, TrainSettings, experiment_id, load_space, parse_space  # noqa: F401

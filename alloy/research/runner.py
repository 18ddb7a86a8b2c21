"""Autoresearch: train architectures from a search space for a fixed wall-clock budget each, record
validation bits per byte, propose the next one from the results so far.

    results = run_research(load_space("space"), out_dir="runs/research", budget_s=60, max_experiments=6)

One experiment (``run_experiment``):

1. config = ``space.to_config(point)``; float32 params from ``model.init(key(seed))``.
2. train with ``alloy.train``: AdamW (decoupled decay on matrices), constant lr after a linear
   warmup (a wall-clock budget fixes no step count, so no decay schedule), global-norm clipping, the
   compiled step; batches of ``batch_size`` windows of ``seq_len + 1`` bytes of the ``stdlib``
   corpus (the first ``corpus_bytes`` bytes of the Python standard library's sources; files held
   out by name for validation). The first step (tracing and compiling) is timed separately; the
   budget then counts every further step until ``budget_s`` seconds of training have passed.
3. validation: mean cross-entropy over the same ``eval_batches`` x ``batch_size`` x ``seq_len``
   held-out bytes for every experiment, in bits: ``val_bpb = loss_nats / ln 2`` (one token = one
   byte).

The driver (``run_research``) keeps ``results.jsonl`` (one JSON record per finished experiment),
``results.md`` (the table, best first, and the best per pattern) and ``results.png`` (the plot) in
``out_dir``, rewriting each atomically after every experiment. Resuming is re-running the same
command: finished experiments (same point, training settings and budget, hence the same id) are
skipped, and the next point depends only on the results recorded so far.

Proposal strategy (``propose``), documented and deterministic: the ``start`` points first, in
order; then "mutate the best": take the point with the lowest val_bpb so far and change one
dimension (probability 0.7) or two, each to a neighbouring value (the next smaller or larger entry
of an ordered dimension, any other entry of ``pattern``); skip invalid points (e.g. heads not
dividing d_model) and points already run -- "already run" compares the model config a point makes,
so changing a dimension the pattern ignores (d_state of pure attention) is not a new experiment;
RNG ``random.Random(f"{seed}:{n_results}")``. After 200 failed draws, the first unseen valid point
of the grid in a seeded random order (or of 10,000 random draws for a grid over 100,000 points);
None when nothing unseen is left.
"""
from __future__ import annotations

import functools
import itertools
import json
import math
import random
import time
from pathlib import Path
from typing import Callable

import mlx.core as mx

from alloy.params.io import atomic_path, atomic_write
from alloy.research.space import SearchSpace, experiment_id, neighbours

RESULTS_JSONL, RESULTS_MD, RESULTS_PNG = "results.jsonl", "results.md", "results.png"


@functools.lru_cache(maxsize=2)
def _corpus(corpus_bytes: int, val_fraction: float):
    from alloy.train.corpus import stdlib_corpus
    return stdlib_corpus(val_fraction=val_fraction, max_bytes=corpus_bytes)


def run_experiment(space: SearchSpace, point: dict, budget_s: float, log: Callable = print,
                   return_params: bool = False):
    """Train ``point`` for ``budget_s`` seconds (after the first, compiling step); return its record
    (and the trained params with ``return_params``)."""
    from alloy.model import build
    from alloy.params.tree import count_params
    from alloy.train import adamw, bits_per_token, constant, make_eval_fn, make_train_step

    point = space.complete(point)
    t = space.train
    cfg = space.to_config(point)
    corpus = _corpus(t.corpus_bytes, t.val_fraction)
    val = corpus.val_batches(t.batch_size, t.seq_len, t.eval_batches)
    if not val:
        raise ValueError(f"train.corpus_bytes {t.corpus_bytes} leaves no validation batch of "
                         f"{t.seq_len + 1} bytes; raise corpus_bytes or val_fraction")
    model = build(cfg)
    params = model.init(mx.random.key(space.seed))
    opt = adamw(weight_decay=t.weight_decay)
    opt_state = opt.init(params)
    step = make_train_step(model, opt, constant(t.lr, t.warmup), clip_norm=t.clip)
    loader = corpus.loader(t.batch_size, t.seq_len, space.seed)
    pos = loader.init_position()
    key = mx.random.key(space.seed + 1)
    n_params = count_params(params)
    log(f"[research] {experiment_id(space, point, budget_s)}: {cfg.n_layers} layers "
        f"{'/'.join(dict.fromkeys(cfg.layer_types))}, d_model {cfg.d_model}, {n_params:,} params")

    losses = []

    def one_step(params, opt_state, pos, key):
        batch, pos = loader.next_batch(pos)
        key, sub = mx.random.split(key)
        params, opt_state, m = step(params, opt_state, {"tokens": mx.array(batch["tokens"])}, sub)
        mx.eval(params, opt_state, m["loss"])
        losses.append(m["loss"].item())
        return params, opt_state, pos, key

    t0 = time.perf_counter()
    params, opt_state, pos, key = one_step(params, opt_state, pos, key)
    compile_s = time.perf_counter() - t0
    steps, t0 = 1, time.perf_counter()
    while time.perf_counter() - t0 < budget_s:
        params, opt_state, pos, key = one_step(params, opt_state, pos, key)
        steps += 1
    train_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    eval_fn = make_eval_fn(model)
    loss_sum = count = 0.0
    for b in val:
        ls, c, _ = eval_fn(params, {"tokens": mx.array(b["tokens"])})
        loss_sum += ls.item()
        count += c.item()
    val_bpb = bits_per_token(loss_sum / count)
    tail = losses[-10:]
    rec = {
        "id": experiment_id(space, point, budget_s), "point": point, "layer_types": list(cfg.layer_types),
        "params": n_params, "steps": steps, "tokens": steps * t.batch_size * t.seq_len,
        "train_bpb": bits_per_token(sum(tail) / len(tail)), "val_bpb": val_bpb, "val_bytes": int(count),
        "budget_s": budget_s, "train_s": round(train_s, 3), "compile_s": round(compile_s, 3),
        "eval_s": round(time.perf_counter() - t1, 3), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    log(f"[research]   {steps} steps ({rec['tokens']:,} tokens) in {train_s:.1f}s: "
        f"train {rec['train_bpb']:.3f} bpb, val {val_bpb:.4f} bpb")
    return (rec, params) if return_params else rec


# ----------------------------------------------------------------------------------------------
# proposals
# ----------------------------------------------------------------------------------------------


def propose(space: SearchSpace, results: list[dict], budget_s: float) -> dict | None:
    """The next point to run (see the module docstring), or None when nothing is left."""
    done = {r["id"] for r in results}
    unseen = lambda p: space.is_valid(p) and experiment_id(space, p, budget_s) not in done  # noqa: E731
    for p in space.start:
        if unseen(p):
            return dict(p)
    rng = random.Random(f"{space.seed}:{len(results)}")
    if results:
        best = min(results, key=lambda r: r["val_bpb"])["point"]
        dims = [d for d, v in space.space.items() if len(v) > 1]
        for _ in range(200 if dims else 0):
            cand = dict(best)
            for d in rng.sample(dims, 1 if rng.random() < 0.7 or len(dims) < 2 else 2):
                cand[d] = rng.choice(neighbours(space.space[d], cand[d]))
            if unseen(cand):
                return cand
    names, values_ = list(space.space), list(space.space.values())
    if math.prod(len(v) for v in values_) <= 100_000:
        grid = list(itertools.product(*values_))
        rng.shuffle(grid)
    else:
        grid = (tuple(rng.choice(v) for v in values_) for _ in range(10_000))
    for values in grid:
        cand = dict(zip(names, values))
        if unseen(cand):
            return cand
    return None


# ----------------------------------------------------------------------------------------------
# results: JSONL, Markdown, plot
# ----------------------------------------------------------------------------------------------


def load_results(out_dir) -> list[dict]:
    """Records of ``out_dir/results.jsonl`` in order; [] if there is none. ValueError naming the
    line for a corrupt file."""
    path = Path(out_dir) / RESULTS_JSONL
    if not path.exists():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
        if not isinstance(rec, dict) or not {"id", "point", "val_bpb"} <= set(rec):
            raise ValueError(f"{path}:{i}: a results record needs id, point and val_bpb")
        out.append(rec)
    return out


def results_markdown(results: list[dict]) -> str:
    """The results table, best first, then the best experiment per pattern."""
    dims = list(dict.fromkeys(k for r in results for k in r["point"]))
    head = ["rank", "id", *dims, "params", "steps", "tokens", "train bpb", "val bpb", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ranked = sorted(results, key=lambda r: r["val_bpb"])
    for i, r in enumerate(ranked, 1):
        cells = [str(i), f"`{r['id']}`", *[str(r["point"].get(d, "")) for d in dims], f"{r['params']:,}",
                 str(r["steps"]), f"{r['tokens']:,}", f"{r['train_bpb']:.3f}", f"**{r['val_bpb']:.4f}**"
                 if i == 1 else f"{r['val_bpb']:.4f}", f"{r['train_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    best = {}
    for r in ranked:
        best.setdefault(r["point"].get("pattern", "?"), r)
    lines += ["", "Best per pattern:", "", "| pattern | val bpb | id |", "|---|---|---|"]
    lines += [f"| {p} | {r['val_bpb']:.4f} | `{r['id']}` |" for p, r in best.items()]
    return "\n".join(lines) + "\n"


def plot_results(results: list[dict], path) -> None:
    """Three panels of validation bpb: per experiment in run order (with the best so far), against
    parameters, and against training tokens seen within the budget."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    patterns = list(dict.fromkeys(r["point"].get("pattern", "?") for r in results))
    colors = {p: f"C{i}" for i, p in enumerate(patterns)}
    best = math.inf
    curve = []
    for i, r in enumerate(results):
        best = min(best, r["val_bpb"])
        curve.append(best)
    a.plot(range(1, len(results) + 1), curve, color="k", lw=1, drawstyle="steps-post", label="best so far")
    for p in patterns:
        idx = [i for i, r in enumerate(results) if r["point"].get("pattern", "?") == p]
        a.scatter([i + 1 for i in idx], [results[i]["val_bpb"] for i in idx], color=colors[p], label=p)
        b.scatter([results[i]["params"] for i in idx], [results[i]["val_bpb"] for i in idx], color=colors[p], label=p)
        c.scatter([results[i]["tokens"] for i in idx], [results[i]["val_bpb"] for i in idx], color=colors[p], label=p)
    a.set_xlabel("experiment")
    a.set_ylabel("validation bits per byte")
    a.legend()
    for ax, label in ((b, "parameters"), (c, "training tokens seen in the budget")):
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("validation bits per byte")
    budget = results[0].get("budget_s") if results else None
    fig.suptitle(f"alloy research: {len(results)} experiments, {budget:g} s training each" if budget
                 else "alloy research")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_results(out_dir, results: list[dict]) -> None:
    out = Path(out_dir)
    atomic_write(out / RESULTS_JSONL, "".join(json.dumps(r, sort_keys=True) + "\n" for r in results))
    atomic_write(out / RESULTS_MD, results_markdown(results))
    plot_results(results, out / RESULTS_PNG)


def _id_or_none(space, point, budget_s):
    try:
        return experiment_id(space, point, budget_s)
    except ValueError:
        return None


def run_research(space: SearchSpace, out_dir, budget_s: float, max_experiments: int | None = None,
                 log: Callable = print) -> list[dict]:
    """Run experiments until ``max_experiments`` (default: the space's) are recorded in ``out_dir``
    (those already there count: re-running resumes) or the space is exhausted; returns all records."""
    if not isinstance(budget_s, (int, float)) or budget_s <= 0:
        raise ValueError(f"budget must be positive seconds, got {budget_s!r}")
    n_max = space.max_experiments if max_experiments is None else max_experiments
    if not isinstance(n_max, int) or n_max <= 0:
        raise ValueError(f"max_experiments must be a positive int, got {n_max!r}")
    results = load_results(out_dir)
    foreign = [r["id"] for r in results if r["id"] != _id_or_none(space, r["point"], budget_s)]
    if foreign:
        raise ValueError(f"{Path(out_dir) / RESULTS_JSONL} holds {len(foreign)} result(s) of another search "
                         f"space, training setting or budget (e.g. {foreign[0]}); use another --out")
    if results:
        log(f"[research] resuming: {len(results)} experiment(s) already in {Path(out_dir) / RESULTS_JSONL}")
    while len(results) < n_max:
        point = propose(space, results, budget_s)
        if point is None:
            log("[research] the search space is exhausted")
            break
        results.append(run_experiment(space, point, budget_s, log))
        write_results(out_dir, results)
    best = min(results, key=lambda r: r["val_bpb"], default=None)
    if best is not None:
        log(f"[research] best of {len(results)}: {best['id']} at {best['val_bpb']:.4f} bpb; "
            f"table {Path(out_dir) / RESULTS_MD}")
    return results

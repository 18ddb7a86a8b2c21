"""The mixed stack of alloy/configs/dsv4-hybrid.json: DeepSeek-V4's CSA with Mamba-2 and Gated
DeltaNet, hash-routed and routed MoE, hyper-connections. It builds, trains (the loss falls) and
decodes with alloy.generate exactly as full forwards do."""
from pathlib import Path

import numpy as np

import alloy
import mlx.core as mx

from alloy.train import optim, schedule, step as S

CONFIG = Path(__file__).parents[2] / "alloy" / "configs" / "dsv4-hybrid.json"


def test_dsv4_hybrid_trains_and_decodes_like_full_forwards():
    model = alloy.build(str(CONFIG))
    assert {model.config.mixer_kind(i) for i in range(4)} == {"mamba2", "csa", "gated_deltanet"}
    params = model.init(mx.random.key(0))
    # a repeating pattern long enough to close several compression windows (rate 4) and pass the window
    rng = np.random.default_rng(0)
    motif = rng.integers(1, 256, 12)
    rows = [np.roll(np.tile(motif, 4), -s)[:41] for s in range(4)]
    batch = {"tokens": mx.array(np.stack(rows), dtype=mx.int32)}
    opt = optim.adamw(weight_decay=0.0)
    step = S.make_train_step(model, opt, schedule.constant(3e-3))
    state = opt.init(params)
    losses = []
    for i in range(12):
        params, state, metrics = step(params, state, batch, mx.random.key(i))
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses

    prompt = rows[0][:21].tolist()
    got = [e.token for e in alloy.generate(model, params, prompt, max_tokens=8, prefill_chunk=8)]
    seq = list(prompt)
    for _ in range(8):  # the reference: greedy by full uncached forwards
        logits, _ = model.apply(params, mx.array([seq], dtype=mx.int32))
        seq.append(int(mx.argmax(logits[0, -1])))
    assert got == seq[len(prompt):]

"""Parity of Alloy against transformers on the committed fixtures (tests/parity/fixtures).

For each family: the largest absolute logit difference over a batch of 2 prompts of 100 tokens
(fp32, CPU), the logit scale, and whether cached greedy decoding reproduces transformers' 12 tokens.

    python bench/parity_table.py      # prints a Markdown table
"""
import json
from pathlib import Path

import numpy as np

import alloy
import mlx.core as mx

FIX = Path(__file__).parents[1] / "tests" / "parity" / "fixtures"


def main():
    print("| family (model_type) | layer mix | max abs logit diff | logit scale | cached greedy (12 tokens) |")
    print("|---|---|---|---|---|")
    for d in sorted(p for p in FIX.iterdir() if p.is_dir()):
        ref = np.load(d / "reference.npz")
        model, params = alloy.load(d)
        got = np.array(model.apply(params, mx.array(ref["ids"]))[0])
        diff = float(np.abs(got - ref["logits"]).max())
        prompt, want = ref["ids"][:1], ref["greedy"].tolist()
        state = model.init_state(1, prompt.shape[1] + len(want))
        logits, state = model.apply(params, mx.array(prompt), state)
        toks = []
        for _ in want:
            toks.append(int(mx.argmax(logits[0, -1])))
            logits, state = model.apply(params, mx.array([[toks[-1]]]), state)
        cfg = model.config
        mix = {}
        for i in range(cfg.n_layers):
            k = f"{cfg.mixer_kind(i)}+{cfg.ffn_kind(i)}"
            mix[k] = mix.get(k, 0) + 1
        if cfg.shared is not None:
            mix[f"shared x{len(cfg.shared.at)}"] = 1
        mt = json.loads((d / "config.json").read_text())["model_type"]
        print(f"| {d.name} ({mt}) | {', '.join(f'{k} x{v}' if not k.startswith('shared') else k for k, v in mix.items())} "
              f"| {diff:.1e} | {np.abs(ref['logits']).max():.2f} | {'identical' if toks == want else 'DIFFERS'} |")


if __name__ == "__main__":
    main()

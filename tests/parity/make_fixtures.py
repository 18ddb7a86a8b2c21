"""Generate the Hugging Face parity fixtures that CI checks without torch.

For every family in ``alloy.convert.testing.configs``: a tiny random transformers model with every
weight perturbed, saved with ``save_pretrained`` (config.json + safetensors), plus ``reference.npz``
holding transformers' fp32 logits for a batch of 2 prompts of 100 tokens (several SSM / delta-rule
chunks, not a multiple of them) and its greedy continuation of row 0 (12 tokens, by full uncached
forwards). Needs torch and transformers:

    pip install torch==2.13.0 transformers && python tests/parity/make_fixtures.py [FAMILY ...]
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent / "fixtures"
PROMPT_LEN, BATCH, GREEDY = 100, 2, 12


def main(names=None):
    import torch
    import transformers as T

    from alloy.convert.testing import V, configs, perturb

    cfgs = configs(T)
    for name in names or sorted(cfgs):
        torch.manual_seed(0)
        model = perturb(T.AutoModelForCausalLM.from_config(cfgs[name]).eval(), torch)
        out = HERE / name
        shutil.rmtree(out, ignore_errors=True)
        model.save_pretrained(out)
        ids = np.random.default_rng(7).integers(0, V, (BATCH, PROMPT_LEN))

        def logits(x):
            with torch.no_grad():
                return model(torch.tensor(x), use_cache=False).logits.float().numpy()

        ref = logits(ids)
        seq = ids[:1]
        for _ in range(GREEDY):
            seq = np.concatenate([seq, logits(seq)[:, -1].argmax(-1)[:, None]], axis=1)
        np.savez_compressed(out / "reference.npz", ids=ids, logits=ref.astype(np.float32),
                            greedy=seq[0, PROMPT_LEN:])
        (out / "generation_config.json").unlink(missing_ok=True)
        meta = {"transformers": T.__version__, "torch": torch.__version__}
        (out / "fixture.json").write_text(json.dumps(meta))
        size = sum(p.stat().st_size for p in out.iterdir())
        print(f"{name:20s} {size / 1e3:7.1f} kB  logit scale {np.abs(ref).max():.2f}")


if __name__ == "__main__":
    main(sys.argv[1:] or None)

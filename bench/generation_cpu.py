"""CPU figures for docs/generation.md: quantization quality, prefix-reuse TTFT, speculative decoding,
state memory at 32k context.

    python bench/generation_cpu.py [--steps 300] [--out bench_generation.json]

1. Trains two byte-level models briefly on the Python standard library's top-level ``*.py`` files
   (sorted; every 10th file held out for validation): a target hybrid (mamba2 / sliding attention /
   mamba2 / attention, d_model 128, MLPs) and a small draft (mamba2 / attention, d_model 64).
   AdamW, lr 2e-3 cosine, batch 16 x 128 bytes. No timing is asserted anywhere; all figures are
   measured in this process and printed with the device.
2. Quantization: validation perplexity (bits/byte) and mean KL(full || quantized) of next-byte
   distributions for the full model and its 8-bit / 4-bit (group 64) quantizations.
3. Prefix reuse: TTFT of a 1,056-token prompt cold vs. resuming from a cached 1,024-token prefix
   (the previous turn), median of ``--repeats``.
4. Speculative decoding: greedy 128 tokens from 4 validation prompts, plain vs. speculative
   (k = 2, 4, 6), runs interleaved ``--repeats`` times; acceptance rate, median tok/s and the median
   of paired plain/speculative time ratios; the outputs are checked to be equal.
5. State memory at 32k context (bf16) of the Zamba2-1.2B-shaped hybrid and Mamba-2 1.3B shape vs
   pure-attention models of the same depth and width (computed from ``init_state`` shapes).
"""
from __future__ import annotations

import alloy  # noqa: F401  (OpenBLAS before mlx.core)

import argparse
import math
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

import mlx.core as mx
import mlx.optimizers as optim

from alloy.inference import PrefixCache, generate, speculative_generate
from alloy.inference.speculative import SpeculativeStats
from alloy.params.quantize import quantize
from alloy.params.tree import tree_bytes

TARGET = {"name": "bench-target", "vocab_size": 256, "d_model": 128,
          "layer_types": ["mamba2", "local", "mamba2", "attention"],
          "ffn_types": ["mlp", "mlp", "mlp", "mlp"],
          "mixers": {"mamba2": {"d_state": 32, "head_dim": 32, "chunk_size": 64},
                     "local": {"kind": "sliding_attention", "window": 256, "n_heads": 4, "n_kv_heads": 2},
                     "attention": {"n_heads": 4, "n_kv_heads": 2}},
          "ffns": {"mlp": {"d_ff": 384}}}
DRAFT = {"name": "bench-draft", "vocab_size": 256, "d_model": 64, "layer_types": ["mamba2", "attention"],
         "ffn_types": ["mlp", "mlp"],
         "mixers": {"mamba2": {"d_state": 16, "head_dim": 32, "chunk_size": 64},
                    "attention": {"n_heads": 4, "n_kv_heads": 2}},
         "ffns": {"mlp": {"d_ff": 192}}}


def corpus():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    train = b"".join(f.read_bytes() for i, f in enumerate(files) if i % 10)
    val = b"".join(f.read_bytes() for i, f in enumerate(files) if i % 10 == 0)
    return np.frombuffer(train, np.uint8).astype(np.int32), np.frombuffer(val, np.uint8).astype(np.int32)


def loss_fn(model, params, x, y):
    logits, _ = model.apply(params, x)
    lf = logits.astype(mx.float32)
    return (mx.logsumexp(lf, axis=-1) - mx.take_along_axis(lf, y[..., None], axis=-1)[..., 0]).mean()


def train(cfg, data, steps, seed, batch=16, seq=128, lr=2e-3, log=print):
    model = alloy.build(cfg)
    params = model.init(mx.random.key(seed))
    opt = optim.AdamW(learning_rate=optim.cosine_decay(lr, steps), weight_decay=0.01)
    vg = mx.compile(mx.value_and_grad(lambda p, x, y: loss_fn(model, p, x, y)))  # pure: compiles as is

    rng = np.random.default_rng(seed)
    opt.init(params)
    t0 = time.perf_counter()
    for i in range(steps):
        idx = rng.integers(0, len(data) - seq - 1, batch)
        x = mx.array(np.stack([data[j:j + seq] for j in idx]))
        y = mx.array(np.stack([data[j + 1:j + seq + 1] for j in idx]))
        loss, g = vg(params, x, y)
        params = opt.apply_gradients(g, params)
        mx.eval(loss, params, opt.state)
        if i % 50 == 0 or i == steps - 1:
            log(f"  {cfg['name']} step {i}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)")
    return model, params


def eval_windows(val, n=32, seq=256, seed=1):
    idx = np.random.default_rng(seed).integers(0, len(val) - seq - 1, n)
    return mx.array(np.stack([val[j:j + seq] for j in idx])), mx.array(np.stack([val[j + 1:j + seq + 1] for j in idx]))


def quality(model, params, qparams, x, y):
    """(bits per byte of qparams, mean KL(full || q) in nats per byte)."""
    lf, _ = model.apply(params, x)
    lq, _ = model.apply(qparams, x)
    lpf = lf - mx.logsumexp(lf, axis=-1, keepdims=True)
    lpq = lq - mx.logsumexp(lq, axis=-1, keepdims=True)
    nll = -mx.take_along_axis(lpq, y[..., None], axis=-1).mean().item()
    kl = (mx.exp(lpf) * (lpf - lpq)).sum(-1).mean().item()
    return nll / math.log(2), kl


def ttft(model, params, prompt, cache, max_len):
    ev = next(iter(generate(model, params, prompt, max_tokens=1, prefix_cache=cache, max_len=max_len)))
    return ev.ttft


def state_32k() -> dict:
    """State bytes at 32k context, batch 1, bf16, from ``init_state`` shapes: the Mamba-2 1.3B and
    Zamba2-1.2B shapes and pure-attention models of the same depth / width, each also with 8- and
    4-bit KV rings (``quantize_kv``)."""
    from alloy.demo import bundled_config_path
    from alloy.inference import quantize_kv
    from alloy.model import as_config
    z = as_config(bundled_config_path("zamba2-1.2b-shape")).to_dict()
    m2 = {"name": "mamba2-1.3b-shape", "vocab_size": 50280, "d_model": 2048, "layer_types": ["mamba2"] * 48,
          "ffn_types": ["none"] * 48, "mixers": {"mamba2": {"d_state": 128, "head_dim": 64}}, "dtype": "bfloat16"}
    res = {}
    for cfgd in (z, m2):
        attn = {**cfgd, "name": cfgd["name"] + " as pure attention",
                "layer_types": ["attention"] * len(cfgd["layer_types"]),
                "mixers": {"attention": {"n_heads": 32, "head_dim": 64}}}
        for c in (cfgd, attn):
            m = alloy.build(c)
            st = m.init_state(1, 32768)
            row = {"bf16": int(tree_bytes(st))}
            for bits in (8, 4):
                row[f"kv{bits}"] = int(tree_bytes(quantize_kv(m, st, bits)))
            res[c["name"]] = row
            print(f"  state at 32k, batch 1: {c['name']}: " + ", ".join(
                f"{k} {v / 2 ** 20:,.1f} MiB" for k, v in row.items()))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--models-dir", default=None,
                    help="load the two trained models from here if present, else train and save them there")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timing repeats (medians reported)")
    ap.add_argument("--state-only", action="store_true", help="only the 32k state-memory table")
    args = ap.parse_args(argv)
    out = {"device": str(mx.default_device()), "python": sys.version.split()[0], "mlx": mx.__version__}
    print(f"device {out['device']}, MLX {out['mlx']}, Python {out['python']}")
    if args.state_only:
        out["state_32k"] = state_32k()
        return out
    tr, val = corpus()
    out["corpus_bytes"] = {"train": int(len(tr)), "val": int(len(val))}
    models = {}
    for name, cfg, seed in (("target", TARGET, 0), ("draft", DRAFT, 1)):
        path = Path(args.models_dir, name) if args.models_dir else None
        if path is not None and (path / "config.json").is_file():
            models[name] = alloy.load(path)
            print(f"  loaded {name} from {path}")
        else:
            models[name] = train(cfg, tr, args.steps, seed)
            if path is not None:
                alloy.save(path, *models[name])
    (model, params), (draft, dparams) = models["target"], models["draft"]

    # 2. quantization
    x, y = eval_windows(val)
    out["quantization"] = {}
    for name, q in [("float32", params), ("8-bit g64", quantize(params, 8, 64)),
                    ("4-bit g64", quantize(params, 4, 64)), ("4-bit g32", quantize(params, 4, 32))]:
        bpb, kl = quality(model, params, q, x, y)
        out["quantization"][name] = {"bits_per_byte": bpb, "ppl_per_byte": 2 ** bpb, "kl_nats": kl,
                                     "params_bytes": int(tree_bytes(q))}
        print(f"  {name}: {bpb:.4f} bits/byte (ppl {2 ** bpb:.3f}), KL {kl:.2e} nats, "
              f"{tree_bytes(q) / 1e6:.2f} MB")

    # 3. prefix reuse (one conversation: turn 1 prefix cached, turn 2 = prefix + 32 new bytes)
    prefix = val[1000:2024].tolist()
    prompt = prefix + val[2024:2056].tolist()
    max_len = 1536
    ttft(model, params, prompt, None, max_len)  # compile every shape used below
    cold, warm = [], []
    for _ in range(args.repeats):
        cold.append(ttft(model, params, prompt, None, max_len))
        cache = PrefixCache()
        ttft(model, params, prefix, cache, max_len)
        warm.append(ttft(model, params, prompt, cache, max_len))
    out["prefix_reuse"] = {"prompt": len(prompt), "cached_prefix": len(prefix),
                           "ttft_cold_s": float(np.median(cold)), "ttft_warm_s": float(np.median(warm))}
    print(f"  prefix reuse: TTFT {np.median(cold) * 1e3:.1f} ms cold -> {np.median(warm) * 1e3:.1f} ms "
          f"with a cached {len(prefix)}-token prefix ({len(prompt)}-token prompt)")

    # 4. speculative decoding
    prompts = [val[j:j + 64].tolist() for j in (5000, 20000, 40000, 60000)]
    n = 128

    def plain(p):
        return [e.token for e in generate(model, params, p, max_tokens=n, max_len=512)]

    plain(prompts[0])
    ks = (2, 4, 6)

    def spec(p, k, st):
        return [e.token for e in speculative_generate(model, params, draft, dparams, p, max_tokens=n,
                                                      k=k, max_len=512, stats=st)]

    for k in ks:
        spec(prompts[0], k, SpeculativeStats())  # compile the draft step and (1, k+1) verify shapes
    want = [plain(p) for p in prompts]
    times = {"plain": [], **{k: [] for k in ks}}
    stats = {k: SpeculativeStats() for k in ks}
    same = {k: True for k in ks}
    for r in range(args.repeats):  # interleaved, so load changes hit every variant alike
        t0 = time.perf_counter()
        [plain(p) for p in prompts]
        times["plain"].append(time.perf_counter() - t0)
        for k in ks:
            st = stats[k] if r == 0 else SpeculativeStats()
            t0 = time.perf_counter()
            got = [spec(p, k, st) for p in prompts]
            times[k].append(time.perf_counter() - t0)
            same[k] = same[k] and got == want
    total = n * len(prompts)
    t_plain = float(np.median(times["plain"]))
    out["speculative"] = {"tokens": total, "repeats": args.repeats, "plain_tok_s": total / t_plain, "k": {}}
    print(f"  plain greedy: {total / t_plain:.1f} tok/s (median of {args.repeats})")
    for k in ks:
        t = float(np.median(times[k]))
        ratio = float(np.median(np.array(times["plain"]) / np.array(times[k])))
        out["speculative"]["k"][k] = {"acceptance": stats[k].acceptance_rate, "tok_s": total / t,
                                      "speedup_median_of_paired_ratios": ratio, "equal_to_plain": same[k],
                                      "rounds": stats[k].rounds, "replays": stats[k].replays}
        print(f"  speculative k={k}: acceptance {stats[k].acceptance_rate:.3f}, {total / t:.1f} tok/s, "
              f"speed-up {ratio:.2f}x (median of paired runs), equal to plain greedy: {same[k]}")

    out["state_32k"] = state_32k()
    if args.out:
        from alloy.params.io import save_json
        save_json(args.out, out)
    return out


if __name__ == "__main__":
    main()

"""Decode / prefill benchmark of large-shaped random models (for an H100 with MLX's CUDA backend).

    python bench/decode.py [--models mamba2-1.3b,zamba2-1.2b] [--prompt-len 2048] [--gen-len 128]
                           [--batch 1] [--quantize 4] [--out decode.json]

Models (random weights, bf16, batch 1 by default):
  mamba2-1.3b   the Mamba-2 1.3B shape: 48 Mamba-2 layers, d_model 2048, d_state 128, head_dim 64,
                expand 2, no FFN, vocab 50,280, tied embeddings — the issue's anchor model.
  zamba2-1.2b   the bundled ``zamba2-1.2b-shape`` hybrid: 38 Mamba-2 layers with an attention + MLP
                block every 7th depth, d_model 2048, vocab 32,000.
Each model runs through ``alloy.inference.bench.run`` — the same path as ``alloy bench`` and
``alloy.generate``: chunked compiled prefill, then the compiled decode step pipelined with
``mx.async_eval``; compile time excluded by a warm-up with the same shapes. ``--quantize 4`` adds a
4-bit (group 64) run of each model for its peak memory and speed.

Anchor (issue 5, measured on an H100 with the same MLX build by the filer): a popular MLX LM library
decodes the Mamba-2 1.3B shape at 29 tok/s (batch 1) and prefills at 2,963 tok/s; the memory
bandwidth roofline for that decode is ~1,200 tok/s. The equivalent ``alloy bench`` command for one
model is printed with each result.
"""
from __future__ import annotations

import alloy  # noqa: F401  (OpenBLAS before mlx.core on Linux CPU)

import argparse
import dataclasses
import sys

import mlx.core as mx

from alloy.demo import bundled_config_path
from alloy.inference.bench import format_result, run
from alloy.inference.generate import prepare_decode
from alloy.model import as_config, build
from alloy.params.quantize import quantize

def config(name: str):
    if name == "mamba2-1.3b":
        return as_config(bundled_config_path("mamba2-1.3b-shape"))
    if name == "zamba2-1.2b":
        return as_config(bundled_config_path("zamba2-1.2b-shape"))
    raise ValueError(f"unknown model {name!r}; choose mamba2-1.3b or zamba2-1.2b")


def main(argv=None):
    ap = argparse.ArgumentParser(description="decode/prefill benchmark of large-shaped random models")
    ap.add_argument("--models", default="mamba2-1.3b,zamba2-1.2b")
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=2048, help="prefill chunk length")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quantize", type=int, choices=(4, 8), default=None)
    ap.add_argument("--n-layers", type=int, default=None,
                    help="keep only the first N depths (a quick smoke run on a small machine)")
    ap.add_argument("--no-stack", action="store_true",
                    help="skip prepare_decode: per-layer decode launches (the whole-stack kernel off)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    print(f"device {mx.default_device()}, MLX {mx.__version__}", flush=True)
    results = []
    for name in args.models.split(","):
        cfg = config(name)
        if args.n_layers:
            cfg = dataclasses.replace(cfg, layer_types=cfg.layer_types[:args.n_layers],
                                      ffn_types=cfg.ffn_types[:args.n_layers],
                                      name=f"{cfg.name} (first {args.n_layers} layers)")
        model = build(cfg)
        params = model.init(mx.random.key(0))
        mx.eval(params)
        tags = ["bf16"] + ([f"{args.quantize}-bit g64"] if args.quantize else [])
        if args.no_stack:
            tags = [t + " per-layer" for t in tags]
        for tag in tags:
            if not tag.startswith("bf16"):  # quantize, then drop the bf16 weights so peak memory is the 4-bit model's
                params = quantize({k: v for k, v in params.items() if k != "decode_stack"}, args.quantize, 64)
                mx.eval(params)
                mx.clear_cache()
                mx.reset_peak_memory()
            if not args.no_stack:
                params = prepare_decode(model, params)  # stacked layer weights for the whole-stack decode
                mx.eval(params)
            r = run(model, params, prompt_len=args.prompt_len, gen_len=args.gen_len, batch=args.batch,
                    prefill_chunk=args.chunk, repeats=args.repeats)
            r["variant"] = tag
            r["command"] = (f"python bench/decode.py --models {name} --prompt-len {args.prompt_len} "
                            f"--gen-len {args.gen_len} --batch {args.batch} --chunk {args.chunk}"
                            + (f" --quantize {args.quantize}" if args.quantize else "")
                            + (" --no-stack" if args.no_stack else ""))
            results.append(r)
            print(f"[{tag}] " + format_result(r), flush=True)
        del params
        mx.clear_cache()
    print("\n| model | variant | prompt tok/s | decode tok/s | TTFT ms | peak GiB |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['variant']} | {r['prompt_tok_s']:,.0f} | {r['decode_tok_s']:,.1f} | "
              f"{r['ttft_s'] * 1e3:,.1f} | {r['peak_memory_bytes'] / 2 ** 30:.2f} |")
    if args.out:
        from alloy.params.io import save_json
        save_json(args.out, {"results": results, "argv": sys.argv[1:]})
    return results


if __name__ == "__main__":
    main()

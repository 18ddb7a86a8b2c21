"""``alloy convert SRC DST``: a Hugging Face or Alloy checkpoint -> an Alloy (or HF) checkpoint,
optionally cast to another dtype and quantized."""
from __future__ import annotations

import dataclasses
import time

DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}


def convert(src: str, dst: str, dtype: str | None = None, quantize: int | None = None, group_size: int = 64,
            fmt: str = "alloy", out=print) -> None:
    import alloy
    from alloy.layers.common import dtype_of
    from alloy.model import build
    from alloy.params.tree import cast, count_params

    t0 = time.perf_counter()
    model, params = alloy.load(src)
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"convert: --dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        model = build(dataclasses.replace(model.config, dtype=DTYPES[dtype]))
        params = cast(params, dtype_of(model.config.dtype))
    n = count_params(params)
    if quantize is not None:
        if fmt == "hf":
            raise ValueError("convert: --quantize writes Alloy checkpoints only (use --format alloy)")
        from alloy.params.quantize import quantize as q
        params = q(params, bits=quantize, group_size=group_size)
    alloy.save(dst, model, params, format=fmt)
    out(f"converted {src} -> {dst} ({fmt}): {model.config.name}, {model.config.n_layers} layers, {n:,} parameters, "
        f"{model.config.dtype}{f', {quantize}-bit' if quantize else ''} in {time.perf_counter() - t0:.1f} s")


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert a Hugging Face / Alloy checkpoint (cast, quantize, export)")
    p.add_argument("src", help="checkpoint directory (Hugging Face or Alloy) or a Hub id")
    p.add_argument("dst", help="output directory")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: keep)")
    p.add_argument("--quantize", type=int, choices=(4, 8), default=None, help="affine group quantization bits")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--format", choices=("alloy", "hf"), default="alloy")
    p.set_defaults(fn=lambda a: convert(a.src, a.dst, a.dtype, a.quantize, a.group_size, a.format))

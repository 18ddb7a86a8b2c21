"""Forward + backward of one Mamba-2 mixer of the toy config, piece by piece, on the default device.

    python bench/mamba2_layer_profile.py [--batch 16] [--T 2048]

Rows (median ms, compiled gradient of sum(out * ct), bf16 activations and weights): each part of
the mixer alone on inputs of the shapes it sees there: in_proj, causal conv1d + SiLU (gradient by
autodiff of the reference, and by the gradient kernel), the SSD scan, the gated RMSNorm (MLX ops,
and the fused kernels), out_proj, and the dt softplus; the whole mixer with the conv / norm
gradients by MLX ops and with the kernels (the defaults); the whole mixer with gradients for every
parameter (as in training); and one column sum of the size a bias gradient reduces.
"""
from __future__ import annotations

import argparse
import importlib

import alloy  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn

from alloy import metal
from alloy.config import ModelConfig
from alloy.model import build
from alloy.ops import causal_conv1d, gated_rms_norm
from alloy.params import cast
from alloy.train.loop import load_train_config
from bench_timing import compiled_grad, timeit_ms

mamba2 = importlib.import_module("alloy.layers.mamba2")
ssd_mod = importlib.import_module("alloy.ops.ssd")



def timeit(fn):
    return timeit_ms(fn, reps=3, warm=1)


def grad_time(f, *args):
    """ms of the compiled gradient of sum(f(*args) * ct) w.r.t. every argument."""
    g = compiled_grad(f, *args)
    return timeit(lambda: g(*args))


def kernels(on: bool, run):
    """run() with the conv1d gradient kernel and the fused gated norm switched on or off."""
    conv_ops = importlib.import_module("alloy.ops.conv")
    norm_ops = importlib.import_module("alloy.ops.norm")
    was = conv_ops.GRADIENT_KERNEL, norm_ops.GATED_KERNEL
    conv_ops.GRADIENT_KERNEL = norm_ops.GATED_KERNEL = on
    try:
        return run()
    finally:
        conv_ops.GRADIENT_KERNEL, norm_ops.GATED_KERNEL = was


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--T", type=int, default=2048)
    a = ap.parse_args(argv)
    base = load_train_config("toy")[0].to_dict()
    cfg = ModelConfig.from_dict(dict(base, name="one-mamba2", layer_types=["mamba2"], ffn_types=["mlp"],
                                     mixers={"mamba2": base["mixers"]["mamba2"]}))
    _, s = cfg.mixer(0)
    p = cast(build(cfg).init(mx.random.key(0)), mx.bfloat16)["layers"][0]["mixer"]
    mx.eval(p)
    B, T, d = a.batch, a.T, cfg.d_model
    ks = mx.random.split(mx.random.key(1), 4)
    x = mx.random.normal((B, T, d), key=ks[0]).astype(mx.bfloat16)
    gn = s.n_groups * s.d_state
    conv_c = s.d_inner + 2 * gn
    xbc = mx.random.normal((B, T, conv_c), key=ks[1]).astype(mx.bfloat16)
    y = mx.random.normal((B, T, s.d_inner), key=ks[2]).astype(mx.bfloat16)
    z = mx.random.normal((B, T, s.d_inner), key=ks[3]).astype(mx.bfloat16)
    dt_raw = mx.random.normal((B, T, s.n_heads)).astype(mx.bfloat16)
    print(f"| part (B={B}, T={T}, toy Mamba-2 mixer) | fwd+bwd ms |\n|---|---|", flush=True)
    parts = [
        ("in_proj", lambda: grad_time(lambda x, w: x @ w.T, x, p["in_proj"]["weight"])),
        ("conv1d + silu, gradient by autodiff of the reference", lambda: kernels(False, lambda: grad_time(
            lambda v, w, b: causal_conv1d(v, w, b, None, activation="silu")[0], xbc, p["conv1d"]["weight"], p["conv1d"]["bias"]))),
        ("conv1d + silu, gradient kernel (alloy.ops.conv.GRADIENT_KERNEL)", lambda: kernels(True, lambda: grad_time(
            lambda v, w, b: causal_conv1d(v, w, b, None, activation="silu")[0], xbc, p["conv1d"]["weight"], p["conv1d"]["bias"]))),
        ("dt softplus", lambda: grad_time(lambda v, b: nn.softplus(v.astype(mx.float32) + b.astype(mx.float32)),
                                  dt_raw, p["dt_bias"])),
        ("SSD", lambda: grad_time(lambda xs, dt, Bm, Cm: ssd_mod.ssd(xs, dt, -mx.exp(p["A_log"].astype(mx.float32)), Bm, Cm,
                                                             p["D"], None, chunk_size=s.chunk_size)[0],
                          xbc[..., :s.d_inner].reshape(B, T, s.n_heads, s.head_dim),
                          nn.softplus(dt_raw.astype(mx.float32)),
                          xbc[..., s.d_inner:s.d_inner + gn].reshape(B, T, s.n_groups, s.d_state),
                          xbc[..., s.d_inner + gn:].reshape(B, T, s.n_groups, s.d_state))),
        ("gated rms norm, MLX ops (impl='ref')", lambda: grad_time(lambda y, z, w: gated_rms_norm(
            y, z, w, s.norm_eps, group_size=s.d_inner // s.n_groups, impl="ref"),
                                     y, z, p["norm"]["weight"])),
        ("gated rms norm, fused kernels (impl='kernel')", lambda: grad_time(
            lambda y, z, w: gated_rms_norm(y, z, w, s.norm_eps, group_size=s.d_inner // s.n_groups, impl="kernel"),
            y, z, p["norm"]["weight"])),
        ("out_proj", lambda: grad_time(lambda y, w: y @ w.T, y, p["out_proj"]["weight"])),
        ("whole mixer, conv gradient and gated norm by MLX ops", lambda: kernels(False, lambda: grad_time(
            lambda x, w_in, w_out: mamba2.apply(dict(p, in_proj={"weight": w_in}, out_proj={"weight": w_out}),
                                                x, None, s)[0],
            x, p["in_proj"]["weight"], p["out_proj"]["weight"]))),
        ("whole mixer, gradients for every parameter (as in training)", lambda: grad_time(
            lambda x, mp: mamba2.apply(mp, x, None, s)[0], x, p)),
        ("column sum of a (B*T, 1792) float32 array (a bias / depthwise-weight gradient's reduction)",
         lambda: timeit(lambda: colsum(flat))),
        ("whole mixer (conv gradient kernel + fused gated norm, the defaults)", lambda: kernels(True, lambda: grad_time(
            lambda x, w_in, w_out: mamba2.apply(dict(p, in_proj={"weight": w_in}, out_proj={"weight": w_out}),
                                                x, None, s)[0],
            x, p["in_proj"]["weight"], p["out_proj"]["weight"]))),
    ]
    colsum = mx.compile(lambda v: v.astype(mx.float32).sum(axis=0))
    flat = xbc.reshape(-1, conv_c)
    for name, run in parts:  # one row at a time: a run cut short still reports what it measured
        if metal.backend() is None and ("kernel" in name):
            continue  # the kernel rows need a GPU
        print(f"| {name} | {run():.2f} |", flush=True)


if __name__ == "__main__":
    main()

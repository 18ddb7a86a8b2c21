"""Which GPU kernels a toy train step (or one Mamba-2 SSD forward + backward) spends its time in,
on an NVIDIA GPU through MLX's CUDA backend, by CUPTI kernel records (PyTorch's profiler, which
sees every kernel of the process, MLX's included).

    python bench/gpu_kernel_profile.py [--what step|ssd] [--batch-size 16] [--seq-len 2048] [--steps 3]
                                       [--flat] [--set MODULE.NAME=VALUE ...] [--trace PATH.json]

Runs warm-up calls (trace + compile) outside the profile, then `--steps` calls inside it, and
prints the kernels by total GPU time per call (ms), their launch counts per call, and the sum.
Needs `torch` with CUDA (the GPU machine's own); MLX kernel names are the op chains they fuse.
"""
from __future__ import annotations

import argparse
import importlib
from collections import defaultdict

import alloy  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

from alloy.model import build
from alloy.params import cast
from alloy.train import adamw, make_train_step, warmup_cosine
from alloy.train.loop import load_train_config
from alloy.train.step import init_opt_state
from train_step import set_switch


def step_fn(a):
    cfg, _ = load_train_config(a.config)
    model = build(cfg)
    params = cast(model.init(mx.random.key(0)), mx.float32, keep=None)
    opt = adamw(weight_decay=0.1)
    st = {"p": params, "o": init_opt_state(opt, params, flat=a.flat, compute_dtype=mx.bfloat16)}
    step = make_train_step(model, opt, warmup_cosine(1e-3, 1000, 10), compute_dtype=mx.bfloat16, flat=a.flat)
    batch = {"tokens": mx.random.randint(0, cfg.vocab_size, (a.batch_size, a.seq_len + 1)).astype(mx.int32)}
    key = mx.random.key(2)
    mx.eval(st)

    def one():
        p, o, m = step(st["p"], st["o"], batch, key)
        st["p"], st["o"] = p, o
        if not a.pipelined:
            mx.eval(p, o, m)
            return
        mx.async_eval(p, o, m)  # as train_step.pipelined: the next step queued behind this one
        if "prev" in st:
            mx.eval(st["prev"])
        st["prev"] = m["loss"]
    return one


def ssd_fn(a):
    ssd = importlib.import_module("alloy.ops.ssd")
    b, T, h, p, n = a.batch_size, a.seq_len, 24, 64, 128
    ks = mx.random.split(mx.random.key(0), 6)
    x = mx.random.normal((b, T, h, p), key=ks[0]).astype(mx.bfloat16)
    dt = mx.random.uniform(0.001, 0.1, (b, T, h), key=ks[1])
    A = -mx.random.uniform(1.0, 16.0, (h,), key=ks[2])
    B = mx.random.normal((b, T, 1, n), key=ks[3]).astype(mx.bfloat16)
    C = mx.random.normal((b, T, 1, n), key=ks[4]).astype(mx.bfloat16)
    ct = mx.random.normal((b, T, h, p), key=ks[5]).astype(mx.bfloat16)
    D = mx.ones((h,))
    g = mx.compile(mx.grad(lambda x, dt, B, C: (ssd.ssd(x, dt, A, B, C, D)[0] * ct).astype(mx.float32).sum(),
                           argnums=(0, 1, 2, 3)))
    return lambda: mx.eval(g(x, dt, B, C))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--what", default="step", choices=["step", "ssd"])
    ap.add_argument("--config", default="toy")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=45)
    ap.add_argument("--flat", action="store_true", help="the packed step (make_train_step(flat=True))")
    ap.add_argument("--pipelined", action="store_true",
                    help="step: the profiled steps queued back to back (mx.async_eval) as train_step.py "
                         "--pipelined runs them, so the trace shows the GPU's idle time between steps")
    ap.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=VALUE",
                    help="a module-level switch, as in train_step.py; repeatable")
    ap.add_argument("--trace", metavar="PATH.json",
                    help="also write the profiled calls as a Chrome trace (kernel grids, blocks and gaps)")
    a = ap.parse_args(argv)
    for item in a.set:
        set_switch(item)
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.init()
    run = step_fn(a) if a.what == "step" else ssd_fn(a)
    for _ in range(2):
        run()
    mx.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(a.steps):
            run()
        mx.synchronize()
    if a.trace:
        prof.export_chrome_trace(a.trace)
    tot, cnt = defaultdict(float), defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            tot[ev.name] += ev.time_range.elapsed_us() / 1e3 / a.steps
            cnt[ev.name] += 1
    rows = sorted(tot.items(), key=lambda kv: -kv[1])
    print(f"| kernel ({a.what}, B={a.batch_size}, T={a.seq_len}) | ms per call | launches per call |\n|---|---|---|")
    for name, ms in rows[:a.top]:
        print(f"| {name[:110]} | {ms:.3f} | {cnt[name] / a.steps:.0f} |")
    print(f"| all {len(rows)} kernels | {sum(tot.values()):.2f} | {sum(cnt.values()) / a.steps:.0f} |")


if __name__ == "__main__":
    main()

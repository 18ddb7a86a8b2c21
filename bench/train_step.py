"""Train-step throughput and model FLOPs utilisation (MFU) for the toy config (bf16 compute).

    python bench/train_step.py                         # toy (~95M), B 16 x T 1024, bf16, on the default device
    python bench/train_step.py --batch-size 32 --remat
    python bench/train_step.py --small                 # a tiny model on CPU: checks the script runs

It times the compiled ``alloy.train.make_train_step`` step (AdamW, fp32 master weights and moments,
bf16 compute, global-norm clipping) on random tokens, after warm-up steps (the first traces and
compiles). Reported: median step time, tokens/s, model TFLOP/s, MFU = model FLOP/s / peak. With
``--pipelined`` the same steps are then run back to back under ``mx.async_eval`` (as
``alloy.train.loop`` runs them) and the figures are from that run's wall time per step.

Model FLOPs per token: training = 3 x the forward's FLOPs (one forward, two products per matmul in
the backward), the forward's counted analytically by ``alloy.roofline`` (prefill of one T-token row,
every category: projections and the LM head 2 * d_in * d_out per token; attention 4 * head_dim per
visible causal (query, key) pair and query head; the chunked SSD's C B^T per group, its decay mask,
its product with x per head, the chunk states, state pass and read-out; the depthwise convolution).
The roofline's matmul and attention counts are tested equal to what ``model.apply`` executes
(tests/roofline/test_against_model.py). Until session 13 this script had its own formula, which
counted C B^T once per head instead of once per group and causal attention at half its FLOPs: for the
toy config at T = 2048, 639.2 MFLOP per token against 633.7 now (earlier MFU figures x 0.9914).
Embedding lookups, norms, convolutions and elementwise work are not counted (standard practice),
and remat recomputation is not credited. Peak: ``--peak-tflops`` (default 989.4: H100 SXM dense
bf16; use 756 for H100 PCIe).
"""
from __future__ import annotations

import argparse
import ast
import importlib
import json
import statistics
import time

import alloy  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

from alloy.model import build
from alloy.params import count_params
from alloy.roofline import roofline
from alloy.train import adamw, make_train_step, warmup_cosine
from alloy.train.step import init_opt_state
from alloy.train.loop import load_train_config

SMALL = {"name": "bench-small", "vocab_size": 256, "d_model": 64, "layer_types": ["mamba2", "attention"],
         "mixers": {"mamba2": {"d_state": 16, "head_dim": 16, "chunk_size": 32}, "attention": {"n_heads": 4}},
         "ffns": {"mlp": {"d_ff": 128}}}


def model_flops_by_category(cfg, T: int) -> dict:
    """Training FLOPs per token of ``cfg`` (a ModelConfig) at sequence length T by the roofline's
    categories (matmul, attention, chunked, scan): 3 x its forward count (see the module docstring)."""
    r = roofline(cfg, "H100", "prefill", batch=1, seq_len=T)
    return {k: 3.0 * v / T for k, v in r.flops.items()}


GRAD_PATHS = ("conv", "norm", "ssd", "ssd-kernels")


def switch_grads(spec: str | None) -> list[str]:
    """Set the gradient paths (see --grads): exactly the named ones on, the others off; None keeps
    the library's defaults. Returns the names on."""
    conv = importlib.import_module("alloy.ops.conv")
    norm = importlib.import_module("alloy.ops.norm")
    ssd = importlib.import_module("alloy.ops.ssd")
    if spec is None:
        return [n for n, on in zip(GRAD_PATHS, (conv.GRADIENT_KERNEL, norm.GATED_KERNEL, ssd.GRADIENT == "explicit",
                                                ssd.GRADIENT == "kernels")) if on]
    names = ["conv", "norm", "ssd-kernels"] if spec == "all" else [v for v in spec.split(",") if v and v != "none"]
    for name in names:
        if name not in GRAD_PATHS:
            raise SystemExit(f"--grads: unknown name {name!r} ({', '.join(GRAD_PATHS)}, all, none)")
    conv.GRADIENT_KERNEL = "conv" in names
    norm.GATED_KERNEL = "norm" in names
    if "ssd" in names and "ssd-kernels" in names:
        raise SystemExit("--grads: ssd and ssd-kernels are two choices of one gradient; name one")
    ssd.GRADIENT = "kernels" if "ssd-kernels" in names else "explicit" if "ssd" in names else "autodiff"
    return names


def set_switch(item):
    """'pkg.module.NAME=VALUE' -> sets it (VALUE a Python literal, else the string) and returns (key, value)."""
    key, sep, text = item.partition("=")
    mod, _, name = key.rpartition(".")
    if not sep or not mod:
        raise SystemExit(f"--set: expected MODULE.NAME=VALUE, got {item!r}")
    module = importlib.import_module(mod)
    if not hasattr(module, name):
        raise SystemExit(f"--set: {mod} has no attribute {name!r}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    setattr(module, name, value)
    return key, value


def pipelined(step, state: list, batch, key, n: int, host: dict | None = None):
    """n steps queued as the training loop queues them (`mx.async_eval`, at most one step waiting
    behind the running one) -> (the last metrics, wall seconds per step). ``state`` is the list
    [params, opt_state], replaced in place step by step: the caller passes its only references
    (holding the first step's params and moments elsewhere through the loop would keep one more
    copy of them alive, ~1.1 GB for the toy config, and count it in the peak memory). With
    `host` (a dict), its "submit" and "wait" get the seconds per step the host spent building and
    submitting a step (the step call and `mx.async_eval`: MLX encodes every kernel there; `eval`
    also blocks there while more than 10 command buffers are in flight) and blocked on the step
    before; "build" the step call alone (the compiled graph's replay, before any kernel is encoded)."""
    mx.synchronize()
    t = time.perf_counter()
    prev = m = None
    build = submit = wait = 0.0
    for _ in range(n):
        t1 = time.perf_counter()
        state[0], state[1], m = step(state[0], state[1], batch, key)
        t2 = time.perf_counter()
        mx.async_eval(state, m)
        t3 = time.perf_counter()
        if prev is not None:
            mx.eval(prev)
        t4 = time.perf_counter()
        build, submit, wait = build + t2 - t1, submit + t3 - t2, wait + t4 - t3
        prev = m["loss"]
    mx.eval(state, m)
    if host is not None:
        host.update(build=build / n, submit=(build + submit) / n, wait=wait / n)
    return m, (time.perf_counter() - t) / n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="toy")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--remat", action="store_true")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (trace + compile)")
    p.add_argument("--peak-tflops", type=float, default=989.4)
    p.add_argument("--small", action="store_true", help="tiny model, B 4 x T 64, 3 steps: a CPU smoke run")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--pipelined", action="store_true",
                   help="also time the steps pipelined (mx.async_eval: step n+1 is built and queued while "
                        "step n runs), as the training loop runs them; reported as wall time / steps")
    p.add_argument("--flat", action="store_true",
                   help="the packed step: make_train_step(flat=True), one cast / norm / AdamW update per "
                        "flat buffer instead of per leaf")
    p.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=VALUE",
                   help="set a module-level switch before building the step (VALUE read as a Python "
                        "literal); repeatable. The A/B switches of docs/benchmarks.md: "
                        "alloy.metal.ssd_chunked.SCORES_TC, alloy.metal.PACK_INPUTS, alloy.layers.mlp.FUSED_GATE, "
                        "alloy.ops.ssd.GRADIENT_PRODUCTS_IN_INPUT_DTYPE (all on by default)")
    p.add_argument("--grads", default=None,
                   help="the gradient paths on, the others off (default: the library's defaults): a comma "
                        "list of conv (alloy.ops.conv.GRADIENT_KERNEL), norm (alloy.ops.norm.GATED_KERNEL), "
                        "ssd (alloy.ops.ssd.GRADIENT = 'explicit'), ssd-kernels (= 'kernels'), or 'all' "
                        "(conv,norm,ssd-kernels) / 'none'")
    a = p.parse_args(argv)
    grads = ",".join(switch_grads(a.grads)) or "none"
    switches = [set_switch(item) for item in a.set]
    if a.small:
        cfg = alloy.ModelConfig.from_dict(SMALL)
        a.batch_size, a.seq_len, a.steps, a.warmup = 4, 64, 3, 1
    else:
        cfg, _ = load_train_config(a.config)
    model = build(cfg)
    params = model.init(mx.random.key(0))
    params = alloy.params.cast(params, mx.float32, keep=None)
    opt = adamw(weight_decay=0.1)
    compute = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": None}[a.dtype]
    opt_state = init_opt_state(opt, params, flat=a.flat, compute_dtype=compute)
    mx.eval(params, opt_state)
    step = make_train_step(model, opt, warmup_cosine(1e-3, 1000, 10), compute_dtype=compute, remat=a.remat,
                           flat=a.flat)
    B, T = a.batch_size, a.seq_len
    tokens = mx.random.randint(0, cfg.vocab_size, (B, T + 1), key=mx.random.key(1)).astype(mx.int32)
    batch = {"tokens": tokens}
    key = mx.random.key(2)
    device = mx.device_info().get("device_name", str(mx.default_device()))
    n = count_params(params)
    print(f"device: {device} ({mx.default_device()}); model {cfg.name}: {n / 1e6:.1f}M params; "
          f"batch {B} x {T}, {a.dtype} compute, remat {a.remat}, gradient paths on: {grads}, flat step {a.flat}"
          + "".join(f", {k} = {v!r}" for k, v in switches))
    t0 = time.perf_counter()
    for i in range(a.warmup):
        params, opt_state, m = step(params, opt_state, batch, key)
        mx.eval(params, opt_state, m)
    print(f"warm-up ({a.warmup} steps incl. compile): {time.perf_counter() - t0:.1f} s; loss {float(m['loss']):.3f}")
    if hasattr(mx, "reset_peak_memory"):
        mx.reset_peak_memory()
    times = []
    submits = []  # from an idle GPU: the host's building and submitting of one step
    for i in range(a.steps):
        t = time.perf_counter()
        params, opt_state, m = step(params, opt_state, batch, key)
        mx.async_eval(params, opt_state, m)
        submits.append(time.perf_counter() - t)
        mx.eval(params, opt_state, m)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    piped = None
    if a.pipelined:  # the same steps queued back to back: the graph building hides behind the GPU
        host, state = {}, [params, opt_state]
        del params, opt_state  # the loop's list holds the only references (see `pipelined`)
        m, piped = pipelined(step, state, batch, key, a.steps, host)
        params, opt_state = state
        print(f"pipelined: {piped * 1e3:.1f} ms per step over {a.steps} (synchronous median {med * 1e3:.1f}); "
              f"peak memory {mx.get_peak_memory() / 1e9:.2f} GB; host per step: {host['submit'] * 1e3:.1f} ms "
              f"building and submitting (the step call {host['build'] * 1e3:.1f}), {host['wait'] * 1e3:.1f} ms "
              f"waiting for the step before "
              f"(synchronous steps: {statistics.median(submits) * 1e3:.1f} ms building and submitting from idle)")
        med = piped
    tok_s = B * T / med
    by_cat = model_flops_by_category(cfg, T)
    fpt = sum(by_cat.values())
    tflops = fpt * tok_s / 1e12
    res = {"device": device, "config": cfg.name, "params": n, "batch_size": B, "seq_len": T, "dtype": a.dtype,
           "remat": a.remat, "step_s_median": med, "step_s_min": min(times), "tokens_per_s": tok_s,
           "model_flops_per_token": fpt, "model_flops_per_token_by_category": by_cat,
           "model_tflops": tflops, "peak_tflops": a.peak_tflops,
           "mfu": tflops / a.peak_tflops, "peak_memory_gb": mx.get_peak_memory() / 1e9,
           "final_loss": float(m["loss"]), "grads": grads, "flat": a.flat, "set": dict(switches),
           "pipelined": a.pipelined}
    print(f"step {med * 1e3:.1f} ms {'pipelined' if piped else 'median'} (synchronous min {min(times) * 1e3:.1f}) "
          f"over {a.steps}: {tok_s:,.0f} tokens/s, "
          f"{fpt / 1e6:.1f} MFLOP/token ({', '.join(f'{k} {v / 1e6:.1f}' for k, v in by_cat.items())}) "
          f"-> {tflops:.2f} TFLOP/s = {100 * res['mfu']:.2f}% MFU of "
          f"{a.peak_tflops:g} TFLOP/s; peak memory {res['peak_memory_gb']:.2f} GB")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()

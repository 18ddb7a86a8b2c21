"""Where a batch-1 decode token's time goes (GPU): the model step vs its parts.

    python bench/decode_profile.py [--layers 48] [--d-model 2048] [--tokens 64]

Rows (ms per token, median of 3 runs of --tokens tokens):
  step_pipelined   the compiled decode step, next step queued before the previous one is read
                   (how `alloy.generate` / `alloy bench` run it)
  step_sync        the same, evaluating each token before building the next
  step_small       the same depth at d_model 256: the host-side cost of the graph (same op count,
                   ~no bytes), i.e. the floor that launch/dispatch overhead sets
  gemv_only        only the 2 projections per layer (x @ W^T, HF layout), chained through all layers
  gemv_pre_t       the same with weights stored transposed (x @ W)
  gemv_alloy_kernel  the same through `alloy.metal.gemv` (one node per projection)
  host_graph_build / host_async_eval   host time per token to build the step's graph (the compiled
                   call) and to encode it (async_eval's return), each token synchronised first
  bytes_roofline   weight + state bytes per token / 3.35 TB/s
  stack_*          the same step rows with `prepare_decode` params: every layer in one persistent
                   launch (`alloy.metal.mamba2_stack`, CUDA)
  stack_kernel_nbN the persistent kernel alone, token after token, with a grid of N groups
"""
from __future__ import annotations

import alloy  # noqa: F401

import argparse
import statistics
import time

import mlx.core as mx

from alloy.inference.generate import compiled_step
from alloy.inference.sampling import SamplingParams
from alloy.model import as_config, build


def cfg(layers, d):
    return as_config({"name": f"m{d}", "vocab_size": 50280, "d_model": d, "layer_types": ["mamba2"] * layers,
                      "ffn_types": ["none"] * layers, "tie_embeddings": True, "dtype": "bfloat16",
                      "mixers": {"mamba2": {"d_state": 128, "head_dim": 64, "expand": 2, "n_groups": 1}}})


def per_token(run, tokens):
    run(4)
    mx.synchronize()
    out = []
    for _ in range(3):
        t = time.perf_counter()
        run(tokens)
        mx.synchronize()
        out.append((time.perf_counter() - t) / tokens * 1e3)
    return statistics.median(out)


def step_runner(model, params, pipelined):
    step = compiled_step(model, SamplingParams())
    state = model.init_state(1, 4096)
    mx.eval(state)
    box = {"tok": mx.array([1]), "state": state, "key": mx.random.key(0)}

    def run(n):
        for _ in range(n):
            tok, _, st, key, _ = step(params, box["tok"], box["state"], box["key"], None)
            box.update(tok=tok, state=st, key=key)
            if pipelined:
                mx.async_eval(tok, st)
            else:
                mx.eval(tok, st)
    return run


def host_split(model, params, tokens):
    """(graph build ms, async_eval return ms) per token: the host's share of a pipelined step."""
    step = compiled_step(model, SamplingParams())
    state = model.init_state(1, 4096)
    tok, key = mx.array([1]), mx.random.key(0)
    mx.eval(state)
    build_t, enc_t = [], []
    for i in range(tokens + 4):
        t0 = time.perf_counter()
        tok, _, state, key, _ = step(params, tok, state, key, None)
        t1 = time.perf_counter()
        mx.async_eval(tok, state)
        t2 = time.perf_counter()
        if i >= 4:
            build_t.append((t1 - t0) * 1e3)
            enc_t.append((t2 - t1) * 1e3)
        mx.synchronize()
    return statistics.median(build_t), statistics.median(enc_t)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args(argv)
    rows = {}
    m = build(cfg(a.layers, a.d_model))
    p = m.init(mx.random.key(0))
    mx.eval(p)
    from alloy import metal
    from alloy.inference.generate import prepare_decode
    pp = prepare_decode(m, p)
    if "decode_stack" in pp and metal.backend() == "cuda":
        mx.eval(pp)
        rows["stack_pipelined"] = per_token(step_runner(m, pp, True), a.tokens)
        rows["stack_sync"] = per_token(step_runner(m, pp, False), a.tokens)
        rows["stack_host_graph_build"], rows["stack_host_async_eval"] = host_split(m, pp, a.tokens)
        from alloy.metal import mamba2_stack
        st = m.init_state(1, 16)
        mc = m.config.mixer(0)[1]
        for nb in (mamba2_stack.resident_groups(), 2 * mamba2_stack.resident_groups()):
            box = {"x": mx.ones((1, a.d_model), mx.bfloat16) * 0.01,
                   "c": [ls["mixer"]["conv"] for ls in st["layers"]], "s": [ls["mixer"]["ssm"] for ls in st["layers"]]}

            def run(n, nb=nb, box=box):
                for _ in range(n):
                    h, c, s_ = mamba2_stack.launch(pp["decode_stack"]["0"], box["x"], box["c"], box["s"],
                                                   d_state=mc.d_state, norm_groups=mc.n_groups, eps=1e-5,
                                                   norm_eps=mc.norm_eps, dt_lim=(0.0, float("inf")), nb=nb)
                    box.update(x=h, c=c, s=s_)
                    mx.async_eval(h, *c, *s_)
            rows[f"stack_kernel_nb{nb}"] = per_token(run, a.tokens)
        del pp
    rows["step_pipelined"] = per_token(step_runner(m, p, True), a.tokens)
    rows["step_sync"] = per_token(step_runner(m, p, False), a.tokens)
    rows["host_graph_build"], rows["host_async_eval"] = host_split(m, p, a.tokens)
    Ws = [(lp["mixer"]["in_proj"]["weight"], lp["mixer"]["out_proj"]["weight"]) for lp in p["layers"]]
    di = Ws[0][1].shape[1]

    def chain(pre_t, kernel=False):
        ws = [(mx.contiguous(wi.T), mx.contiguous(wo.T)) if pre_t else (wi, wo) for wi, wo in Ws]
        mx.eval(ws)
        from alloy.metal.gemv import gemv

        def proj(x, w):
            if kernel:
                return gemv(x, w)
            return x @ w if pre_t else x @ w.T

        @mx.compile
        def f(x):
            for wi, wo in ws:
                x = x + proj(proj(x, wi)[:, :di], wo)
            return x
        box = {"x": mx.ones((1, a.d_model), mx.bfloat16) * 0.01}

        def run(n):
            for _ in range(n):
                box["x"] = f(box["x"])
                mx.async_eval(box["x"])
        return run
    rows["gemv_only"] = per_token(chain(False), a.tokens)
    rows["gemv_pre_t"] = per_token(chain(True), a.tokens)
    if metal.backend() is not None:
        rows["gemv_alloy_kernel"] = per_token(chain(False, kernel=True), a.tokens)
    from mlx.utils import tree_flatten
    nbytes = sum(v.nbytes for _, v in tree_flatten(p)) + 2 * sum(
        v.nbytes for _, v in tree_flatten(m.init_state(1, 16)))
    rows["bytes_roofline"] = nbytes / 3.35e12 * 1e3
    del p, Ws
    ms = build(cfg(a.layers, 256))
    ps = ms.init(mx.random.key(0))
    mx.eval(ps)
    rows["step_small"] = per_token(step_runner(ms, ps, True), a.tokens)
    rows["small_host_graph_build"], rows["small_host_async_eval"] = host_split(ms, ps, a.tokens)
    print(f"\n{a.layers} layers, d_model {a.d_model}, {mx.default_device()}")
    print("| row | ms / token | tok/s |\n|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v:.3f} | {1e3 / v:,.0f} |")
    return rows


if __name__ == "__main__":
    main()

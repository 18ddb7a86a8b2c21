"""GPU kernels of `alloy.metal` vs the MLX reference paths they replace, on the running device.

    python bench/kernels.py [--out DIR] [--quick]

Per case: median time per call, amortized over a batch of independent calls in one evaluation
where marked in `timeit` (decode steps: per step of 32 chained through their state) (after warm-up, `mx.synchronize` around each call), the minimum bytes the
op must move (inputs read once + outputs written once) and its FLOPs, the achieved TB/s and
TFLOP/s, and the fraction of the H100 roofline (time at max(bytes / 3.35 TB/s, FLOPs / 990
TFLOP/s) over measured time). Also a Mamba-2 1.3B-shaped model's batch-1 decode (tok/s) with the
kernels and with them switched off. Writes DIR/kernels.json and prints a markdown table last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import alloy  # noqa: F401  (before mlx.core)
import mlx.core as mx
from mlx.utils import tree_flatten

import alloy.metal as metal
from bench_timing import timeit
from alloy.metal import ssd_chunked as ssd_kernels
from alloy.ops import causal_conv1d, causal_conv1d_ref, selective_scan, ssd
from alloy.ops.gated_delta import gated_delta
from alloy.ops import selective_scan_step as ss_step_ops
from alloy.ops import ssd_step as ssd_step_ops

HBM = 3.35e12
PEAK = 990e12
BF16 = mx.bfloat16
F32 = mx.float32



def chained(step, st, n=32):
    """Per-step time of n decode steps chained through their state in one graph (the GPU's
    throughput for the step, not one Python call + sync per step)."""
    def run():
        s = st
        for _ in range(n):
            y, s = step(s)
        return y, s
    return timeit(run, reps=10) / n


def rnd(shape, dtype=BF16, scale=1.0, seed=0):
    return (scale * mx.random.normal(shape, key=mx.random.key(seed))).astype(dtype)


def posu(shape, lo, hi, seed=0):
    return mx.random.uniform(lo, hi, shape, key=mx.random.key(seed))


ROWS = []


def record(op, shape, impl, t, nbytes, flops, base=None):
    row = {"op": op, "shape": shape, "impl": impl, "ms": t * 1e3, "bytes": nbytes, "flops": flops,
           "TB/s": nbytes / t / 1e12, "TFLOP/s": flops / t / 1e12,
           "roofline": max(nbytes / HBM, flops / PEAK) / t}
    if base is not None:
        row["speedup"] = base / t
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    return t


def bench_conv(quick):
    for (B, T, C) in ([(1, 4096, 4352), (1, 1, 4352), (8, 1, 4352)] + ([] if quick else [(1, 16384, 4352)])):
        K = 4
        x, w, b, s = rnd((B, T, C)), rnd((C, K), seed=1), rnd((C,), seed=2), rnd((B, K - 1, C), seed=3)
        nbytes = 2 * (2 * B * T * C + C * K + C + 2 * B * (K - 1) * C)
        flops = B * T * C * (2 * K + 5)
        shape = f"B={B} T={T} C={C} K=4 bf16"
        base = record("conv1d+silu", shape, "MLX ops (ref)", timeit(lambda: causal_conv1d_ref(x, w, b, s, "silu"), batch=10), nbytes, flops)
        fc = mx.compile(lambda x, w, b, s: causal_conv1d_ref(x, w, b, s, "silu"))
        record("conv1d+silu", shape, "MLX ops, mx.compile", timeit(lambda: fc(x, w, b, s), batch=10), nbytes, flops, base)
        record("conv1d+silu", shape, "kernel", timeit(lambda: causal_conv1d(x, w, b, s, "silu", impl="kernel"), batch=10), nbytes, flops, base)


def ssd_args(b, l, h, p, g, n, seed=0):
    return (rnd((b, l, h, p), seed=seed), posu((b, l, h), 0.001, 0.1, seed + 1), -posu((h,), 1.0, 16.0, seed + 2),
            rnd((b, l, g, n), seed=seed + 3), rnd((b, l, g, n), seed=seed + 4), rnd((h,), F32, seed=seed + 5))


def bench_steps():
    for b in (1, 8):
        h, p, g, n = 64, 64, 1, 128
        x, dt, A, B, C, D = [a[:, 0] if a.ndim > 1 and a.shape[0] == b else a for a in ssd_args(b, 1, h, p, g, n)]
        st = rnd((b, h, p, n), F32, seed=9)
        nbytes = 2 * 4 * b * h * p * n + 2 * 2 * b * h * p + 2 * 2 * b * g * n + 4 * b * h
        flops = 5 * b * h * p * n
        shape = f"b={b} h=64 p=64 n=128 bf16"
        base = record("ssd step", shape, "MLX ops (ssd_step)", chained(lambda s: ssd_step_ops(x, dt, A, B, C, D, s), st), nbytes, flops)
        fc = mx.compile(ssd_step_ops)
        record("ssd step", shape, "MLX ops, mx.compile", chained(lambda s: fc(x, dt, A, B, C, D, s), st), nbytes, flops, base)
        record("ssd step", shape, "kernel", chained(lambda s: ssd(x[:, None], dt[:, None], A, B[:, None], C[:, None], D, s, impl="kernel"), st), nbytes, flops, base)
    for b in (1, 8):
        d, n = 4096, 16
        x, z = rnd((b, d)), rnd((b, d), seed=1)
        dt, A = posu((b, d), 0.001, 0.1, 2), -posu((d, n), 1.0, 16.0, 3)
        B, C, D = rnd((b, n), seed=4), rnd((b, n), seed=5), rnd((d,), F32, seed=6)
        st = rnd((b, d, n), F32, seed=7)
        nbytes = 2 * 4 * b * d * n + 4 * d * n + 3 * 2 * b * d + 4 * b * d
        flops = 6 * b * d * n
        shape = f"b={b} d=4096 n=16 bf16 gated"
        base = record("selective-scan step", shape, "MLX ops (selective_scan_step)", chained(lambda s: ss_step_ops(x, dt, A, B, C, D, z, s), st), nbytes, flops)
        fc = mx.compile(ss_step_ops)
        record("selective-scan step", shape, "MLX ops, mx.compile", chained(lambda s: fc(x, dt, A, B, C, D, z, s), st), nbytes, flops, base)
        record("selective-scan step", shape, "kernel", chained(lambda s: selective_scan(x[:, None], dt[:, None], A, B[:, None], C[:, None], D, z[:, None], s, impl="kernel"), st), nbytes, flops, base)


def bench_ssd(quick):
    h, p, g, n, b = 64, 64, 1, 128, 1
    for L in ((4096,) if quick else (4096, 16384)):
        x, dt, A, B, C, D = ssd_args(b, L, h, p, g, n)
        nbytes = 2 * 2 * b * L * h * p + 4 * b * L * h + 2 * 2 * b * L * g * n + 4 * b * h * p * n
        K = 256
        # FLOPs of the chunked algorithm (causal half of the diagonal blocks counted in full,
        # as the matmuls do): CB, diag, chunk states, state -> output
        flops = 2 * b * L * K * g * n + 2 * b * L * K * h * p + 2 * 2 * b * L * h * p * n
        shape = f"B=1 L={L} h=64 p=64 n=128 g=1 bf16"
        reps = 5 if L > 4096 else 10
        base = record("ssd forward", shape, "MLX ops (ssd_chunked, chunk 256)",
                      timeit(lambda: ssd(x, dt, A, B, C, D, chunk_size=256, impl="chunked"), reps=3, warm=1), nbytes, flops)
        h0 = mx.zeros((b, h, p, n), F32)
        for K in (256, 128, 64):
            record("ssd forward", shape, f"kernel path, chunk {K} (alloy.metal.ssd_chunked)",
                   timeit(lambda: ssd_kernels.ssd_chunked(x, dt, A, B, C, D, h0, K), reps=reps, batch=5), nbytes, flops, base)
        record("ssd forward", shape, "ssd(impl='auto') (kernel path, chunk 128)",
               timeit(lambda: ssd(x, dt, A, B, C, D), reps=reps, batch=5), nbytes, flops, base)
        record("ssd forward", shape, "ssd(impl='auto'), one call + sync",
               timeit(lambda: ssd(x, dt, A, B, C, D), reps=reps), nbytes, flops, base)


def bench_ssd_stages(L=16384, K=128):
    """Where the kernel path's time goes: each stage of `alloy.metal.ssd_chunked` timed alone
    (same launches as `ssd_chunked`, B = 1, no padding)."""
    from alloy.metal import ssd_chunked as sc
    h, p, g, n, b = 64, 64, 1, 128, 1
    x, dt, A, B, C, D = ssd_args(b, L, h, p, g, n)
    nc = L // K
    prep = lambda: sc.PREP([x, dt, A], template=[("T", BF16), ("KC", K), ("TB", 8)], grid=(1, h, b * nc), threadgroup=64,
                           output_shapes=[(b, nc, h, K), (b, nc, K, h, p), (b, nc, h)], output_dtypes=[F32, BF16, F32])
    acs, xs, decay = prep()
    xs = xs.reshape(b, nc, K, g, h * p // g).transpose(0, 1, 3, 2, 4)
    Bc, Cc = B.reshape(b, nc, K, g, n).transpose(0, 1, 3, 2, 4), C.reshape(b, nc, K, g, n).transpose(0, 1, 3, 2, 4)
    cb = lambda: Cc.astype(F32) @ Bc.astype(F32).swapaxes(-1, -2)
    CB = cb()
    Bt = Bc.swapaxes(-1, -2)
    states = Bt @ xs
    h0 = mx.zeros((b, h, p, n), F32)
    pas = lambda: sc.PASS([states, decay, h0], template=[("T", BF16), ("CBLK", 8)], grid=(sc.groups(b * h * p * n, sc.GROUP), 1, 1),
                          threadgroup=sc.GROUP, output_shapes=[states.shape, (b, h, p, n)], output_dtypes=[BF16, F32])
    starts = pas()[0]
    Yo = Cc @ starts
    mx.eval(acs, xs, decay, CB, states, starts, Yo)
    out_k = lambda: sc.OUT([CB, acs, x, dt, Yo, D], template=[("T", BF16), ("KC", K), ("PC", p), ("CG", 1), ("SB", 32)],
                           grid=(sc.groups(K, 64), h, b * nc), threadgroup=128, output_shapes=[(b, L, h, p)], output_dtypes=[BF16])
    out = {}
    for name, fn in (("PREP kernel", prep), ("CB = C B^T (f32)", cb), ("chunk states = B^T @ xs", lambda: Bt @ xs),
                     ("PASS kernel", pas), ("Yoff = C @ starts", lambda: Cc @ starts), ("OUT kernel", out_k)):
        out[name] = timeit(fn, reps=10, batch=10) * 1e3
        print(json.dumps({"ssd stage": name, "L": L, "chunk": K, "ms": out[name]}), flush=True)
    STAGES[(L, K)] = out


STAGES = {}


def bench_selective_scan(quick):
    b, d, n = 1, 4096, 16
    for L in ((2048,) if quick else (2048, 8192)):
        x, z = rnd((b, L, d)), rnd((b, L, d), seed=1)
        dt, A = posu((b, L, d), 0.001, 0.1, 2), -posu((d, n), 1.0, 16.0, 3)
        B, C, D = rnd((b, L, n), seed=4), rnd((b, L, n), seed=5), rnd((d,), F32, seed=6)
        nbytes = 3 * 2 * b * L * d + 4 * b * L * d + 2 * 2 * b * L * n + 2 * b * L * d
        flops = 7 * b * L * d * n
        shape = f"b=1 L={L} d=4096 n=16 bf16 gated"
        base = record("selective scan forward", shape, "MLX ops (chunked, chunk 64)",
                      timeit(lambda: selective_scan(x, dt, A, B, C, D, z, impl="chunked"), reps=3, warm=1), nbytes, flops)
        record("selective scan forward", shape, "kernel",
               timeit(lambda: selective_scan(x, dt, A, B, C, D, z, impl="kernel"), reps=10, batch=3), nbytes, flops, base)


def bench_decode(quick):
    """Batch-1 decode of a Mamba-2 1.3B-shaped model (48 layers, d_model 2048, bf16)."""
    cfg = {"name": "mamba2-1.3b-shape", "vocab_size": 50288, "d_model": 2048,
           "layer_types": ["mamba2"] * 48, "ffn_types": ["none"] * 48,
           "mixers": {"mamba2": {"d_state": 128, "head_dim": 64, "n_groups": 1, "chunk_size": 256}},
           "tie_embeddings": True, "dtype": "bfloat16"}
    model = alloy.build(cfg)
    params = model.init(mx.random.key(0))
    mx.eval(params)
    nparams = sum(v.size for _, v in tree_flatten(params))
    out = {}
    real_backend = metal.backend
    for label, patch in (("kernels", None), ("MLX ops (kernels off)", lambda: None)):
        if patch is not None:
            metal.backend = patch
        try:
            step = mx.compile(model.apply)
            state = model.init_state(1, 64)
            tok = mx.array([[1]], dtype=mx.int32)
            for _ in range(3):
                logits, state = step(params, tok, state)
                mx.eval(logits, state)
            n = 16 if quick else 64
            mx.synchronize()
            t = time.perf_counter()
            for _ in range(n):
                logits, state = step(params, tok, state)
                mx.eval(logits, state)
            mx.synchronize()
            dt = (time.perf_counter() - t) / n
        finally:
            metal.backend = real_backend
        out[label] = 1.0 / dt
        print(json.dumps({"decode": label, "tok/s": 1.0 / dt, "ms/token": dt * 1e3, "params": nparams}), flush=True)
    return out


def gdn_args(B, T, Hk, H, K, V, seed=0):
    q, k = rnd((B, T, Hk, K), seed=seed), rnd((B, T, Hk, K), seed=seed + 1)
    v = rnd((B, T, H, V), seed=seed + 2)
    g = -posu((B, T, H), 0.01, 0.5, seed=seed + 3)
    beta = posu((B, T, H), 0.1, 0.9, seed=seed + 4)
    return q, k, v, g, beta, mx.zeros((B, H, K, V), F32)


def bench_gdn(quick, lengths=None):
    """Gated delta rule (32 heads, K = V = 128, bf16, B = 1): the recurrent kernel for decode and
    short prompts, and the long-prompt paths at the issue's anchor shapes."""
    from alloy.ops.gated_delta import gated_delta_chunked, gated_delta_ref
    H = K = V = 128
    H = 32
    for T in lengths or ((1, 16, 64) + (() if quick else (4096, 16384))):
        q, k, v, g, beta, s0 = gdn_args(1, T, H, H, K, V)
        nbytes = 2 * T * H * (2 * K + V) + 8 * T * H + 2 * 4 * H * K * V + 2 * T * H * V
        flops = T * H * K * V * 8
        shape = f"B=1 T={T} H=32 K=V=128 bf16"
        base = None
        if T <= 64:
            base = record("gated delta", shape, "MLX ops (ref, token loop)",
                          timeit(lambda: gated_delta_ref(q, k, v, g, beta, s0), reps=10, batch=5), nbytes, flops)
        if T > 1:
            c = record("gated delta", shape, "MLX ops (chunked, chunk 64)",
                       timeit(lambda: gated_delta_chunked(q, k, v, g, beta, s0), reps=5 if T > 64 else 10,
                              batch=1 if T > 64 else 5), nbytes, flops, base)
            base = base or c
        if T <= 64:
            record("gated delta", shape, "recurrent kernel (alloy.metal.gated_delta_recurrent)",
                   timeit(lambda: gated_delta(q, k, v, g, beta, s0, impl="kernel"), reps=10, batch=5),
                   nbytes, flops, base)
        else:
            from alloy.metal.gated_delta_recurrent import gated_delta_recurrent
            if T <= 4096:
                record("gated delta", shape, "recurrent kernel (alloy.metal.gated_delta_recurrent)",
                       timeit(lambda: gated_delta_recurrent(q, k, v, g, beta, s0, True), reps=5),
                       nbytes, flops, base)
            record("gated delta", shape, "tensor-core WY kernels (gated_delta impl='kernel')",
                   timeit(lambda: gated_delta(q, k, v, g, beta, s0, impl="kernel"), reps=20), nbytes, flops, base)
            record("gated delta", shape, "tensor-core WY kernels, 4 calls per sync (amortized)",
                   timeit(lambda: gated_delta(q, k, v, g, beta, s0, impl="kernel"), reps=10, batch=4),
                   nbytes, flops, base)
            from alloy.metal import gated_delta_wy as wy
            parts = wy.prep(q, k, v, g, beta, True)
            mx.eval(parts)
            record("gated delta", shape, "  of which: WY prep kernel",
                   timeit(lambda: wy.prep(q, k, v, g, beta, True), reps=20), nbytes, flops)
            w, u, kd, qd, attn, dlast = parts
            passed = wy.state_pass(w, u, kd, dlast, s0)
            mx.eval(passed)
            record("gated delta", shape, "  of which: state pass kernel",
                   timeit(lambda: wy.state_pass(w, u, kd, dlast, s0), reps=20), nbytes, flops)
            record("gated delta", shape, "  of which: output kernel",
                   timeit(lambda: wy.output(qd, passed[1], attn, passed[0], g), reps=20), nbytes, flops)
            record("gated delta", shape, "chunked + SIMT pass kernel (previous path)",
                   timeit(lambda: gated_delta_chunked(q, k, v, g, beta, s0, pass_kernel=True), reps=10),
                   nbytes, flops, base)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="conv,steps,ssd,stages,sscan,gdn,decode")
    ap.add_argument("--gdn-lengths", help="comma list of T for the gdn rows (default 1,16,64,4096,16384)")
    a = ap.parse_args(argv)
    print(json.dumps({"device": str(mx.default_device()), "backend": metal.backend(), "mlx": mx.__version__}))
    if metal.backend() is None:
        print("no GPU backend: nothing to measure", file=sys.stderr)
        return 1
    only = a.only.split(",")
    decode = {}
    for name, fn in (("conv", lambda: bench_conv(a.quick)), ("steps", bench_steps),
                     ("ssd", lambda: bench_ssd(a.quick)),
                     ("stages", lambda: [bench_ssd_stages(16384, k) for k in (128, 64)]), ("sscan", lambda: bench_selective_scan(a.quick)),
                     ("gdn", lambda: bench_gdn(a.quick, a.gdn_lengths and tuple(int(t) for t in a.gdn_lengths.split(",")))),
                     ("decode", lambda: decode.update(bench_decode(a.quick)))):
        if name in only:
            try:
                fn()
            except Exception as e:  # keep the other measurements when one case fails
                print(json.dumps({"failed": name, "error": repr(e)}), flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "kernels.json"), "w") as f:
        json.dump({"rows": ROWS, "decode_tok_s": decode, "ssd_stages": {f"L={k[0]} chunk={k[1]}": v for k, v in STAGES.items()}, "mlx": mx.__version__}, f, indent=1)
    print("\n| op | shape | impl | ms | GB moved | GFLOP | TB/s | TFLOP/s | roofline | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in ROWS:
        print(f"| {r['op']} | {r['shape']} | {r['impl']} | {r['ms']:.4g} | {r['bytes'] / 1e9:.3g} | "
              f"{r['flops'] / 1e9:.3g} | {r['TB/s']:.3g} | {r['TFLOP/s']:.3g} | {r['roofline']:.1%} | "
              f"{r.get('speedup', 1.0):.2f}x |")
    for (L, K), st in STAGES.items():
        print(f"ssd kernel path stages, L={L} chunk {K}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in st.items()))
    for k, v in decode.items():
        print(f"decode Mamba-2 1.3B-shape, batch 1: {k}: {v:.1f} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

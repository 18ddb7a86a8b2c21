"""Causal attention forward and forward + backward at the toy train step's shape, in several forms.

    python bench/attn_bwd.py [--batch 16] [--seq 2048] [--heads 12] [--kv-heads 4] [--head-dim 64]

Each row times `mx.fast.scaled_dot_product_attention` (cuDNN on an H100) with bf16 q, k, v:
  gqa           q (B, H, T, D), k / v (B, KV, T, D) contiguous: the kernel's native GQA
  gqa_strided   as the toy layer feeds it: k / v transposed views of (B, T, KV, D)
  mha_repeat    k / v repeated to H heads first (`mx.repeat`, its VJP sums the group's gradients)
  mha           H key / value heads of their own (the FLOPs of gqa; what an MHA layer costs)
with milliseconds per call of the forward and of the forward + backward (the gradient of
sum(o * ct) w.r.t. q, k, v), and the backward's TFLOP/s counted as 2.5 x the causal forward's
4 B H T^2 D / 2 (the recomputation of the scores included).
"""
from __future__ import annotations

import argparse

import alloy  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

from bench_timing import timeit


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=20)
    a = p.parse_args(argv)
    B, T, H, KV, D = a.batch, a.seq, a.heads, a.kv_heads, a.head_dim
    r = H // KV
    key = mx.random.key(0)
    kq, kk, kv_, kc = mx.random.split(key, 4)
    bf = mx.bfloat16
    q = mx.random.normal((B, H, T, D), key=kq).astype(bf)
    k = mx.random.normal((B, KV, T, D), key=kk).astype(bf)
    v = mx.random.normal((B, KV, T, D), key=kv_).astype(bf)
    ks = mx.contiguous(k.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)  # strided views of (B, T, KV, D)
    vs = mx.contiguous(v.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    kf = mx.random.normal((B, H, T, D), key=kk).astype(bf)
    vf = mx.random.normal((B, H, T, D), key=kv_).astype(bf)
    ct = mx.random.normal((B, H, T, D), key=kc).astype(bf)
    mx.eval(q, k, v, ks, vs, kf, vf, ct)
    scale = D ** -0.5

    def sdpa(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")

    forms = {
        "gqa": (lambda q, k, v: sdpa(q, k, v), (q, k, v)),
        "gqa_strided": (lambda q, k, v: sdpa(q, k, v), (q, ks, vs)),
        "mha_repeat": (lambda q, k, v: sdpa(q, mx.repeat(k, r, axis=1), mx.repeat(v, r, axis=1)), (q, k, v)),
        "mha": (lambda q, k, v: sdpa(q, k, v), (q, kf, vf)),
    }
    flops_fwd = 4 * B * H * T * T * D / 2
    print(f"B {B} T {T} heads {H} kv {KV} head_dim {D}, causal, bf16; ms per call")
    print("| form | forward | forward + backward | backward TFLOP/s |")
    print("|---|---|---|---|")
    ref = None
    for name, (f, args) in forms.items():
        fwd = mx.compile(f)
        g = mx.compile(mx.grad(lambda *x: (f(*x) * ct).astype(mx.float32).sum(), argnums=(0, 1, 2)))
        if name in ("gqa", "gqa_strided", "mha_repeat"):  # same math: check the gradients agree
            got = g(*args)
            if ref is None:
                ref = got
            else:
                err = max(float(mx.abs(x.astype(mx.float32) - y.astype(mx.float32)).max()) for x, y in zip(got, ref))
                if err > 0.1:
                    raise SystemExit(f"{name}: gradients differ from gqa's by {err}")
        tf = timeit(lambda: fwd(*args), reps=a.reps, batch=4) * 1e3
        tg = timeit(lambda: g(*args), reps=a.reps, batch=4) * 1e3
        bwd = tg - tf
        print(f"| {name} | {tf:.3f} | {tg:.3f} | {2.5 * flops_fwd / (bwd * 1e-3) / 1e12:.0f} |")


if __name__ == "__main__":
    main()

"""The MLX chunked SSD's gradient stage by stage (what the kernel path's backward differentiates).

    python bench/ssd_grad_stages.py [--batch 16] [--T 2048] [--chunk 128]

At the toy training shape (24 heads x 64, d_state 128, 1 group; bf16 inputs, fp32 inside as in
`alloy.ops.ssd.ssd_chunked`), each stage of `ssd_chunked` is timed alone as forward and as forward +
backward (compiled gradient of sum(out * ct) w.r.t. its float inputs), on inputs of the shapes it
sees there. Rows print as they are measured, then the whole `ssd_chunked` for reference:
  segsum + exp       L = exp(segsum(dt A)) over (b, h, c, K, K)
  C B^T              the (b, g, c, K, K) scores
  diagonal blocks    Y_diag = (L * C B^T) X
  chunk states       each chunk's end state from its own inputs (the 3-operand einsum)
  state passing      the segsum over chunks and the (c+1) x (c+1) einsum
  off-diagonal       Y_off = C h_c e^cumsum (the 3-operand einsum)
and the two 3-operand einsums rewritten as one contraction plus an elementwise decay.
"""
from __future__ import annotations

import argparse
import importlib

import mlx.core as mx

from bench_timing import compiled_grad, timeit_ms

ssd_mod = importlib.import_module("alloy.ops.ssd")
F32 = mx.float32



def timeit(fn):
    return timeit_ms(fn, reps=3, warm=1)


def fwd_and_grad(f, *args):
    fc = mx.compile(f)
    g = compiled_grad(f, *args, seed=7)
    return timeit(lambda: fc(*args)), timeit(lambda: g(*args))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=128)
    a = ap.parse_args(argv)
    b, T, h, p, n, g, K = a.batch, a.T, 24, 64, 128, 1, a.chunk
    c, r = T // K, h // g
    ks = mx.random.split(mx.random.key(0), 8)
    acs = -mx.random.uniform(0.001, 0.1, (b, h, c, K), key=ks[0])            # dt A per token
    Bc = mx.random.normal((b, c, K, g, n), key=ks[1])
    Cc = mx.random.normal((b, c, K, g, n), key=ks[2])
    X = mx.random.normal((b, c, K, g, r, p), key=ks[3])
    L = mx.exp(ssd_mod._segsum(acs)).reshape(b, g, r, c, K, K)
    st = mx.random.normal((b, c + 1, h, p, n), key=ks[4]) * 0.1
    tot = mx.pad(mx.cumsum(acs, -1)[..., -1], [(0, 0), (0, 0), (1, 0)])
    hs = mx.random.normal((b, c, g, r, p, n), key=ks[5]) * 0.1
    sdo = mx.exp(mx.cumsum(acs, -1)).reshape(b, g, r, c, K)
    mx.eval(acs, Bc, Cc, X, L, st, tot, hs, sdo)
    stages = [
        ("segsum + exp", lambda a_: mx.exp(ssd_mod._segsum(a_)), (acs,)),
        ("C B^T", lambda C_, B_: mx.einsum("bclgn,bcsgn->bgcls", C_, B_), (Cc, Bc)),
        ("diagonal blocks", lambda LCB, X_: mx.einsum("bgrcls,bcsgrp->bclgrp", LCB, X_),
         (L * mx.einsum("bclgn,bcsgn->bgcls", Cc, Bc)[:, :, None], X)),
        ("chunk states", lambda B_, d_, X_: mx.einsum("bclgn,bgrcl,bclgrp->bcgrpn", B_, d_, X_),
         (Bc, L[..., -1, :], X)),
        ("chunk states, as two steps (decay into X, then one contraction)",
         lambda B_, d_, X_: mx.einsum("bclgn,bclgrp->bcgrpn", B_, X_ * d_.transpose(0, 3, 4, 1, 2)[..., None]),
         (Bc, L[..., -1, :], X)),
        ("state passing", lambda t_, s_: mx.einsum("bhzc,bchpn->bzhpn", mx.exp(ssd_mod._segsum(t_)), s_), (tot, st)),
        ("off-diagonal", lambda C_, h_, d_: mx.einsum("bclgn,bcgrpn,bgrcl->bclgrp", C_, h_, d_), (Cc, hs, sdo)),
        ("off-diagonal, as two steps (contraction, then decay)",
         lambda C_, h_, d_: mx.einsum("bclgn,bcgrpn->bclgrp", C_, h_) * d_.transpose(0, 3, 4, 1, 2)[..., None],
         (Cc, hs, sdo)),
    ]
    print(f"| stage (b={b}, T={T}, chunk {K}, fp32) | forward ms | forward + backward ms |\n|---|---|---|", flush=True)
    for name, f, args in stages:
        fw, fb = fwd_and_grad(f, *args)
        print(f"| {name} | {fw:.2f} | {fb:.2f} |", flush=True)
    x = mx.random.normal((b, T, h, p), key=ks[6]).astype(mx.bfloat16)
    dt = mx.random.uniform(0.001, 0.1, (b, T, h), key=ks[7])
    A = -mx.ones((h,))
    Bm, Cm = Bc.reshape(b, T, g, n).astype(mx.bfloat16), Cc.reshape(b, T, g, n).astype(mx.bfloat16)
    fw, fb = fwd_and_grad(lambda x_, dt_, B_, C_: ssd_mod.ssd_chunked(x_, dt_, A, B_, C_, None, None, K)[0].astype(F32),
                          x, dt, Bm, Cm)
    print(f"| whole ssd_chunked | {fw:.2f} | {fb:.2f} |", flush=True)


if __name__ == "__main__":
    main()

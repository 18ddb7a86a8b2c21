"""Where the time of the tensor-core gated delta rule goes (`alloy.metal.gated_delta_wy`), on a GPU.

    python bench/gdn_probe.py [--T 16384] [--out DIR]

Times (median ms) the three launches and the whole op at B=1, H=32, K=V=128, bf16, then variants of
the shipped kernels that each remove or change one part (their outputs are wrong; timing only):
  prep_nosub     PREP without the forward substitution (T = I)
  prep_lb2       PREP with 2 resident groups per SM as the register cap (no spill) instead of 3
  prep_nogram    PREP without the Gram / attention tile products
  pass_nohs      PASS without writing S_c
Prints one JSON line per row and a table last.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

import mlx.core as mx

from alloy.metal import gated_delta_wy as wy
from bench_timing import timeit_ms as timeit



def variant(kernel, suffix, *edits, launch_bounds=None):
    body = kernel.body
    for old, new in edits:
        assert body.count(old) == 1, (suffix, old)
        body = body.replace(old, new)
    return dataclasses.replace(kernel, name=kernel.name + "_" + suffix, body=body,
                               launch_bounds=kernel.launch_bounds if launch_bounds is None else launch_bounds)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=16384)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args(argv)
    B, T, H, K = 1, a.T, 32, 128
    key = mx.random.key(0)
    ks = mx.random.split(key, 5)
    q = mx.random.normal((B, T, H, K), key=ks[0]).astype(mx.bfloat16)
    k = mx.random.normal((B, T, H, K), key=ks[1]).astype(mx.bfloat16)
    v = mx.random.normal((B, T, H, K), key=ks[2]).astype(mx.bfloat16)
    g = -mx.random.uniform(0.01, 0.5, (B, T, H), key=ks[3])
    beta = mx.random.uniform(0.1, 0.9, (B, T, H), key=ks[4])
    s0 = mx.zeros((B, H, K, K))
    rows = []

    def rec(name, ms):
        rows.append((name, ms))
        print(json.dumps({"T": T, "row": name, "ms": ms}), flush=True)

    rec("whole op (prep + pass + out)", timeit(lambda: wy.gated_delta_wy(q, k, v, g, beta, s0)))
    parts = wy.prep(q, k, v, g, beta, True)
    mx.eval(parts)
    w, u, kd, qd, attn, dlast = parts
    rec("prep", timeit(lambda: wy.prep(q, k, v, g, beta, True)))
    vt, hs, s = wy.state_pass(w, u, kd, dlast, s0)
    mx.eval(vt, hs, s)
    rec("pass", timeit(lambda: wy.state_pass(w, u, kd, dlast, s0)))
    rec("out", timeit(lambda: wy.output(qd, hs, attn, vt, g)))
    shipped_prep, shipped_pass = wy.PREP, wy.PASS
    prep_variants = {
        "prep_nosub": variant(shipped_prep, "nosub", ("      s0 -= sl[i * (i - 1) / 2 + j] * x[j];\n", ""),
                              ("        s1 -= sl[i * (i - 1) / 2 + j + 1] * x[j + 1];\n", ""),
                              ("      if (i & 1) s0 -= sl[i * (i - 1) / 2 + i - 1] * x[i - 1];\n", "")),
        "prep_lb2": variant(shipped_prep, "lb2", launch_bounds=(wy.NT, 2)),
        "prep_nogram": variant(shipped_prep, "nogram", ("    for (int kk = 0; kk < KD / 16; ++kk)\n      mma16t(", "    for (int kk = 0; kk < 0; ++kk)\n      mma16t(")),
    }
    try:
        for name, kern in prep_variants.items():
            wy.PREP = kern
            rec(name, timeit(lambda: wy.prep(q, k, v, g, beta, True)))
    finally:
        wy.PREP = shipped_prep
    try:
        wy.PASS = variant(shipped_pass, "nohs", ("      st8(hs + ((bh * n + c) * VD + n0 + r) * KD + d, f);\n", ""))
        rec("pass_nohs", timeit(lambda: wy.state_pass(w, u, kd, dlast, s0)))
    finally:
        wy.PASS = shipped_pass
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"gdn_probe_T{T}.json"), "w") as f:
        json.dump([{"row": r, "ms": m} for r, m in rows], f, indent=1)
    print(f"\n| row (T={T}) | ms |\n|---|---|")
    for r, m in rows:
        print(f"| {r} | {m:.3f} |")


if __name__ == "__main__":
    main()

"""Where the persistent Mamba-2 stack kernel's time goes (H100): variants of its body, timed alone.

    python bench/stack_probe.py [--layers 48] [--iters 20]

Rows (ms per launch, median, each launch synchronised): the kernel as shipped; the same with the
grid barriers replaced by group barriers (wrong results: the barrier's share); the barrier with a
`__nanosleep` back-off in the spin; a body of nothing but 3 x layers + 1 grid barriers.
"""
from __future__ import annotations

import alloy  # noqa: F401

import argparse
import re
import statistics
import time

import mlx.core as mx

from alloy.metal import mamba2_stack as K
from alloy.metal.prelude import Kernel

STREAM = """
  // every weight byte once, grid-strided 16-byte loads, summed (the bandwidth this grid can pull)
  float acc = 0.0f;
  const long nin = static_cast<long>(NL) * (2 * DIN + 2 * NGR * NS + DIN / HD) * DM;
  const long nout = static_cast<long>(NL) * DM * DIN;
  for (long i = (static_cast<long>(bid_x) * NT + tid) * 8; i < nin; i += static_cast<long>(NB) * NT * 8) {
    float w[8];
    ld8(win + i, w);
    for (int j = 0; j < 8; ++j) acc += w[j];
  }
  for (long i = (static_cast<long>(bid_x) * NT + tid) * 8; i < nout; i += static_cast<long>(NB) * NT * 8) {
    float w[8];
    ld8(wout + i, w);
    for (int j = 0; j < 8; ++j) acc += w[j];
  }
  if (acc == 12345.0f) res[0] = acc;
"""

SLEEPY = """
DEVICE_FN void grid_sync_sleepy(const unsigned int* counter, unsigned int target, unsigned int t) {
  BARRIER();
  if (t == 0) {
    unsigned int* c = const_cast<unsigned int*>(counter);
    __threadfence();
    atomicAdd(c, 1u);
    for (unsigned int k = 0; *reinterpret_cast<volatile unsigned int*>(c) < target && k < (1u << 24); ++k) {
      __nanosleep(64);
    }
    __threadfence();
  }
  BARRIER();
}
"""


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--only", default=None, help="comma-separated variant names (e.g. for ncu)")
    a = ap.parse_args(argv)
    NL, DM, DIN, NS, H = a.layers, 2048, 4096, 128, 64
    DP = 2 * DIN + 2 * NS + H
    CD = DIN + 2 * NS
    bf = mx.bfloat16
    r = lambda *s: (mx.random.normal(s) * 0.02).astype(bf)  # noqa: E731
    stack = {"win": r(NL, DP, DM), "wout": r(NL, DM, DIN), "cw": r(NL, CD, 4), "cb": r(NL, CD),
             "dtb": r(NL, H), "alog": r(NL, H), "dsk": r(NL, H), "nw": mx.ones((NL, DM)), "gw": mx.ones((NL, DIN))}
    x = r(1, DM)
    convs = [r(1, 3, CD) for _ in range(NL)]
    ssms = [mx.zeros((1, H, 64, NS)) for _ in range(NL)]
    mx.eval(stack, x, convs, ssms)
    base = K.kernel(NL)
    variants = {
        "shipped": base,
        "no_grid_sync": Kernel(base.name + "_nosync", base.inputs, base.outputs, launch_bounds=base.launch_bounds, body=
                               base.body.replace("grid_sync(bar, nsync, tid);", "BARRIER();")),
        "flat_sleepy_sync": Kernel(base.name + "_sleepy", base.inputs, base.outputs, launch_bounds=base.launch_bounds, body=
                              base.body.replace("grid_sync(bar, nsync, tid);", "grid_sync_sleepy(bar, nsync, tid);"),
                              helpers=SLEEPY),
        "projections_only": Kernel(base.name + "_proj", base.inputs, base.outputs, launch_bounds=base.launch_bounds, body=
                                   re.sub(r"if \(ph == 2\) \{  // <phase B>.*?// </phase B>", "", base.body, flags=re.S)
                                   .replace("grid_sync(bar, nsync, tid);", "BARRIER();")),
        "stream_weights": Kernel(base.name + "_stream", base.inputs, base.outputs, launch_bounds=base.launch_bounds, body= STREAM),
        "syncs_only": Kernel(base.name + "_syncs", base.inputs, base.outputs, launch_bounds=base.launch_bounds, body=
                             "  unsigned int n = 0;\n  for (int i = 0; i < 3 * NL + 1; ++i) { n += NB; grid_sync(bar, n, tid); }\n"),
    }
    rows = {}
    for name, kern in variants.items():
        if a.only and name not in a.only.split(","):
            continue
        for nb in (K.resident_groups(), 2 * K.resident_groups()):
            if name not in ("projections_only", "stream_weights") and nb != K.resident_groups():
                # grid barriers need every group resident: never more groups than one per SM here
                continue
            def once():
                out = K.launch(stack, x, convs, ssms, d_state=NS, norm_groups=1, eps=1e-5, norm_eps=1e-5,
                               dt_lim=(0.0, float("inf")), nb=nb, run=kern)
                mx.eval(out)
            once()
            ts = []
            for _ in range(a.iters):
                t = time.perf_counter()
                once()
                ts.append((time.perf_counter() - t) * 1e3)
            rows[f"{name} nb{nb}"] = statistics.median(ts)
            print(f"{name} nb{nb}: {rows[f'{name} nb{nb}']:.3f} ms", flush=True)
    print("| variant | ms / launch |\n|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v:.3f} |")


if __name__ == "__main__":
    main()

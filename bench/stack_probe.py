"""Where the persistent Mamba-2 stack kernel's time goes (H100): variants of its body, timed alone.

    python bench/stack_probe.py [--layers 48] [--iters 20] [--gsync 0,1,2,3] [--cu 8,4]

Rows (ms per launch, median, each launch synchronised): the kernel as shipped; the same with the
grid barriers replaced by group barriers (wrong results: the barrier's share); the barrier with a
`__nanosleep` back-off in the spin; a body of nothing but 3 x layers + 1 grid barriers.
--timeline stamps every grid barrier's arrival and exit per group (%globaltimer; CUDA only) and
prints, per phase kind (A: norm + in_proj, B: conv + SSD, C: gated norm + out_proj), the phase's
length per group (median over layers of the groups' median / max), the arrival skew and the
barrier's own latency (last arrival -> first exit, last exit). --threads 512 runs one 512-thread
group per SM instead of two 256-thread groups.
--gsync repeats the rows for each grid-barrier scheme of the CUDA prelude (ALLOY_GRID_SYNC, see
`grid_sync` there); --cu for each work-unit width (8-column blocks per lane; default: the dtype's).
"""
from __future__ import annotations

import alloy  # noqa: F401

import argparse
import os
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


STAMP = """
DEVICE_FN unsigned long long alloy_gtime() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}
"""


def stamped(kern: Kernel) -> Kernel:
    """The kernel with thread 0 of each group writing %globaltimer before and after every grid barrier
    into an extra output `tsc` (groups, stamps)."""
    body = kern.body.replace("unsigned int nsync = 0;", "unsigned int nsync = 0;\n  int ts_i = 0;", 1)
    stamp = "if (tid == 0) tsc[bid_x * (2 * (3 * NL + 1)) + ts_i] = alloy_gtime(); ++ts_i;\n"
    body = body.replace("grid_arrive(bar, nsync, tid);", stamp + "grid_arrive(bar, nsync, tid);")
    body = body.replace("grid_wait(bar, nsync, tid);", "grid_wait(bar, nsync, tid);\n" + stamp)
    return Kernel(kern.name + "_stamped", kern.inputs, kern.outputs + ("tsc",), body, helpers=STAMP,
                  launch_bounds=kern.launch_bounds)


def timeline(ts, n_layers: int) -> None:
    """Print phase lengths, arrival skew and barrier latency from the (groups, 2 * barriers) stamps."""
    import numpy as np

    t = np.asarray(ts, dtype=np.int64)[:, :2 * 3 * n_layers]  # 3 x layers barriers were stamped
    t = (t - t.min()).astype(np.float64) / 1e3  # us
    arrive, leave = t[:, 0::2], t[:, 1::2]  # barrier b: (groups,)
    nbar = arrive.shape[1]
    kinds = {"A": [], "B": [], "C": []}
    for b in range(1, nbar):  # phase between barrier b-1 and b: 0 prologue, then A, B, C per layer
        kind = "ABC"[(b - 1) % 3]
        d = arrive[:, b] - leave[:, b - 1]
        kinds[kind].append((np.median(d), d.max(), arrive[:, b].max() - arrive[:, b].min(),
                            leave[:, b].min() - arrive[:, b].max(), leave[:, b].max() - arrive[:, b].max()))
    print(f"timeline: {nbar} barriers, total {leave.max() - arrive.min():.1f} us ({n_layers} layers)")
    print("| phase before barrier | length median group (us) | length max group | arrival skew | "
          "last arrival -> first exit | last arrival -> last exit |\n|---|---|---|---|---|---|")
    for k, rows in kinds.items():
        if rows:
            m = np.median(np.array(rows), axis=0)
            print(f"| {k} | {m[0]:.2f} | {m[1]:.2f} | {m[2]:.2f} | {m[3]:.2f} | {m[4]:.2f} |", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--only", default=None, help="comma-separated variant names (e.g. for ncu)")
    ap.add_argument("--gsync", default=None, help="comma-separated grid-barrier schemes (ALLOY_GRID_SYNC)")
    ap.add_argument("--cu", default=None, help="comma-separated work-unit widths (launch's cu)")
    ap.add_argument("--pf", default=None, help="comma-separated L2-prefetched units (launch's pf)")
    ap.add_argument("--timeline", action="store_true", help="per-phase timeline of the shipped kernel (--pf values)")
    ap.add_argument("--threads", type=int, default=K.NT, help="threads per group (512: one group per SM)")
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
    per_sm = 2 if a.threads <= 256 else 1
    if a.threads != K.NT:
        base = Kernel(base.name + f"_t{a.threads}", base.inputs, base.outputs, base.body,
                      launch_bounds=(a.threads, per_sm))
    groups = K.resident_groups() // K.PER_SM * per_sm
    if a.timeline:  # the shipped body only: the variants below replace the barriers the stamps mark
        for pf in ([int(p) for p in a.pf.split(",")] if a.pf else [None]):
            kern = stamped(base)
            print("== timeline" + (f" pf{pf}" if pf is not None else ""), flush=True)
            got = {}

            def run(inputs, *, template, grid, threadgroup, output_shapes, output_dtypes):
                outs = kern(inputs, template=template, grid=grid, threadgroup=threadgroup,
                            output_shapes=list(output_shapes) + [(grid[0], 2 * (3 * NL + 1))],
                            output_dtypes=list(output_dtypes) + [mx.uint64])
                got["ts"] = outs[-1]
                return outs[:-1]
            for _ in range(3):
                out = K.launch(stack, x, convs, ssms, d_state=NS, norm_groups=1, eps=1e-5, norm_eps=1e-5,
                               dt_lim=(0.0, float("inf")), nb=groups, threads=a.threads, run=run,
                               cu=int(a.cu.split(",")[0]) if a.cu else None, pf=pf)
                mx.eval(out, got["ts"])
            timeline(got["ts"], NL)
        return
    variants = {
        "shipped": base,
        "no_grid_sync": Kernel(base.name + "_nosync", base.inputs, base.outputs, launch_bounds=base.launch_bounds, body=
                               base.body.replace("grid_arrive(bar, nsync, tid);", "BARRIER();")
                               .replace("grid_wait(bar, nsync, tid);", "")),
        "flat_sleepy_sync": Kernel(base.name + "_sleepy", base.inputs, base.outputs, launch_bounds=base.launch_bounds, body=
                              base.body.replace("grid_arrive(bar, nsync, tid);", "")
                              .replace("grid_wait(bar, nsync, tid);", "grid_sync_sleepy(bar, nsync, tid);"),
                              helpers=SLEEPY),
        "projections_only": Kernel(base.name + "_proj", base.inputs, base.outputs, launch_bounds=base.launch_bounds, body=
                                   re.sub(r"if \(ph == 2\) \{  // <phase B>.*?// </phase B>", "", base.body, flags=re.S)
                                   .replace("grid_arrive(bar, nsync, tid);", "BARRIER();")
                                   .replace("grid_wait(bar, nsync, tid);", "")),
        "stream_weights": Kernel(base.name + "_stream", base.inputs, base.outputs, launch_bounds=base.launch_bounds, body= STREAM),
        "syncs_only": Kernel(base.name + "_syncs", base.inputs, base.outputs, launch_bounds=base.launch_bounds, body=
                             "  unsigned int n = 0;\n  for (int i = 0; i < 3 * NL + 1; ++i) { n += NB; grid_sync(bar, n, tid); }\n"),
    }
    rows = {}
    for gs in (a.gsync.split(",") if a.gsync else [None]):
        if gs is not None:
            os.environ["ALLOY_GRID_SYNC"] = gs
        for cu in ([int(c) for c in a.cu.split(",")] if a.cu else [None]):
            for name, kern in variants.items():
                if a.only and name not in a.only.split(","):
                    continue
                if cu is not None and name in ("syncs_only", "stream_weights") and cu != int(a.cu.split(",")[0]):
                    continue
                for nb in (groups, 2 * groups):
                    if name not in ("projections_only", "stream_weights") and nb != groups:
                        # grid barriers need every group resident: never more groups than fit at once
                        continue

                    def once():
                        out = K.launch(stack, x, convs, ssms, d_state=NS, norm_groups=1, eps=1e-5, norm_eps=1e-5,
                                       dt_lim=(0.0, float("inf")), nb=nb, threads=a.threads, run=kern, cu=cu)
                        mx.eval(out)
                    once()
                    ts = []
                    for _ in range(a.iters):
                        t = time.perf_counter()
                        once()
                        ts.append((time.perf_counter() - t) * 1e3)
                    key = f"{name} nb{nb}" + (f" gsync{gs}" if gs is not None else "") + (f" cu{cu}" if cu else "")
                    rows[key] = statistics.median(ts)
                    print(f"{key}: {rows[key]:.3f} ms", flush=True)
    print("| variant | ms / launch |\n|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v:.3f} |")


if __name__ == "__main__":
    main()

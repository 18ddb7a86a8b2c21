"""The official Triton kernels at the kernels issue's shapes, timed in the same job as `bench/kernels.py`.

    PYTHONPATH=.gpu/tri python bench/triton_anchors.py [--out DIR]

Needs PyTorch with CUDA + Triton (present on the GPU machine) and, on PYTHONPATH, the pure-Python
packages of state-spaces/mamba (`mamba_ssm/ops/triton`, `mamba_ssm/utils`, from its sdist) and
flash-linear-attention (`fla`, from its wheels), staged into the git-ignored `.gpu/tri` folder and
carried to the machine — never committed (see docs/kernels.md for the staging commands).

Timed, bf16, batch 1 (median of 20 after 3 warm-ups, CUDA events around each call):
  ssd      mamba_chunk_scan_combined, 64 heads x 64, d_state 128, 1 group, chunk 256, L = 4096 / 16384:
           forward, and forward + backward
  gdn      fla chunk_gated_delta_rule, 32 heads, K = V = 128, T = 4096 / 16384, forward
  gdn_rec  fla fused_recurrent_gated_delta_rule, one decode token, same heads
Writes triton_anchors.json to --out and prints a table last.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys


def timed(torch, fn, reps=20, warm=3):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--lengths", default="4096,16384")
    ap.add_argument("--only", default="ssd,gdn", help="comma list of ssd, gdn")
    args = ap.parse_args(argv)
    import torch
    import torch.nn.functional as F

    dev, bf = "cuda", torch.bfloat16
    torch.manual_seed(0)
    rows = []
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    lengths = [int(v) for v in args.lengths.split(",")]
    try:
        if "ssd" not in args.only:
            raise LookupError("ssd not asked for")
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        for L in lengths:
            h, p, n = 64, 64, 128
            x = torch.randn(1, L, h, p, device=dev, dtype=bf)
            dt = F.softplus(torch.randn(1, L, h, device=dev) - 3.0).to(bf)
            A = -torch.rand(h, device=dev) - 0.5
            B = torch.randn(1, L, 1, n, device=dev, dtype=bf)
            C = torch.randn(1, L, 1, n, device=dev, dtype=bf)
            D = torch.randn(h, device=dev)
            ms = timed(torch, lambda: mamba_chunk_scan_combined(x, dt, A, B, C, 256, D=D))
            rows.append({"op": "ssd_fwd", "impl": "triton (mamba_ssm)", "L": L, "ms": ms})
            xs = [t.detach().clone().requires_grad_(True) for t in (x, dt, B, C)]
            go = torch.randn_like(x)

            def fwd_bwd():
                y = mamba_chunk_scan_combined(xs[0], xs[1], A, xs[2], xs[3], 256, D=D)
                torch.autograd.grad(y, xs, go)
            ms = timed(torch, fwd_bwd)
            rows.append({"op": "ssd_fwd_bwd", "impl": "triton (mamba_ssm)", "L": L, "ms": ms})
            print(rows[-2], rows[-1], flush=True)
    except Exception as e:  # report and go on: the other anchor may still run
        print(f"mamba_ssm anchor failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    try:
        if "gdn" not in args.only:
            raise LookupError("gdn not asked for")
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
        for T in lengths:
            H, K = 32, 128
            q = F.normalize(torch.randn(1, T, H, K, device=dev), dim=-1).to(bf)
            k = F.normalize(torch.randn(1, T, H, K, device=dev), dim=-1).to(bf)
            v = torch.randn(1, T, H, K, device=dev, dtype=bf)
            g = F.logsigmoid(torch.randn(1, T, H, device=dev))
            beta = torch.rand(1, T, H, device=dev).to(bf)
            s0 = torch.zeros(1, H, K, K, device=dev)
            ms = timed(torch, lambda: chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0,
                                                              output_final_state=True))
            rows.append({"op": "gdn_chunked_fwd", "impl": "triton (fla)", "L": T, "ms": ms})
            print(rows[-1], flush=True)
        q1, k1, v1 = q[:, :1].contiguous(), k[:, :1].contiguous(), v[:, :1].contiguous()
        g1, b1 = g[:, :1].contiguous(), beta[:, :1].contiguous()
        ms = timed(torch, lambda: fused_recurrent_gated_delta_rule(q1, k1, v1, g1, beta=b1, initial_state=s0,
                                                                    output_final_state=True), reps=50)
        rows.append({"op": "gdn_step", "impl": "triton (fla)", "L": 1, "ms": ms})
        print(rows[-1], flush=True)
    except Exception as e:
        print(f"fla anchor failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "triton_anchors.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("\n| op | impl | L | ms |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['op']} | {r['impl']} | {r['L']} | {r['ms']:.3f} |")
    return rows


if __name__ == "__main__":
    main()

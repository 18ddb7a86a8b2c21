"""Does the OpenBLAS preload take effect, and does it give the same results?

Runs the same workload in two fresh processes, with and without ``ALLOY_NO_OPENBLAS=1``, and
prints which BLAS each loaded, matmul and model-forward timings, and the largest difference
between their outputs.

    python bench/blas.py            # CPU, this machine
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

WORKER = r"""
import json, sys, time
import alloy, alloy._blas as blas
import mlx.core as mx, numpy as np
out = sys.argv[1]
def med(fn, n):
    ts = []
    for _ in range(n):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 2]
a = mx.random.normal((1024, 1024), key=mx.random.key(0)); b = mx.random.normal((1024, 1024), key=mx.random.key(1))
mx.eval(a, b, a @ b)
mm = med(lambda: mx.eval(a @ b), 5)
from alloy.demo import bundled_config_path, _sample_tokens
model = alloy.build(bundled_config_path()); params = model.init(mx.random.key(0)); mx.eval(params)
tok = _sample_tokens(2, 128)
fwd = mx.compile(model.apply); mx.eval(fwd(params, tok)[0])
fw = med(lambda: mx.eval(fwd(params, tok)[0]), 3)
np.savez(out, mm=np.array(a @ b), logits=np.array(fwd(params, tok)[0]))
print(json.dumps({"blas": blas.LOADED, "skipped": blas.SKIPPED_REASON, "matmul_1024_s": mm, "forward_2x128_s": fw}))
"""


def run(env_extra: dict, out: str) -> dict:
    env = {**os.environ, **env_extra}
    res = subprocess.run([sys.executable, "-c", WORKER, out], env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    import numpy as np

    with tempfile.TemporaryDirectory() as d:
        fast = run({}, os.path.join(d, "fast.npz"))
        ref = run({"ALLOY_NO_OPENBLAS": "1"}, os.path.join(d, "ref.npz"))
        f, r = np.load(os.path.join(d, "fast.npz")), np.load(os.path.join(d, "ref.npz"))
        dmm = float(np.abs(f["mm"] - r["mm"]).max() / np.abs(r["mm"]).max())
        dlg = float(np.abs(f["logits"] - r["logits"]).max())
    print(f"{'BLAS':<48} {'matmul 1024^2 fp32':>20} {'hybrid-tiny fwd 2x128':>22}")
    for name, x in (("preloaded: " + str(fast["blas"]), fast), ("reference (ALLOY_NO_OPENBLAS=1)", ref)):
        print(f"{name:<48} {x['matmul_1024_s'] * 1e3:>17.1f} ms {x['forward_2x128_s'] * 1e3:>19.1f} ms")
    print(f"speedup: matmul {ref['matmul_1024_s'] / fast['matmul_1024_s']:.1f}x, "
          f"forward {ref['forward_2x128_s'] / fast['forward_2x128_s']:.1f}x")
    print(f"max relative matmul difference {dmm:.2e}; max logit difference {dlg:.2e}")
    if fast["blas"] is None:
        print(f"OpenBLAS was NOT loaded: {fast['skipped']}")
        return 1
    return 0 if dmm < 1e-5 and dlg < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())

"""The pipelined norm gradient kernels (`alloy.metal.gated_norm.BWD_PIPE`) on the GPU at the toy
training shapes (4096 rows; D 1536 gated, Mamba-2's output norm; D 768 plain and with the residual
add), bf16: against the per-warp kernels (BWD_PIPE off) and the references' autodiff
(`pytest -m gpu`; skipped where no CUDA / Metal device)."""
import mlx.core as mx
import numpy as np
import pytest

from alloy import metal
from alloy.metal import gated_norm as kern
from alloy.metal.testing import DTYPES, arr, rel_err
from alloy.ops.norm import gated_rms_norm_ref

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(metal.backend() is None, reason="no CUDA or Metal GPU backend")]

ROWS = 4096


def _both(monkeypatch, f, **pipe):
    """f() with BWD_PIPE on (and the given PIPE_ settings), then off."""
    monkeypatch.setattr(kern, "BWD_PIPE", True)
    for k, v in pipe.items():
        monkeypatch.setattr(kern, k, v)
    new = f()
    mx.eval(new)
    monkeypatch.setattr(kern, "BWD_PIPE", False)
    old = f()
    mx.eval(old)
    return new, old


@pytest.mark.parametrize("pipe", [{}, {"PIPE_PREFETCH": False}, {"PIPE_KEEP_SIG": False},
                                  {"PIPE_COLS": 16, "PIPE_ROWS": 64}])
@pytest.mark.parametrize("nbg,G", [(False, None), (True, None), (False, 768)])
def test_pipelined_gated_norm_gradient_matches_old_kernel_and_ref(monkeypatch, nbg, G, pipe):
    rng = np.random.default_rng(0)
    bf = DTYPES["bf16"]
    x, z, w, dy = arr(rng, (ROWS, 1536), bf), arr(rng, (ROWS, 1536), bf), arr(rng, (1536,), bf), arr(rng, (ROWS, 1536), bf)
    new, old = _both(monkeypatch, lambda: kern.gated_rms_norm_vjp(x, z, w, 1e-5, G, nbg, dy), **pipe)
    xf, zf, wf, dyf = (a.astype(mx.float32) for a in (x, z, w, dy))
    _, want = mx.vjp(lambda x, z, w: gated_rms_norm_ref(x, z, w, 1e-5, G, nbg), [xf, zf, wf], [dyf])
    for name, n, o, r in zip(("dx", "dz", "dw"), new, old, want):
        assert n.dtype == bf and n.shape == r.shape, name
        assert rel_err(n, o) <= 1e-2, (name, rel_err(n, o))
        assert rel_err(n, r) <= 3e-2, (name, rel_err(n, r))


@pytest.mark.parametrize("pipe", [{}, {"PIPE_PREFETCH": False}, {"PIPE_COLS": 24}])
@pytest.mark.parametrize("add", [False, True])
def test_pipelined_plain_and_add_norm_gradients_match_old_kernel_and_mlx(monkeypatch, add, pipe):
    rng = np.random.default_rng(1)
    bf = DTYPES["bf16"]
    x, w = arr(rng, (ROWS, 768), bf, 2.0), arr(rng, (768,), bf)
    dhs, dy = arr(rng, (ROWS, 768), bf), arr(rng, (ROWS, 768), bf)
    f = (lambda: kern.add_rms_norm_vjp(x, w, 1e-5, dhs, dy)) if add else (lambda: kern.rms_norm_vjp(x, w, 1e-5, dy))
    new, old = _both(monkeypatch, f, **pipe)
    xf, wf, dyf = (a.astype(mx.float32) for a in (x, w, dy))
    _, (dx, dw) = mx.vjp(lambda x, w: [mx.fast.rms_norm(x, w, 1e-5)], [xf, wf], [dyf])
    want = (dx + dhs.astype(mx.float32) if add else dx, dw)
    for name, n, o, r in zip(("dx", "dw"), new, old, want):
        assert n.dtype == bf and n.shape == r.shape, name
        assert rel_err(n, o) <= 1e-2, (name, rel_err(n, o))
        assert rel_err(n, r) <= 3e-2, (name, rel_err(n, r))

"""CHUNK_OUT_TC's 16-byte epilogue (switch `alloy.metal.ssd_chunked.OUT_TC_VEC_EPILOGUE`) on the GPU
(`pytest -m gpu`; skipped where no CUDA/Metal device): `ssd_chunked` at the toy shape (b 2, T 2048,
24 heads of 64, d_state 128, one group, chunk 128, bf16; the Yo matmul path, OUT_FUSED_YO off) with
the switch on and off launches CHUNK_OUT_TC / CHUNK_OUT_TC_ACC and writes bit-identical y; a length
that is not whole chunks (T 1000) too."""
import mlx.core as mx
import numpy as np
import pytest

from alloy import metal
from alloy.metal import ssd_chunked as kern
from alloy.metal.testing import Counted, arr, pos, rel_err
from alloy.ops import ssd_ref

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(metal.backend() is None, reason="no CUDA or Metal GPU backend")]


@pytest.mark.parametrize("l", [2048, 1000])
def test_vec_epilogue_bit_identical_on_gpu(monkeypatch, l):
    rng = np.random.default_rng(l)
    b, h, p, g, n, K = 2, 24, 64, 1, 128, 128
    x = arr(rng, (b, l, h, p), mx.bfloat16)
    dt = pos(rng, (b, l, h), 0.01, 0.6)
    A = -pos(rng, (h,), 0.3, 3.0)
    B, C = arr(rng, (b, l, g, n), mx.bfloat16, 0.5), arr(rng, (b, l, g, n), mx.bfloat16, 0.5)
    D, s0 = arr(rng, (h,)), arr(rng, (b, h, p, n), scale=0.1)
    ys = {}
    for on in (True, False):
        monkeypatch.setattr(kern, "OUT_FUSED_YO", False)
        monkeypatch.setattr(kern, "OUT_TC", True)
        monkeypatch.setattr(kern, "TC_ROW_TILES", False)  # CHUNK_OUT_TC_RM: tests/metal/test_ssd_tc_rows_gpu.py
        monkeypatch.setattr(kern, "OUT_TC_VEC_EPILOGUE", on)
        vec, acc = Counted(kern.CHUNK_OUT_TC), Counted(kern.CHUNK_OUT_TC_ACC)
        monkeypatch.setattr(kern, "CHUNK_OUT_TC", vec)
        monkeypatch.setattr(kern, "CHUNK_OUT_TC_ACC", acc)
        ys[on], _ = kern.ssd_chunked(x, dt, A, B, C, D, s0, K)
        mx.eval(ys[on])
        assert (vec.calls, acc.calls) == ((1, 0) if on else (0, 1)), (on, vec.calls, acc.calls)
        monkeypatch.undo()
    assert ys[True].dtype == mx.bfloat16
    assert mx.array_equal(ys[True], ys[False])
    yr, _ = ssd_ref(x, dt, A, B, C, D, s0)
    assert rel_err(ys[True], yr) <= 6e-2, rel_err(ys[True], yr)

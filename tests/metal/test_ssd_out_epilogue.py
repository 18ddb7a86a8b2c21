"""CHUNK_OUT_TC's epilogue with 16-byte accesses (`alloy.metal.ssd_chunked.CHUNK_OUT_TC`: the
accumulators transposed within each quad of lanes, then 16-byte loads of Yo / x and stores of y) on
the CPU emulator: bit-identical to the accumulator-layout epilogue (`CHUNK_OUT_TC_ACC`, switch
`OUT_TC_VEC_EPILOGUE` off) and within the tensor-core tolerance of the float64 reference, over bf16 /
fp16, head dims 16 / 32 / 64, chunks 32 / 64 / 128, lengths that are not whole chunks, one and two
groups. The GPU run is in tests/metal/test_ssd_out_epilogue_gpu.py."""
import mlx.core as mx
import numpy as np
import pytest

from alloy.metal import emulate
from alloy.metal import ssd_chunked as kern
from alloy.metal.testing import arr, pos, rel_err
from alloy.metal.testing import ssd_diag_case as diag_case  # CHUNK_OUT_TC's inputs and the float64 reference of y

pytestmark = pytest.mark.skipif(not emulate.available(), reason="no g++ for the CPU kernel emulator")

CASES = [("bf16", 1, 40, 2, 1, 16, 32),     # chunk below the 64-row block, L not whole chunks
         ("fp16", 1, 100, 4, 2, 32, 64),    # two groups, two heads per group
         ("bf16", 1, 150, 2, 1, 64, 128),   # two row blocks per chunk, a partial last chunk
         ("fp16", 1, 70, 2, 2, 64, 128),    # one head per group, the last chunk mostly past L
         ("bf16", 2, 90, 3, 1, 32, 64),     # three heads per group, two sequences
         ("fp16", 1, 45, 2, 1, 16, 128)]    # one chunk, L inside the first row block


def launch(kernel, ins, K, p, h, b, nc, shape):
    return emulate.run(kernel, ins, template=[("T", ins[2].dtype), ("KC", K), ("PC", p)],
                       grid=(-(-K // 64), h, b * nc), threadgroup=128, output_shapes=[shape],
                       output_dtypes=[ins[2].dtype], poison=True)[0]


@pytest.mark.parametrize("dt,b,l,h,g,p,K", CASES)
def test_vec_epilogue_bit_identical_and_reference(dt, b, l, h, g, p, K):
    """The 16-byte epilogue writes exactly the accumulator-layout epilogue's y (same float32 sums,
    one rounding per element; rows past L untouched: the poisoned output would differ), and both are
    within 1e-2 (bf16) / 2e-3 (fp16) of the float64 reference."""
    rng = np.random.default_rng(l + p + K)
    (CB, acs, x, dtv, Yo, D, _), y_ref, _ = diag_case(rng, dt, b, l, h, g, p, K)
    nc = CB.shape[1]
    ins = [CB, acs, x, dtv, Yo, D]
    new = launch(kern.CHUNK_OUT_TC, ins, K, p, h, b, nc, x.shape)
    old = launch(kern.CHUNK_OUT_TC_ACC, ins, K, p, h, b, nc, x.shape)
    assert new.dtype == x.dtype
    assert mx.array_equal(new, old), float(mx.abs(new.astype(mx.float32) - old.astype(mx.float32)).max())
    tol = 1e-2 if dt == "bf16" else 2e-3
    assert rel_err(new, mx.array(y_ref.astype(np.float32))) <= tol


def test_switch_picks_the_epilogue(monkeypatch):
    """`ssd_chunked` launches CHUNK_OUT_TC with OUT_TC_VEC_EPILOGUE on and CHUNK_OUT_TC_ACC with it
    off, with bit-identical y (the Yo matmul path: OUT_FUSED_YO off)."""
    monkeypatch.setattr(kern, "OUT_FUSED_YO", False)
    monkeypatch.setattr(kern, "OUT_TC", True)
    monkeypatch.setattr(kern, "TC_ROW_TILES", False)  # CHUNK_OUT_TC_RM: tests/metal/test_ssd_tc_rows.py
    rng = np.random.default_rng(3)
    b, l, h, g, p, n, K = 1, 100, 4, 2, 32, 16, 64
    x = arr(rng, (b, l, h, p), mx.bfloat16)
    dtv, A = pos(rng, (b, l, h), 0.01, 0.3), -pos(rng, (h,), 0.5, 4.0)
    B, C = arr(rng, (b, l, g, n), mx.bfloat16), arr(rng, (b, l, g, n), mx.bfloat16)
    D, s0 = arr(rng, (h,)), arr(rng, (b, h, p, n))
    ys = {}
    for on in (True, False):
        monkeypatch.setattr(kern, "OUT_TC_VEC_EPILOGUE", on)
        with emulate.patch(kern, poison=True):
            ys[on], _ = kern.ssd_chunked(x, dtv, A, B, C, D, s0, K)
            used = (kern.CHUNK_OUT_TC.calls, kern.CHUNK_OUT_TC_ACC.calls)
        assert used == ((1, 0) if on else (0, 1)), used
    assert mx.array_equal(ys[True], ys[False])

"""The prelude's warp tile product (`Acc16`, `mma16`, `acc_store`): a tiled matmul kernel written with
it, on the CPU emulator (the accumulator layout and the loops), compiled for CUDA with nvcc (opt-in,
the tensor-core path), and on the GPU (`-m gpu`: the mma.sync path of bf16 / fp16 against the loops
of fp32 and against NumPy)."""
import os
import re
import shutil
import subprocess

import mlx.core as mx
import numpy as np
import pytest

from alloy.metal import emulate
from alloy.metal.prelude import Kernel, backend
from alloy.metal.testing import rel_err

# C (M, N) float32 = A (M, K) B (K, N); M, N, K multiples of 16. Each warp owns one 16 x 16 tile of C:
# per 16-wide slice of K its lanes copy the A and B tiles into group-shared memory, then mma16. TRANS:
# b is given as B^T (N, K), staged as [n][k], and the product is mma16t.
MATMUL = Kernel(
    name="alloy_test_mma_matmul",
    inputs=("a", "b"),
    outputs=("c",),
    body="""
  const int M = a_shape[0];
  const int K = a_shape[1];
  const int N = TRANS ? b_shape[0] : b_shape[1];
  constexpr int NWP = NT / 32;
  SHARED T ta[NWP][16 * 16];
  SHARED T tb[NWP][16 * 16];
  const int tile = bid_x * NWP + warp;
  const int tm = tile / (N / 16);
  const int tn = tile % (N / 16);
  if (tm >= M / 16) return;
  Acc16 acc;
  acc_zero(acc);
  for (int k0 = 0; k0 < K; k0 += 16) {
    for (int e = lane; e < 256; e += 32) {
      ta[warp][e] = a[(tm * 16 + e / 16) * K + k0 + e % 16];
      tb[warp][e] = TRANS ? b[(tn * 16 + e / 16) * K + k0 + e % 16] : b[(k0 + e / 16) * N + tn * 16 + e % 16];
    }
    warp_sync();
    if (TRANS) {
      mma16t(acc, ta[warp], 16, tb[warp], 16, lane);
    } else {
      mma16(acc, ta[warp], 16, tb[warp], 16, lane);
    }
    warp_sync();
  }
  acc_store(acc, c + (tm * 16) * N + tn * 16, N, lane);
""")

# MATMUL with a preloaded A fragment: each warp owns a 16 x 32 strip of C (two accumulator tiles),
# per 16-wide slice of K it loads the A tile once (lda16) and multiplies it by both B tiles
# (mma16_f / mma16t_f). N a multiple of 32.
MATMUL_F = Kernel(
    name="alloy_test_mma_matmul_frag",
    inputs=("a", "b"),
    outputs=("c",),
    body="""
  const int M = a_shape[0];
  const int K = a_shape[1];
  const int N = TRANS ? b_shape[0] : b_shape[1];
  constexpr int NWP = NT / 32;
  SHARED T ta[NWP][16 * 16];
  SHARED T tb[NWP][2 * 16 * 16];
  const int tile = bid_x * NWP + warp;
  const int tm = tile / (N / 32);
  const int tn = tile % (N / 32);
  if (tm >= M / 16) return;
  Acc16 acc[2];
  acc_zero(acc[0]);
  acc_zero(acc[1]);
  for (int k0 = 0; k0 < K; k0 += 16) {
    for (int e = lane; e < 256; e += 32) ta[warp][e] = a[(tm * 16 + e / 16) * K + k0 + e % 16];
    for (int e = lane; e < 512; e += 32) {  // tile j at tb[warp] + 256 j: [n][k] (TRANS) or [k][n]
      const int j = e / 256, f = e % 256;
      tb[warp][e] = TRANS ? b[(tn * 32 + 16 * j + f / 16) * K + k0 + f % 16]
                          : b[(k0 + f / 16) * N + tn * 32 + 16 * j + f % 16];
    }
    warp_sync();
    Frag16<T> fa;
    lda16(fa, ta[warp], 16, lane);
    for (int j = 0; j < 2; ++j) {
      if (TRANS) {
        mma16t_f(acc[j], fa, tb[warp] + 256 * j, 16, lane);
      } else {
        mma16_f(acc[j], fa, tb[warp] + 256 * j, 16, lane);
      }
    }
    warp_sync();
  }
  for (int j = 0; j < 2; ++j) acc_store(acc[j], c + (tm * 16) * N + tn * 32 + 16 * j, N, lane);
""")


def _run(run, a, b, nt=64, trans=False, kernel=MATMUL):
    M, N = a.shape[0], b.shape[1]
    tiles = (M // 16) * (N // (32 if kernel is MATMUL_F else 16))
    if trans:
        b = mx.contiguous(b.T)
    return run(kernel, [a, b], template=[("T", a.dtype), ("NT", nt), ("TRANS", trans)],
               grid=(-(-tiles // (nt // 32)), 1, 1),
               threadgroup=nt, output_shapes=[(M, N)], output_dtypes=[mx.float32])[0]


def _case(dtype, M=32, K=48, N=32, seed=0):
    rng = np.random.default_rng(seed)
    a = mx.array(rng.standard_normal((M, K)).astype(np.float32)).astype(dtype)
    b = mx.array(rng.standard_normal((K, N)).astype(np.float32)).astype(dtype)
    f64 = lambda x: np.array(x.astype(mx.float32)).astype(np.float64)  # noqa: E731 (GPU fp32 matmul is TF32)
    ref = mx.array((f64(a) @ f64(b)).astype(np.float32))
    return a, b, ref


@pytest.mark.skipif(not emulate.available(), reason="the CPU kernel emulator needs g++")
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("trans", [False, True])
def test_mma16_matmul_on_emulator(dtype, trans):
    a, b, ref = _case(dtype)
    got = _run(lambda k, inputs, **kw: emulate.run(k, inputs, **kw), a, b, trans=trans)
    assert rel_err(got, ref) <= 1e-5
    # the check can fail: the same kernel with the accumulator's columns swapped in pairs
    bad = Kernel(MATMUL.name + "_bad", MATMUL.inputs, MATMUL.outputs,
                 MATMUL.body.replace("acc_store(acc, c + (tm * 16) * N + tn * 16, N, lane);",
                                     "for (int i = 0; i < 8; ++i) c[(tm * 16 + acc_row(i, lane)) * N + tn * 16 + "
                                     "(acc_col(i, lane) ^ 1)] = acc.c[i];"))
    wrong = _run(lambda k, inputs, **kw: emulate.run(bad, inputs, **kw), a, b, trans=trans)
    assert rel_err(wrong, ref) > 1e-2


@pytest.mark.skipif(not emulate.available(), reason="the CPU kernel emulator needs g++")
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("trans", [False, True])
def test_mma16_fragment_matches_mma16_on_emulator(dtype, trans):
    """lda16 + mma16_f / mma16t_f (one A load, two column tiles) == mma16 / mma16t, bit for bit."""
    a, b, ref = _case(dtype, M=32, K=48, N=64, seed=2)
    emu = lambda k, inputs, **kw: emulate.run(k, inputs, **kw)  # noqa: E731
    got = _run(emu, a, b, trans=trans, kernel=MATMUL_F)
    want = _run(emu, a, b, trans=trans)
    assert mx.array_equal(got, want)
    assert rel_err(got, ref) <= 1e-5
    # the check can fail: the same kernel with a wrong A fragment (the first B tile's) for the second
    # column tile
    bad = Kernel(MATMUL_F.name + "_bad", MATMUL_F.inputs, MATMUL_F.outputs,
                 MATMUL_F.body.replace("    for (int j = 0; j < 2; ++j) {\n      if (TRANS)",
                                       "    for (int j = 0; j < 2; ++j) {\n      if (j == 1) lda16(fa, tb[warp], 16, lane);\n"
                                       "      if (TRANS)"))
    assert bad.body != MATMUL_F.body
    wrong = _run(lambda k, inputs, **kw: emulate.run(bad, inputs, **kw), a, b, trans=trans, kernel=MATMUL_F)
    assert not mx.array_equal(wrong, want)


@pytest.mark.skipif(not (shutil.which("nvcc") and os.environ.get("ALLOY_MLX_CUDA_INCLUDE")),
                    reason="set ALLOY_MLX_CUDA_INCLUDE to an MLX source tree and have nvcc")
@pytest.mark.parametrize("ctype", ["__nv_bfloat16", "__half", "float"])
@pytest.mark.parametrize("kernel", [MATMUL, MATMUL_F], ids=["mma16", "frag"])
@pytest.mark.parametrize("trans", [False, True])
def test_mma16_cuda_dialect_compiles(ctype, kernel, trans, tmp_path):
    header, body = kernel.source("cuda")
    src = ('#include "mlx/backend/cuda/device/utils.cuh"\n' + header + "namespace mlx::core::cu {\n__global__ void k("
           f"const {ctype}* a, const __grid_constant__ Shape a_shape, const {ctype}* b, "
           "const __grid_constant__ Shape b_shape, float* c) {\n"
           f"  using T = {ctype};\n  constexpr int NT = 64;\n  constexpr bool TRANS = {str(trans).lower()};\n" + body + "\n}\n}\n")
    path = tmp_path / "k.cu"
    path.write_text(src)
    res = subprocess.run(["nvcc", "-std=c++17", "-arch=sm_90", "-I", os.environ["ALLOY_MLX_CUDA_INCLUDE"], "-c",
                          str(path), "-o", str(tmp_path / "k.o"), "--keep", "--keep-dir", str(tmp_path)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    ptx = "".join(p.read_text() for p in tmp_path.glob("*.ptx"))
    assert ("mma.sync.aligned.m16n8k16" in ptx) == (ctype != "float")
    if kernel is MATMUL_F and ctype != "float":  # A loaded once per k-slice for both column tiles
        assert ptx.count("mma.sync.aligned.m16n8k16") == 4


@pytest.mark.gpu
@pytest.mark.skipif(backend() is None, reason="needs a GPU backend")
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("trans", [False, True])
def test_mma16_fragment_on_gpu(dtype, trans):
    a, b, ref = _case(dtype, M=64, K=128, N=64, seed=3)
    run = lambda k, inputs, **kw: k(inputs, **kw)  # noqa: E731
    got = _run(run, a, b, nt=128, trans=trans, kernel=MATMUL_F)
    assert mx.array_equal(got, _run(run, a, b, nt=128, trans=trans))
    assert rel_err(got, ref) <= 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(backend() is None, reason="needs a GPU backend")
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("trans", [False, True])
def test_mma16_matmul_on_gpu(dtype, trans):
    a, b, ref = _case(dtype, M=64, K=128, N=48, seed=1)
    got = _run(lambda k, inputs, **kw: k(inputs, **kw), a, b, nt=128, trans=trans)
    assert rel_err(got, ref) <= 1e-4  # fp32 accumulation of exactly representable products

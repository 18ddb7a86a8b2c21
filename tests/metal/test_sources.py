"""CPU-side checks of the portable kernel layer: every kernel's CUDA and Metal sources come from
the same body, each dialect's source carries no token of the other, dispatch stays on the
reference paths where no GPU backend exists."""
import importlib
import os
import re
import shutil
import subprocess

import mlx.core as mx
import numpy as np
import pytest

import alloy.metal as metal
from alloy.metal.prelude import DIALECT_TOKENS, Kernel
from alloy.ops import causal_conv1d, causal_conv1d_ref, selective_scan, ssd

# the package re-exports functions named like these modules: import the modules themselves
conv_ops = importlib.import_module("alloy.ops.conv")
sscan_ops = importlib.import_module("alloy.ops.selective_scan")
ssd_ops = importlib.import_module("alloy.ops.ssd")

KERNELS = sorted(metal.KERNELS.values(), key=lambda k: k.name)
IDS = [k.name for k in KERNELS]


@pytest.mark.parametrize("kernel", KERNELS, ids=IDS)
def test_both_dialects_render_the_same_body(kernel):
    (ch, cb), (mh, mb) = kernel.source("cuda"), kernel.source("metal")
    assert kernel.body in cb and kernel.body in mb  # the body itself, verbatim, in both
    other = {"cuda": "metal", "metal": "cuda"}
    for dialect, text in (("cuda", ch + cb), ("metal", mh + mb)):
        for tok in DIALECT_TOKENS[other[dialect]]:
            if tok in ("device ", "constant "):
                continue  # plain words that also occur in CUDA comments / names
            assert tok not in text, f"{kernel.name} {dialect} source contains {tok!r}"
    assert re.search(r"\buint\b", ch + cb) is None  # CUDA kernels index with unsigned int
    assert "__syncthreads" in ch and "threadgroup_barrier" in mh  # the prelude of each dialect


@pytest.mark.parametrize("kernel", KERNELS, ids=IDS)
def test_index_names_map_to_each_dialect(kernel):
    _, cb = kernel.source("cuda")
    _, mb = kernel.source("metal")
    if re.search(r"\btid\b", kernel.body):
        assert "const unsigned int tid = threadIdx.x;" in cb
        assert "const unsigned int tid = thread_position_in_threadgroup.x;" in mb
    # Metal attributes are added to the signature when their names appear: only used ones may
    assert ("simdgroup_index_in_threadgroup" in mb) == bool(re.search(r"\bwarp\b", kernel.body))


@pytest.mark.parametrize("kernel", KERNELS, ids=IDS)
def test_mlx_builds_both_kernel_objects(kernel):
    """MLX accepts each dialect's source (compilation happens at first launch on the device;
    the CUDA object can only be made where the CUDA back-end is built in)."""
    assert kernel.build("metal") is not None
    if mx.cuda.is_available():
        assert kernel.build("cuda") is not None


def test_dialect_specific_bodies_are_refused():
    with pytest.raises(ValueError, match="threadIdx"):
        Kernel("bad", ("x",), ("y",), "y[threadIdx.x] = x[0];")
    with pytest.raises(ValueError, match="simd_sum"):
        Kernel("bad", ("x",), ("y",), "y[0] = simd_sum(x[0]);")
    with pytest.raises(ValueError, match="unsigned int"):
        Kernel("bad", ("x",), ("y",), "uint i = tid; y[i] = x[i];")
    with pytest.raises(ValueError, match="dialect"):
        metal.KERNELS["alloy_ssd_step"].source("hip")


def test_no_kernels_switch(monkeypatch):
    monkeypatch.setenv("ALLOY_NO_KERNELS", "1")
    assert metal.backend() is None


def test_cpu_dispatch_keeps_reference_paths():
    assert metal.backend() is None
    x = mx.ones((1, 5, 8))
    assert not conv_ops.kernel_applies(x, mx.ones((8, 4)))
    assert not ssd_ops.kernel_applies(x)
    assert not sscan_ops.kernel_applies(x, mx.ones((8, 4)))
    with pytest.raises(ValueError, match="CUDA or Metal"):
        causal_conv1d(x, mx.ones((8, 4)), impl="kernel")
    with pytest.raises(ValueError, match="CUDA or Metal"):
        ssd(mx.ones((1, 5, 2, 4)), mx.ones((1, 5, 2)), -mx.ones((2,)), mx.ones((1, 5, 1, 3)),
            mx.ones((1, 5, 1, 3)), impl="kernel")
    with pytest.raises(ValueError, match="CUDA or Metal"):
        selective_scan(x, x, -mx.ones((8, 3)), mx.ones((1, 5, 3)), mx.ones((1, 5, 3)), impl="kernel")
    rng = np.random.default_rng(0)
    xr = mx.array(rng.standard_normal((2, 7, 6)).astype(np.float32))
    w = mx.array(rng.standard_normal((6, 4)).astype(np.float32))
    y, s = causal_conv1d(xr, w, activation="silu")
    yr, sr = causal_conv1d_ref(xr, w, activation="silu")
    assert mx.array_equal(y, yr) and mx.array_equal(s, sr)


@pytest.mark.skipif(not (shutil.which("nvcc") and os.environ.get("ALLOY_MLX_CUDA_INCLUDE")),
                    reason="set ALLOY_MLX_CUDA_INCLUDE to an MLX source tree and have nvcc")
@pytest.mark.parametrize("kernel", KERNELS, ids=IDS)
def test_cuda_dialect_compiles_with_nvcc(kernel, tmp_path):
    """Compiles the CUDA dialect as MLX would wrap it (header, namespace, signature), bf16 inputs."""
    header, body = kernel.source("cuda")

    def declared(n):  # a name the kernel itself defines (a parameter or a local), not a template argument
        return n in kernel.inputs or n in kernel.outputs or re.search(rf"\b(int|long|float)\s+{n}\b", body)
    tmpl = "  using T = __nv_bfloat16;\n" + "".join(
        f"  constexpr int {n} = {v};\n" for n, v in (("K", 4), ("TILE", 16), ("LANES", 16),
                                                    ("NJ", 1), ("KC", 64), ("TB", 8), ("CBLK", 8),
                                                    ("CG", 1), ("PC", 64), ("SB", 32),
                                                    ("HD", 64), ("DS", 128), ("IN", 2048), ("NG", 1), ("RB", 16), ("UNROLL", 16), ("RPB", 8), ("KD", 128), ("VD", 128), ("VB", 64), ("CH", 64), ("NW", 8),
                                                    ("NL", 4), ("DM", 2048), ("DIN", 4096), ("NS", 128), ("NGR", 1), ("MB", 1),
                                                    ("NB", 132), ("NT", 256), ("CU", 8), ("QB", 4), ("XMAX", 4096), ("PF", 2), ("VW", 4 if kernel.name.endswith("_pipe4") else 8),
                                                    ("C0", 4096), ("C1", 128), ("AHEAD", 4), ("PREF", 16), ("LR", 8), ("XT", 24))
        + ((("D", 1536), ("G", 1536), ("NWP", 8), ("RPW", 8), ("SPL", 2)) if kernel.name.startswith(("alloy_gated_rms_norm", "alloy_add_rms_norm"))
           else (("PB", 32), ("RS", 4)) if kernel.name.startswith("alloy_ssd_bwd_scores")
           else (("NH", 12), ("HALF", 32)) if kernel.name.startswith("alloy_rope") else ())
        if re.search(rf"\b{n}\b", body) and not declared(n)) + "".join(
        f"  constexpr bool {n} = true;\n" for n in ("SILU", "HAS_Z", "HAS_BIAS", "HAS_RES", "PER_CHANNEL", "L2NORM", "L2", "NBG", "REV", "DOT", "GATE", "HOLD", "TRAD", "ROWTAB", "VEC", "PIPE", "KSG", "ZT", "PF") if re.search(rf"\b{n}\b", body + kernel.helpers))
    for alias in ("S", "W"):
        if re.search(rf"\b{alias}\b", body) and alias not in kernel.inputs:
            tmpl = f"  using {alias} = __nv_bfloat16;\n" + tmpl
    f32_in = ("ssm_state", "dt_lim", "eps", "state", "nw", "gw", "prm", "acs", "CB", "CH", "dXw", "dXd", "cos_tab", "sin_tab")
    f32_out = ("dwb", "new_ssm", "res", "zx", "yg", "nssm", "dCB", "rsum", "csum", "dX", "ra", "rw", "rx", "rd", "CB")

    def ctype(n, f32_names):  # the persistent stack's per-layer SSM states s<l> / ns<l> are float32
        if n == "bar":
            return "uint32_t"
        return "float" if n in f32_names or "state" in n or re.fullmatch(r"n?s\d+", n) else "__nv_bfloat16"
    args = []
    for n in kernel.inputs:  # MLX adds `<name>_shape` when the body reads it
        args.append(f"const {ctype(n, f32_in)}* {n}")
        if f"{n}_shape" in body:
            args.append(f"const __grid_constant__ Shape {n}_shape")
    args += [f"{ctype(n, f32_out)}* {n}" for n in kernel.outputs]
    src = ('#include "mlx/backend/cuda/device/utils.cuh"\n' + header
           + "namespace mlx::core::cu {\n__global__ void k(" + ", ".join(args) + ") {\n"
           + tmpl + body + "\n}\n}\n")
    path = tmp_path / "k.cu"
    path.write_text(src)
    res = subprocess.run(["nvcc", "-std=c++17", "-arch=sm_90", "-I", os.environ["ALLOY_MLX_CUDA_INCLUDE"],
                          "-c", str(path), "-o", str(tmp_path / "k.o")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_differentiable_packs_strided_inputs_once(monkeypatch):
    """`metal.differentiable` with `metal.PACK_INPUTS` on a GPU backend (faked here) hands `fast` and
    the gradient contiguous copies of strided arguments, made once, and changes no value or gradient;
    off, without a GPU, or below `PACK_MIN_SIZE` elements, it passes the arguments through."""
    seen = []
    fast = lambda a, b: (seen.append(a.shape) or a * b,)  # noqa: E731
    f = metal.differentiable(fast, lambda a, b: (a * b,))
    base = mx.random.normal((4, 6), key=mx.random.key(0))
    a, b = base[:, 1:4], mx.random.normal((4, 3), key=mx.random.key(1))  # a: a strided view
    loss = lambda a, b: f(a, b)[0].sum()  # noqa: E731
    want = mx.value_and_grad(loss, argnums=(0, 1))(a, b)
    made = []
    real = mx.contiguous
    monkeypatch.setattr(metal.mx, "contiguous", lambda v: made.append(v.shape) or real(v))
    monkeypatch.setattr(metal, "PACK_INPUTS", True)
    mx.value_and_grad(loss, argnums=(0, 1))(a, b)
    assert made == []  # no GPU backend: nothing packed
    monkeypatch.setattr(metal, "backend", lambda: "cuda")
    mx.value_and_grad(loss, argnums=(0, 1))(a, b)
    assert made == []  # below the size threshold (decode-sized): nothing packed
    monkeypatch.setattr(metal, "PACK_MIN_SIZE", 12)
    got = mx.value_and_grad(loss, argnums=(0, 1))(a, b)
    assert made == [(4, 3), (4, 3)]  # each argument once, for the forward and the gradient together
    assert float(got[0]) == float(want[0])
    for g, w in zip(got[1], want[1]):
        assert mx.array_equal(g, w)

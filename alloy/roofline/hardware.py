"""Hardware descriptions for the roofline: peak FLOP/s per compute dtype and memory bandwidth.

A roofline needs two numbers per kernel: how fast the chip multiplies (peak FLOP/s for the dtype
the kernel computes in) and how fast it moves bytes (memory bandwidth). ``Hardware`` holds

    matrix[dtype]   peak FLOP/s of the matrix units (tensor cores / GPU ALUs) per compute dtype
    vector          peak FLOP/s of plain fp32 SIMT arithmetic (elementwise scans, convolutions)
    bandwidth       bytes/s of the main memory (HBM / unified LPDDR)

A dtype the chip has no rate for runs at the rate of the next wider dtype it has
(fp8 / int8 / int4 -> bf16 -> fp32): weights are dequantized and multiplied in that format.

Figures are dense (no structured sparsity), vendor datasheet values for NVIDIA (SXM parts). Apple
GPUs: FP32 peak = GPU cores x 128 ALUs x 2 FLOP x clock (the clock below per generation), the
same rate for fp16/bf16 (Apple GPUs have no faster half-precision matmul units); bandwidth from
Apple's specifications (top GPU configuration of each chip). Apple figures are nominal estimates.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

DTYPE_ALIASES = {
    "float32": "fp32", "fp32": "fp32", "f32": "fp32",
    "tf32": "tf32",
    "bfloat16": "bf16", "bf16": "bf16",
    "float16": "fp16", "fp16": "fp16", "f16": "fp16",
    "fp8": "fp8", "float8": "fp8", "e4m3": "fp8",
    "int8": "int8", "int4": "int4",
}
# a dtype the hardware lacks falls back to the next wider one
_FALLBACK = {"int4": "int8", "int8": "fp8", "fp8": "bf16", "fp16": "bf16", "bf16": "fp32", "tf32": "fp32"}


def canonical_dtype(name: str) -> str:
    """'bfloat16' -> 'bf16' etc.; ValueError naming the allowed spellings."""
    key = str(name).lower()
    if key not in DTYPE_ALIASES:
        raise ValueError(f"unknown dtype {name!r}; allowed: {sorted(DTYPE_ALIASES)}")
    return DTYPE_ALIASES[key]


@dataclass(frozen=True)
class Hardware:
    """Peak rates of one accelerator. ``matrix`` maps canonical dtype -> FLOP/s."""

    name: str
    matrix: Mapping[str, float]
    vector: float  # fp32 SIMT FLOP/s
    bandwidth: float  # bytes/s
    memory: float = 0.0  # bytes of device memory (0: unknown); informational
    notes: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("Hardware.name must be a non-empty string")
        if not isinstance(self.bandwidth, (int, float)) or self.bandwidth <= 0:
            raise ValueError(f"Hardware({self.name}).bandwidth must be positive bytes/s, got {self.bandwidth!r}")
        if not isinstance(self.vector, (int, float)) or self.vector <= 0:
            raise ValueError(f"Hardware({self.name}).vector must be positive FLOP/s, got {self.vector!r}")
        rates = {}
        for k, v in dict(self.matrix).items():
            if not isinstance(v, (int, float)) or v <= 0:
                raise ValueError(f"Hardware({self.name}).matrix[{k!r}] must be positive FLOP/s, got {v!r}")
            rates[canonical_dtype(k)] = float(v)
        if "fp32" not in rates:
            raise ValueError(f"Hardware({self.name}).matrix needs an 'fp32' rate (the fallback of every dtype)")
        object.__setattr__(self, "matrix", MappingProxyType(rates))

    def peak(self, dtype: str) -> float:
        """Matrix-unit FLOP/s for ``dtype``, falling back to the next wider dtype the chip has."""
        d = canonical_dtype(dtype)
        while d not in self.matrix:
            d = _FALLBACK[d]
        return self.matrix[d]

    def ridge(self, dtype: str) -> float:
        """Arithmetic intensity (FLOP/byte) above which a kernel in ``dtype`` is compute bound."""
        return self.peak(dtype) / self.bandwidth

    def to_dict(self) -> dict:
        return {"name": self.name, "matrix_flops": dict(self.matrix), "vector_flops": self.vector,
                "bandwidth": self.bandwidth, "memory": self.memory, "notes": self.notes}


def CustomHardware(name: str, *, bandwidth_gbs: float, fp32_tflops: float, bf16_tflops: float | None = None,
                   fp16_tflops: float | None = None, fp8_tflops: float | None = None,
                   int8_tops: float | None = None, vector_tflops: float | None = None,
                   memory_gb: float = 0.0) -> Hardware:
    """A ``Hardware`` from datasheet units (GB/s, TFLOP/s). Missing dtypes fall back (see module doc);
    ``vector_tflops`` defaults to ``fp32_tflops``."""
    T = 1e12
    m = {"fp32": fp32_tflops * T}
    for k, v in (("bf16", bf16_tflops), ("fp16", fp16_tflops), ("fp8", fp8_tflops), ("int8", int8_tops)):
        if v is not None:
            m[k] = v * T
    return Hardware(name, m, (vector_tflops or fp32_tflops) * T, bandwidth_gbs * 1e9, memory_gb * 1e9)


def _nvidia(name, fp32, tf32, half, fp8, int8, bw_tbs, mem_gb, notes):
    T = 1e12
    m = {"fp32": fp32 * T, "tf32": tf32 * T, "bf16": half * T, "fp16": half * T, "int8": int8 * T}
    if fp8:
        m["fp8"] = fp8 * T
    return Hardware(name, m, fp32 * T, bw_tbs * 1e12, mem_gb * 1e9, notes)


# Apple GPU: FP32 FLOP/s = cores * 128 ALUs * 2 (FMA) * clock
_APPLE_CLOCK_GHZ = {"M1": 1.278, "M2": 1.398, "M3": 1.38, "M4": 1.578}
_APPLE = {  # name: (GPU cores, bandwidth GB/s, max memory GB)
    "M1": (8, 68.25, 16), "M1 Pro": (16, 200, 32), "M1 Max": (32, 400, 64), "M1 Ultra": (64, 800, 128),
    "M2": (10, 100, 24), "M2 Pro": (19, 200, 32), "M2 Max": (38, 400, 96), "M2 Ultra": (76, 800, 192),
    "M3": (10, 100, 24), "M3 Pro": (18, 150, 36), "M3 Max": (40, 400, 128), "M3 Ultra": (80, 819, 512),
    "M4": (10, 120, 32), "M4 Pro": (20, 273, 64), "M4 Max": (40, 546, 128),
}


def _apple(name, cores, bw, mem):
    clock = _APPLE_CLOCK_GHZ[name.split()[0]]
    fp32 = cores * 128 * 2 * clock * 1e9
    m = {"fp32": fp32, "fp16": fp32, "bf16": fp32}
    return Hardware(f"Apple {name}", m, fp32, bw * 1e9, mem * 1e9,
                    f"{cores}-core GPU at {clock} GHz (nominal estimate); unified memory")


PRESETS: dict[str, Hardware] = {
    "A100": _nvidia("NVIDIA A100 SXM 80GB", 19.5, 156, 312, 0, 624, 2.039, 80, "no fp8 units: fp8 runs at bf16"),
    "H100": _nvidia("NVIDIA H100 SXM", 67, 494.7, 989.4, 1978.9, 1978.9, 3.35, 80, "dense tensor-core rates"),
    "H200": _nvidia("NVIDIA H200 SXM", 67, 494.7, 989.4, 1978.9, 1978.9, 4.8, 141, "dense tensor-core rates"),
}
PRESETS.update({n.replace(" ", ""): _apple(n, *v) for n, v in _APPLE.items()})


def _norm_key(name: str) -> str:
    return "".join(str(name).split()).lower().replace("apple", "").replace("-", "").replace("_", "")


def get_hardware(name: str | Hardware) -> Hardware:
    """A preset by name (case, spaces, dashes ignored: 'h100', 'M3 Max', 'apple-m2-ultra'), or a
    ``Hardware`` passed through. ValueError lists the presets."""
    if isinstance(name, Hardware):
        return name
    key = _norm_key(name)
    aliases = {"h100sxm": "h100", "a100sxm": "a100", "h200sxm": "h200"}
    key = aliases.get(key, key)
    for k, hw in PRESETS.items():
        if _norm_key(k) == key:
            return hw
    raise ValueError(f"unknown hardware {name!r}; presets: {list(PRESETS)} (or use CustomHardware)")

"""The roofline report: costs of every layer of a config on one hardware, for one workload.

    report = roofline("qwen3-4b-shape", "H100", mode="decode", batch=1, context=32768)
    print(report.to_markdown());  report.to_dict();  report.time_s;  report.rows

Per row (a group of identical layers, or the embedding / head), for one instance:

    compute_s = sum_cat flops[cat] / peak(cat)      matmul at the compute dtype, attention and
                                                    chunked at the activation dtype, scan at fp32 SIMT
    memory_s  = bytes / bandwidth                   bytes = weights + activations + state r/w
    time_s    = max(compute_s, memory_s);  bottleneck = the larger term;  AI = flops / bytes

and the totals sum rows times their layer count (kernels run one after another). Identical
layers (same mixer and FFN names, hence the same settings) are costed once, so the work is one
pass over ``layer_types`` plus one cost call per distinct block: a 10T-parameter config answers
in well under a second (tested). Nothing is built: no model, no arrays.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from alloy.config import ModelConfig
from alloy.roofline.costs import (Cost, Workload, block_cost, embed_cost, get_cost, head_cost,
                                  hyper_head_cost, shared_cost)
from alloy.roofline.hardware import Hardware, canonical_dtype, get_hardware

MODES = ("prefill", "mini-prefill", "decode")
_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}


@dataclass(frozen=True)
class WeightFormat:
    """Storage of projection / embedding matrices: a float dtype, or ``int8`` / ``int4`` with one
    fp16 scale and one fp16 bias per ``group`` weights (MLX affine quantization), written
    "int4", "int4-g32", "int8-g128" (default group 64)."""

    name: str
    bits: int
    group: int = 0  # 0: no per-group scales

    @property
    def bytes_per_weight(self) -> float:
        return self.bits / 8 + (4 / self.group if self.group else 0.0)

    @classmethod
    def parse(cls, spec: str) -> "WeightFormat":
        s = str(spec).lower().replace("bit", "")
        base, _, g = s.partition("-g")
        if base in ("4", "q4"):
            base = "int4"
        if base in ("8", "q8"):
            base = "int8"
        if base in ("int4", "int8"):
            try:
                group = int(g) if g else 64
            except ValueError:
                raise ValueError(f"weight dtype {spec!r}: group size after '-g' must be an int") from None
            if group <= 0:
                raise ValueError(f"weight dtype {spec!r}: group size must be positive")
            return cls(f"{base}-g{group}", 4 if base == "int4" else 8, group)
        if g:
            raise ValueError(f"weight dtype {spec!r}: only int4 / int8 take a group size")
        try:
            d = canonical_dtype(base)
        except ValueError:
            raise ValueError(f"unknown weight dtype {spec!r}; allowed: fp32, bf16, fp16, fp8, int8[-gN], "
                             f"int4[-gN]") from None
        return cls(d, 8 * _BYTES[d])


@dataclass(frozen=True)
class Precision:
    """activation: activations, vectors, conv state; weight: matrices; kv: KV cache; compute:
    the matmul input dtype (default: the activation dtype, weights dequantized on the fly)."""

    activation: str = "bf16"
    weight: WeightFormat = WeightFormat("bf16", 16)
    kv: str = "bf16"
    compute: str = "bf16"

    @classmethod
    def make(cls, activation: str, weight: str | None = None, kv: str | None = None,
             compute: str | None = None) -> "Precision":
        a = canonical_dtype(activation)
        if a not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"activation dtype must be fp32, bf16 or fp16, got {activation!r}")
        return cls(a, WeightFormat.parse(weight or a), canonical_dtype(kv or a), canonical_dtype(compute or a))

    def nbytes(self, c: Cost) -> dict:
        """Bytes moved by a cost, by kind: weights, activations, state_read, state_write."""
        a, s = _BYTES[self.activation], {"kv": _BYTES[self.kv], "ssm": 4, "conv": _BYTES[self.activation]}
        wb = {"matrix": self.weight.bytes_per_weight, "vector": a, "fp32": 4}
        return {
            "weights": sum(wb[k] * v for k, v in c.weight_reads.items()),
            "activations": a * (c.act_read + c.act_write),
            "state_read": sum(s[k] * v for k, v in c.state_read.items()),
            "state_write": sum(s[k] * v for k, v in c.state_write.items()),
        }

    def to_dict(self) -> dict:
        return {"activation": self.activation, "weight": self.weight.name, "kv": self.kv, "compute": self.compute}


@dataclass(frozen=True)
class Row:
    """One group of identical layers (or the embedding / head); figures are per instance."""

    name: str
    layers: tuple
    mixer: str
    ffn: str
    flops: dict
    bytes: dict
    params: float
    compute_s: float
    memory_s: float

    @property
    def count(self) -> int:
        return max(len(self.layers), 1)

    @property
    def total_flops(self) -> float:
        return float(sum(self.flops.values()))

    @property
    def total_bytes(self) -> float:
        return float(sum(self.bytes.values()))

    @property
    def intensity(self) -> float:
        return self.total_flops / self.total_bytes if self.total_bytes else float("inf")

    @property
    def time_s(self) -> float:
        return max(self.compute_s, self.memory_s)

    @property
    def bottleneck(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"

    def to_dict(self) -> dict:
        return {"name": self.name, "layers": list(self.layers), "count": self.count, "mixer": self.mixer,
                "ffn": self.ffn, "params": self.params, "flops": dict(self.flops), "bytes": dict(self.bytes),
                "intensity": self.intensity, "compute_s": self.compute_s, "memory_s": self.memory_s,
                "time_s": self.time_s, "bottleneck": self.bottleneck}


def _sum_dicts(rows, attr) -> dict:
    out: dict = {}
    for r in rows:
        for k, v in getattr(r, attr).items():
            out[k] = out.get(k, 0) + v * r.count
    return out


@dataclass(frozen=True)
class RooflineReport:
    config: str
    hardware: Hardware
    mode: str
    workload: Workload
    precision: Precision
    rows: tuple = field(default_factory=tuple)

    # -- totals (rows times their layer count) -----------------------------------------------
    @property
    def flops(self) -> dict:
        return _sum_dicts(self.rows, "flops")

    @property
    def bytes(self) -> dict:
        return _sum_dicts(self.rows, "bytes")

    @property
    def total_flops(self) -> float:
        return float(sum(self.flops.values()))

    @property
    def total_bytes(self) -> float:
        return float(sum(self.bytes.values()))

    @property
    def params(self) -> float:
        return float(sum(r.params * r.count for r in self.rows))

    @property
    def intensity(self) -> float:
        return self.total_flops / self.total_bytes

    @property
    def compute_s(self) -> float:
        return sum(r.compute_s * r.count for r in self.rows)

    @property
    def memory_s(self) -> float:
        return sum(r.memory_s * r.count for r in self.rows)

    @property
    def time_s(self) -> float:
        return sum(r.time_s * r.count for r in self.rows)

    @property
    def bottleneck(self) -> str:
        """The bound of the rows holding most of the time."""
        c = sum(r.time_s * r.count for r in self.rows if r.bottleneck == "compute")
        return "compute" if c >= self.time_s - c else "memory"

    @property
    def tokens_per_s(self) -> float:
        return self.workload.n / self.time_s

    def layer(self, i: int) -> Row:
        """The row that holds depth ``i``."""
        for r in self.rows:
            if i in r.layers:
                return r
        raise IndexError(f"no layer {i} in this report")

    # -- output --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        w = self.workload
        return {
            "config": self.config, "hardware": self.hardware.to_dict(), "mode": self.mode,
            "workload": {"batch": w.batch, "tokens": w.tokens, "context": w.context},
            "precision": self.precision.to_dict(), "rows": [r.to_dict() for r in self.rows],
            "total": {"params": self.params, "flops": self.flops, "bytes": self.bytes,
                      "total_flops": self.total_flops, "total_bytes": self.total_bytes,
                      "intensity": self.intensity, "compute_s": self.compute_s, "memory_s": self.memory_s,
                      "time_s": self.time_s, "bottleneck": self.bottleneck,
                      "tokens_per_s": self.tokens_per_s},
        }

    def to_markdown(self) -> str:
        w, p, hw = self.workload, self.precision, self.hardware
        lines = [
            f"### Roofline: {self.config} on {hw.name}, {self.mode}",
            "",
            f"batch {w.batch}, {w.tokens} new token(s) per row, {w.context} cached; activations {p.activation}, "
            f"weights {p.weight.name}, KV {p.kv}, matmul compute {p.compute}. "
            f"Peak {hw.peak(p.compute) / 1e12:,.1f} TFLOP/s ({p.compute}), {hw.bandwidth / 1e9:,.0f} GB/s, "
            f"ridge {hw.ridge(p.compute):,.0f} FLOP/B.",
            "",
            "| block | layers | x | GFLOP | MB weights | MB act | MB state r/w | FLOP/B | bound | time (us) |",
            "|---|---|--:|--:|--:|--:|--:|--:|---|--:|",
        ]
        for r in self.rows:
            b = r.bytes
            lines.append(
                f"| {r.name} | {_ranges(r.layers)} | {r.count} | {_g(r.total_flops / 1e9)} | "
                f"{_g(b['weights'] / 1e6)} | {_g(b['activations'] / 1e6)} | "
                f"{_g(b['state_read'] / 1e6)} / {_g(b['state_write'] / 1e6)} | {_g(r.intensity)} | "
                f"{r.bottleneck} | {_g(r.time_s * 1e6)} |")
        b = self.bytes
        lines += [
            "",
            f"**Total**: {_g(self.params / 1e9)} B params; {_g(self.total_flops / 1e12)} TFLOP "
            f"(" + ", ".join(f"{k} {_g(v / 1e12)}" for k, v in self.flops.items() if v) + "); "
            f"{_g(self.total_bytes / 1e9)} GB moved (weights {_g(b['weights'] / 1e9)}, activations "
            f"{_g(b['activations'] / 1e9)}, state read {_g(b['state_read'] / 1e9)}, state write "
            f"{_g(b['state_write'] / 1e9)}); intensity {_g(self.intensity)} FLOP/B; "
            f"compute {_g(self.compute_s * 1e3)} ms, memory {_g(self.memory_s * 1e3)} ms; "
            f"roofline time **{_g(self.time_s * 1e3)} ms** ({self.bottleneck} bound), "
            f"{self.tokens_per_s:,.0f} tok/s.",
        ]
        return "\n".join(lines)


def _g(x: float) -> str:
    """4 significant digits, thousands separated: 38.32, 0.001234, 12,877."""
    return f"{x:,.0f}" if abs(x) >= 1e4 else f"{x:.4g}"


def _ranges(idx) -> str:
    """(0, 1, 2, 5, 7, 8) -> '0-2,5,7-8'; '' for none."""
    out, idx = [], list(idx)
    i = 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        out.append(str(idx[i]) if i == j else f"{idx[i]}-{idx[j]}")
        i = j + 1
    return ",".join(out) if len(out) <= 12 else f"{','.join(out[:12])},... ({len(idx)} layers)"


def _row(name, layers, mixer, ffn, c: Cost, hw: Hardware, prec: Precision) -> Row:
    rate = {"matmul": hw.peak(prec.compute), "attention": hw.peak(prec.activation),
            "chunked": hw.peak(prec.activation), "scan": hw.vector}
    compute_s = sum(v / rate[k] for k, v in c.flops.items())
    nb = prec.nbytes(c)
    return Row(name, tuple(layers), mixer, ffn, {k: float(v) for k, v in c.flops.items()},
               {k: float(v) for k, v in nb.items()}, c.n_params, compute_s, sum(nb.values()) / hw.bandwidth)


def bundled_config(name: str) -> str:
    """Path of ``alloy/configs/<name>.json``; FileNotFoundError listing the bundled names."""
    from importlib import resources
    root = resources.files("alloy") / "configs"
    path = root / f"{name}.json"
    if not path.is_file():
        names = sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".json"))
        raise FileNotFoundError(f"no config file or bundled config named {name!r}; bundled: {names}")
    return str(path)


def load_config(config: Any) -> ModelConfig:
    """A ModelConfig, a dict, a JSON path, or a bundled config name."""
    if isinstance(config, ModelConfig):
        return config
    if isinstance(config, dict):
        return ModelConfig.from_dict(config)
    if (isinstance(config, (str, os.PathLike)) and not os.path.exists(config)
            and not str(config).endswith(".json") and not str(config).lstrip().startswith("{")):
        config = bundled_config(str(config))
    return ModelConfig.from_json(config)


def workload_for(mode: str, batch: int = 1, seq_len: int | None = None, context: int | None = None,
                 chunk: int | None = None) -> Workload:
    """prefill: (batch, seq_len) from empty; mini-prefill: a chunk of ``chunk`` (default seq_len)
    tokens after ``context`` cached ones; decode: one token after ``context`` cached ones."""
    if mode == "prefill":
        return Workload(batch, seq_len if seq_len is not None else 2048, 0)
    if mode == "mini-prefill":
        return Workload(batch, chunk or seq_len or 512, context if context is not None else 4096)
    if mode == "decode":
        return Workload(batch, 1, context if context is not None else 4096)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def roofline(config: Any, hardware: str | Hardware = "H100", mode: str = "decode", *, batch: int = 1,
             seq_len: int | None = None, context: int | None = None, chunk: int | None = None,
             dtype: str | None = None, weight_dtype: str | None = None, kv_dtype: str | None = None,
             compute_dtype: str | None = None) -> RooflineReport:
    """The roofline report of ``config`` (see the module docstring). ``dtype`` defaults to the
    config's dtype; ``weight_dtype`` to ``dtype`` (or "int4-g64", "fp8", ...)."""
    cfg = load_config(config)
    hw = get_hardware(hardware)
    w = workload_for(mode, batch, seq_len, context, chunk)
    prec = Precision.make(dtype or cfg.dtype, weight_dtype, kv_dtype, compute_dtype)

    groups: dict[tuple[str, str], list[int]] = {}
    for i, key in enumerate(zip(cfg.layer_types, cfg.ffn_types)):
        groups.setdefault(key, []).append(i)

    V, D, tied = cfg.vocab_size, cfg.d_model, cfg.tie_embeddings
    n_hc = dict(cfg.hyper)["streams"] if cfg.block_style == "hyper" else 0
    rows = [_row("embed", (), "", "", embed_cost(V, D, tied, w), hw, prec)]
    for (mname, fname), idx in groups.items():
        m, f = cfg.mixer(idx[0]), cfg.ffn(idx[0])
        mkind = "none" if m is None else m[0]
        c = Cost() if m is None else get_cost("mixer", mkind)(m[1], w)
        if f is not None:
            c = c + get_cost("ffn", f[0])(f[1], w)
        c = c + block_cost(D, f is not None, w, n_hc)
        if m is None:  # an FFN-only layer has no mixer pre-norm or residual read
            c = c + block_cost(D, False, w, n_hc).scale(-1)
        label = mname if mname == mkind else f"{mname} ({mkind})"
        flabel = "none" if f is None else (fname if fname == f[0] else f"{fname} ({f[0]})")
        rows.append(_row(f"{label} + {flabel}", idx, mkind, "none" if f is None else f[0], c, hw, prec))
    if cfg.shared is not None:
        rows.append(_row("shared blocks (per call x calls)", tuple(cfg.shared.at), "shared", "mlp",
                         shared_cost(cfg.shared, w), hw, prec))
    head = head_cost(V, D, tied, w) + (hyper_head_cost(D, n_hc, w) if n_hc else Cost())
    rows.append(_row("head", (), "", "", head, hw, prec))
    return RooflineReport(cfg.name, hw, mode, w, prec, tuple(rows))

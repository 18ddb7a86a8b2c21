"""Whole-model reports on H100 against the back-of-envelope estimates written out in
docs/roofline.md (weights + KV / bandwidth for decode; 2 * params * tokens + attention / peak for
prefill). The report counts more (activations, vectors, conv, the head's row gather, per-layer
max of compute and memory); the estimate must still land within 5%.
"""
import pytest

from alloy.roofline import roofline

BW, PEAK = 3.35e12, 989.4e12  # H100 SXM: HBM3 bytes/s, dense bf16 tensor FLOP/s


def qwen3_estimates():
    D, V, L = 2560, 151936, 36
    per_layer = D * 32 * 128 + 2 * D * 8 * 128 + 32 * 128 * D + 3 * D * 9728  # q, k, v, o, MLP
    matrices = L * per_layer + V * D  # 3,633,315,840 + 388,956,160 (tied head)
    kv = L * 2 * 8 * 128 * 32768 * 2  # decode at 32k context, bf16
    decode = (2 * matrices + kv) / BW
    N = 4096
    attn = L * 4 * 128 * 32 * (N * (N + 1) // 2)  # causal pairs
    prefill = (2 * N * matrices + attn) / PEAK
    return decode, prefill


def zamba2_estimates():
    D, V = 2048, 32000
    mamba = D * (2 * 4096 + 2 * 128 + 64) + 4096 * D  # in_proj, out_proj
    shared = 4 * D * D + 3 * D * 8192  # attention q, k, v, o + gated MLP
    matrices = 38 * mamba + 6 * shared + V * D
    kv = 6 * 2 * 32 * 64 * 32768 * 2
    ssm = 38 * 64 * 64 * 128 * 4 * 2  # fp32 state read + written
    decode = (2 * matrices + kv + ssm) / BW
    N = 4096
    attn = 6 * 4 * 64 * 32 * (N * (N + 1) // 2)
    c = N // 256
    ssd = 38 * (c * (256 * 257 // 2) * (2 * 128 + 64 + 2 * 4096) + 4 * N * 4096 * 128)  # intra + states/out
    prefill = (2 * N * matrices + attn + ssd) / PEAK
    return decode, prefill


@pytest.mark.parametrize("name,estimates", [("qwen3-4b-shape", qwen3_estimates),
                                            ("zamba2-1.2b-shape", zamba2_estimates)])
def test_h100_report_within_5_percent_of_the_hand_estimate(name, estimates):
    decode, prefill = estimates()
    d = roofline(name, "H100", "decode", batch=1, context=32768, dtype="bf16")
    p = roofline(name, "H100", "prefill", batch=1, seq_len=4096, dtype="bf16")
    assert d.bottleneck == "memory" and p.bottleneck == "compute"
    assert d.time_s == pytest.approx(decode, rel=0.05)
    assert p.time_s == pytest.approx(prefill, rel=0.05)


def test_the_estimates_in_the_docs_are_these():
    """docs/roofline.md quotes these figures (ms); keep them in step."""
    q, z = qwen3_estimates(), zamba2_estimates()
    assert [round(t * 1e3, 2) for t in q + z] == [3.84, 38.31, 1.39, 12.92]

"""The analytic counts against what `model.apply` actually executes, and whole-model reports.

Matmul FLOPs: every projection and the LM head go through `dense` (in each layer module and in the
stack); we wrap it (monkeypatch) to record input and weight shapes and add 2 * rows * d_in * d_out. Attention FLOPs: we wrap the attention op to count the visible (query, key)
pairs of the mask it is actually given.
"""
import sys
import time

import numpy as np
import pytest

import alloy
import mlx.core as mx

from alloy.layers.registry import get_layer, registered
from alloy.roofline import CustomHardware, Workload, get_hardware, roofline

CFG = {
    "vocab_size": 53, "d_model": 32,
    "layer_types": ["mamba2", "attention", "mamba1", "sliding_attention", "mamba2", "gated_deltanet",
                    "short_conv", "parallel"],
    "ffn_types": ["mlp", "none", "mlp", "plain", "none", "mlp", "none", "none"],
    "mixers": {"mamba2": {"d_state": 8, "head_dim": 8, "n_groups": 2, "chunk_size": 4},
               "mamba1": {"d_state": 4, "dt_rank": 3},
               "attention": {"n_heads": 4, "n_kv_heads": 2, "qk_norm": True},
               "sliding_attention": {"n_heads": 4, "n_kv_heads": 1, "window": 3},
               "gated_deltanet": {"n_k_heads": 2, "n_v_heads": 4, "head_k_dim": 8, "head_v_dim": 8,
                                  "chunk_size": 4},
               "parallel": {"branches": {"ssm": {"kind": "mamba2", "d_state": 8, "head_dim": 8},
                                         "attn": {"kind": "attention", "n_heads": 4, "n_kv_heads": 1}}}},
    "ffns": {"mlp": {"d_ff": 48}, "plain": {"kind": "mlp", "d_ff": 64, "gated": False}},
}


@pytest.fixture(scope="module")
def model_params():
    model = alloy.build(CFG)
    params = model.init(mx.random.key(0))
    mx.eval(params)
    return model, params


@pytest.fixture
def counters(monkeypatch):
    """Wrap `dense` in every module that defines a registered layer, and the attention op."""
    counts = {"matmul": 0, "attention": 0}

    def make_dense(orig):
        def dense(p, x):
            rows = int(np.prod(x.shape[:-1]))
            d_out, d_in = p["weight"].shape
            assert x.shape[-1] == d_in
            counts["matmul"] += 2 * rows * d_in * d_out
            return orig(p, x)
        return dense

    mods = {sys.modules[get_layer(role, k).apply.__module__] for role in ("mixer", "ffn") for k in registered(role)}
    mods.add(sys.modules["alloy.layers.stack"])  # the LM head
    for mod in mods:
        if hasattr(mod, "dense"):
            monkeypatch.setattr(mod, "dense", make_dense(mod.dense))

    import alloy.layers.attention as att
    orig_attention = att.attention

    def attention(q, k, v, mask=None, **kw):
        B, Hq, T, hd = q.shape
        S = k.shape[2]
        if isinstance(mask, str):
            assert mask == "causal" and S == T
            pairs = B * Hq * T * (T + 1) // 2
        else:
            pairs = int(mx.broadcast_to(mask, (B, Hq, T, S)).astype(mx.int32).sum().item())
        counts["attention"] += 4 * hd * pairs
        return orig_attention(q, k, v, mask=mask, **kw)

    monkeypatch.setattr(att, "attention", attention)
    return counts


def _tokens(B, T, seed):
    return mx.array(np.random.default_rng(seed).integers(0, 53, (B, T)), dtype=mx.int32)


def test_forward_matmul_and_attention_flops_equal_the_executed_ones(model_params, counters):
    model, params = model_params
    B, T = 2, 7
    logits, _ = model.apply(params, _tokens(B, T, 0))
    mx.eval(logits)
    r = roofline(CFG, "H100", "prefill", batch=B, seq_len=T)
    assert counters["matmul"] > 2 * B * T * CFG["vocab_size"] * CFG["d_model"]  # the head is in
    assert r.flops["matmul"] == counters["matmul"]
    assert r.flops["attention"] == counters["attention"]


def test_mini_prefill_and_decode_flops_equal_the_executed_ones(model_params, counters):
    model, params = model_params
    B, C, T = 2, 6, 5
    state = model.init_state(B, C + T + 1)
    _, state = model.apply(params, _tokens(B, C, 1), state)  # the cached context
    mx.eval(state)
    for mode, n_new in (("mini-prefill", T), ("decode", 1)):
        counters["matmul"] = counters["attention"] = 0
        logits, state2 = model.apply(params, _tokens(B, n_new, 2), state)
        mx.eval(logits, state2)
        r = roofline(CFG, "H100", mode, batch=B, context=C, chunk=n_new)
        assert (r.workload.tokens, r.workload.context) == (n_new, C)
        assert r.flops["matmul"] == counters["matmul"], mode
        assert r.flops["attention"] == counters["attention"], mode


def test_state_bytes_written_equal_the_state_tree():
    """A prefill writes the whole recurrent / conv state and T slots of each KV cache."""
    from alloy.params import flatten
    model = alloy.build(CFG)
    T = 9
    state = model.init_state(1, T, mx.float32)
    r = roofline(CFG, "H100", "prefill", seq_len=T, dtype="fp32")
    # init_state(max_len = T) holds exactly T KV slots; positions (int32 counters) are not data
    data = sum(a.nbytes for a in flatten(state).values() if a.dtype != mx.int32)
    assert r.bytes["state_write"] == data


def test_decode_cost_of_attention_grows_with_context_and_of_mamba_does_not():
    grow = roofline(CFG, "H100", "decode", context=2000, dtype="bf16")
    base = roofline(CFG, "H100", "decode", context=1000, dtype="bf16")
    for i, kind in enumerate(CFG["layer_types"]):
        dr = grow.layer(i).bytes["state_read"] - base.layer(i).bytes["state_read"]
        # 2 (k, v) * Hkv * hd 8 * 1000 more tokens * 2 bytes, for full attention (Hkv 2) and the
        # parallel layer's attention branch (Hkv 1); recurrent states and full sliding windows: 0
        assert dr == {"attention": 2 * 2 * 8 * 1000 * 2, "parallel": 2 * 1 * 8 * 1000 * 2}.get(kind, 0), kind


def test_weight_formats_scale_the_weight_bytes():
    cfg = "qwen3-4b-shape"
    bf16 = roofline(cfg, "H100", "decode", context=128)
    q4 = roofline(cfg, "H100", "decode", context=128, weight_dtype="int4")  # 0.5 + 4/64 bytes
    fp8 = roofline(cfg, "H100", "decode", context=128, weight_dtype="fp8")
    D, V = 2560, 151936
    per_layer = D * 4096 + 2 * D * 1024 + 4096 * D + 3 * D * 9728  # q, k, v, o, gate/up/down
    matrix_reads = 36 * per_layer + V * D + D  # the tied head reads the table; the embed one row
    for r, bpw in ((q4, 0.5 + 4 / 64), (fp8, 1.0)):
        assert bf16.bytes["weights"] - r.bytes["weights"] == pytest.approx(matrix_reads * (2 - bpw), rel=1e-9)
    assert q4.time_s < fp8.time_s < bf16.time_s


def test_hardware_presets_and_fallbacks():
    assert get_hardware("h100") is get_hardware("H100 SXM")
    assert get_hardware("apple m3 max").name == "Apple M3 Max"
    a100 = get_hardware("A100")
    assert a100.peak("fp8") == a100.peak("bf16") == 312e12  # no fp8 units
    m2 = get_hardware("M2")
    assert m2.peak("int4") == m2.peak("fp32") == pytest.approx(10 * 128 * 2 * 1.398e9)
    custom = CustomHardware("X", bandwidth_gbs=100, fp32_tflops=1, bf16_tflops=4)
    assert custom.peak("fp8") == 4e12 and custom.ridge("bf16") == 40
    with pytest.raises(ValueError, match="unknown hardware 'TPU'"):
        get_hardware("TPU")
    with pytest.raises(ValueError, match="bandwidth"):
        CustomHardware("Y", bandwidth_gbs=0, fp32_tflops=1)


def test_bad_requests_name_what_is_wrong():
    with pytest.raises(ValueError, match="mode must be one of"):
        roofline(CFG, mode="train")
    with pytest.raises(ValueError, match="unknown weight dtype 'int3'"):
        roofline(CFG, weight_dtype="int3")
    with pytest.raises(ValueError, match="Workload.batch"):
        roofline(CFG, batch=0)
    with pytest.raises(FileNotFoundError, match="bundled"):
        roofline("no-such-config")


def _ten_trillion():
    d, layers = 65536, 146
    return {"vocab_size": 256000, "d_model": d, "layer_types": ["mamba2", "attention"] * (layers // 2),
            "mixers": {"mamba2": {"d_state": 256, "head_dim": 128},
                       "attention": {"n_heads": 512, "n_kv_heads": 64}},
            "ffns": {"mlp": {"d_ff": 4 * d}}, "dtype": "bfloat16"}


def test_ten_trillion_parameter_config_answers_under_a_second():
    cfg = alloy.ModelConfig.from_dict(_ten_trillion())
    t0 = time.perf_counter()
    r = roofline(cfg, "H200", "prefill", batch=8, seq_len=8192)
    r.to_markdown(), r.to_dict()
    elapsed = time.perf_counter() - t0
    assert r.params > 1e13
    assert elapsed < 1.0, f"{elapsed:.3f} s"


def test_layer_groups_expand_to_every_depth():
    r = roofline(_ten_trillion(), "H100", "decode", context=100)
    assert sorted(i for row in r.rows for i in row.layers) == list(range(146))
    assert len(r.rows) == 4  # embed, mamba2+mlp, attention+mlp, head
    # the total is the sum over depths of the per-layer figures
    assert r.total_flops == pytest.approx(sum(r.layer(i).total_flops for i in range(146))
                                          + r.rows[0].total_flops + r.rows[-1].total_flops)


def test_report_formats(model_params):
    import json
    r = roofline(CFG, "M4 Max", "decode", context=50)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["total"]["time_s"] == pytest.approx(r.time_s)
    assert d["total"]["bottleneck"] == "memory"  # batch-1 decode of a tiny model
    md = r.to_markdown()
    assert "Apple M4 Max" in md and "| mamba2 + mlp | 0 |" in md and "memory bound" in md


def test_moe_flops_equal_the_executed_ones(monkeypatch):
    """MoE experts run through `_gather_mm` (each token against its k experts) and the shared expert
    through `dense`; both are wrapped. The router's inline x @ Wr^T is counted from shapes."""
    import alloy.layers.moe as moe
    cfg = {"vocab_size": 29, "d_model": 16, "layer_types": ["attention"], "ffn_types": ["moe"],
           "mixers": {"attention": {"n_heads": 2}},
           "ffns": {"moe": {"n_experts": 4, "top_k": 2, "d_ff": 24, "shared_d_ff": 8, "shared_gate": True}}}
    counted = []
    orig_g, orig_d = moe._gather_mm, moe.dense

    def gather_mm(a, w, idx):
        counted.append(2 * idx.size * w.shape[1] * w.shape[2])  # (N*k) rows x (out, in)
        return orig_g(a, w, idx)

    def dense(p, x):
        counted.append(2 * int(np.prod(x.shape[:-1])) * p["weight"].shape[0] * p["weight"].shape[1])
        return orig_d(p, x)

    monkeypatch.setattr(moe, "_gather_mm", gather_mm)
    monkeypatch.setattr(moe, "dense", dense)
    model = alloy.build(cfg)
    params = model.init(mx.random.key(0))
    B, T = 2, 5
    logits, _ = model.apply(params, _tokens(B, T, 3) % 29)
    mx.eval(logits)
    router = 2 * B * T * 16 * 4
    f = alloy.ModelConfig.from_dict(cfg).ffn(0)
    from alloy.roofline.costs import get_cost
    c = get_cost("ffn", "moe")(f[1], Workload(B, T))
    assert c.flops["matmul"] == sum(counted) + router

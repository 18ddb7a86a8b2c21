"""Per-kind costs against hand-computed counts, and the cost registry.

Every registered mixer / FFN kind must have a cost function and a hand-computed case here; a new
kind registered without them fails `test_every_registered_kind_has_a_cost` and
`test_every_registered_kind_has_a_hand_computed_case`.
"""
import pytest
from hypothesis import given, strategies as st

import alloy
from alloy.config import ModelConfig
from alloy.layers.registry import _REGISTRY, get_layer, make_settings, registered
from alloy.roofline import Workload, get_cost, registered_costs, roofline, visible_pairs
from alloy.roofline.costs import pairs_in_chunks, register_cost


def _settings(role, kind, d_model, **fields):
    return make_settings(role, kind, kind, fields, d_model)


def _cost(role, kind, d_model, w, **fields):
    return get_cost(role, kind)(_settings(role, kind, d_model, **fields), w)


# --- hand-computed cases: (role, kind) -> check function; numbers worked out in the comments ---

def _mamba2():
    # d_model 8, expand 2 -> d_inner 16; head_dim 4 -> h 4; d_state n 4; g 1; d_conv 4; chunk 4
    # d_in_proj = 2*16 + 2*1*4 + 4 = 44; conv_dim = 16 + 2*4 = 24
    kw = dict(d_state=4, head_dim=4, expand=2, n_groups=1, d_conv=4, chunk_size=4)
    c = _cost("mixer", "mamba2", 8, Workload(batch=2, tokens=6), **kw)  # N = 12
    assert c.flops["matmul"] == 2 * 12 * 8 * 44 + 2 * 12 * 16 * 8 == 11520
    assert c.flops["scan"] == 2 * 12 * 24 * 4 == 2304  # the depthwise conv
    # Q = 4, c = 2 chunks/row, causal pairs per row: 4*5/2 + 2*3/2 = 13
    # intra 2*13*(2*1*4 + 4 + 2*4*4) = 1144; states 2*12*64 = 1536; state->y 1536;
    # passing 2*2*2*64 = 512; skip+dt*x 3*12*16 = 576
    assert c.flops["chunked"] == 1144 + 1536 + 1536 + 512 + 576 == 5304
    # in_proj 44*8 + out_proj 16*8 = 480; conv 24*4 + bias 24 + norm 16 = 136; dt_bias, A_log, D: 12
    assert c.params == {"matrix": 480, "vector": 136, "fp32": 12}
    # reads: x 12*8, conv in 12*24, scan in 12*(24+4), out_proj in 2*12*16
    assert c.act_read == 96 + 288 + 336 + 384 == 1104
    # writes: in_proj 12*44, conv 12*24, scan 12*16, out_proj 12*8
    assert c.act_write == 528 + 288 + 192 + 96 == 1104
    assert c.state_read == {}  # prefill from nothing
    assert c.state_write == {"conv": 2 * 3 * 24, "ssm": 2 * 4 * 4 * 4}
    d = _cost("mixer", "mamba2", 8, Workload(batch=2, tokens=1, context=5), **kw)  # decode, N = 2
    assert d.flops["matmul"] == 2 * 2 * 8 * 44 + 2 * 2 * 16 * 8 == 1920
    # conv 2*2*24*4 = 384; one step per row 5*h*p*n + 3*h*p = 320 + 48
    assert d.flops == {"matmul": 1920, "scan": 384 + 2 * 368}
    assert d.state_read == {"conv": 144, "ssm": 128}


def _mamba1():
    # d_model 8, expand 2 -> d_inner 16, dt_rank 2, d_state 4, d_conv 4; batch 1, T 3 -> N 3
    c = _cost("mixer", "mamba1", 8, Workload(batch=1, tokens=3), d_state=4, dt_rank=2, expand=2)
    # in 2*3*8*32 = 1536, x_proj 2*3*16*10 = 960, dt_proj 2*3*2*16 = 192, out 2*3*16*8 = 768
    assert c.flops["matmul"] == 3456
    # conv 2*3*16*4 = 384; scan 7*3*16*4 = 1344 + 3*3*16 = 144
    assert c.flops["scan"] == 384 + 1344 + 144
    # matrices 256 + 160 + 32 + 128; vectors conv 64 + conv bias 16 + dt_proj bias 16; fp32 A_log 64 + D 16
    assert c.params == {"matrix": 576, "vector": 96, "fp32": 80}
    assert c.act_read == 24 + 48 + 48 + 6 + (144 + 24) + 48 == 342
    assert c.act_write == 96 + 48 + 30 + 48 + 48 + 24 == 294
    assert c.state_write == {"conv": 3 * 16, "ssm": 16 * 4}


def _attention():
    # d_model 16, 4 q heads, 2 kv heads, head_dim 4, qk_norm; a 3-token chunk after 5 cached
    c = _cost("mixer", "attention", 16, Workload(batch=1, tokens=3, context=5), n_heads=4, n_kv_heads=2,
              head_dim=4, qk_norm=True)
    # qkv width (4 + 2*2)*4 = 32: 2*3*16*32 = 3072; o_proj 2*3*16*16 = 1536
    assert c.flops["matmul"] == 4608
    # queries at positions 5, 6, 7 see 6 + 7 + 8 = 21 keys; 4*hd*Hq*pairs = 4*4*4*21
    assert c.flops["attention"] == 1344
    assert c.params == {"matrix": 16 * 32 + 16 * 16, "vector": 8}
    assert c.state_read == {"kv": 2 * 2 * 4 * 5} and c.state_write == {"kv": 2 * 3 * 2 * 4}
    assert c.act_read == 48 + 96 + 48 and c.act_write == 96 + 48 + 48


def _sliding_attention():
    c = _cost("mixer", "sliding_attention", 16, Workload(batch=1, tokens=3, context=5), n_heads=4,
              n_kv_heads=2, head_dim=4, window=4)
    assert c.flops["attention"] == 4 * 4 * 4 * (4 + 4 + 4)  # every query sees exactly 4 keys
    assert c.state_read == {"kv": 2 * 2 * 4 * 4}  # the window's worth of the cache
    p = _cost("mixer", "sliding_attention", 16, Workload(batch=2, tokens=6), n_heads=4, window=3)
    # prefill, window 3: keys seen 1, 2, 3, 3, 3, 3 = 15 per row and head; hd = 16/4 = 4
    assert p.flops["attention"] == 4 * 4 * 4 * 2 * 15


def _mlp():
    c = _cost("ffn", "mlp", 8, Workload(batch=1, tokens=2), d_ff=12)  # gated (SwiGLU)
    assert c.flops == {"matmul": 2 * 2 * 8 * 12 * 3}
    assert c.params == {"matrix": 3 * 8 * 12}
    assert c.act_read == 2 * 8 + 2 * 2 * 12 and c.act_write == 2 * 2 * 12 + 2 * 8
    p = _cost("ffn", "mlp", 8, Workload(batch=1, tokens=2), d_ff=12, gated=False, bias=True)
    assert p.flops == {"matmul": 2 * 2 * 8 * 12 * 2}
    assert p.params == {"matrix": 2 * 8 * 12, "vector": 12 + 8}


def _gated_deltanet():
    # d_model 8; 1 key head, 2 value heads (H), K = V = 4; key_dim 4, value_dim 8, conv_dim 2*4 + 8 = 16
    kw = dict(n_k_heads=1, n_v_heads=2, head_k_dim=4, head_v_dim=4, d_conv=4, chunk_size=4)
    c = _cost("mixer", "gated_deltanet", 8, Workload(batch=1, tokens=6), **kw)  # N = 6
    # qkv 2*6*8*16 = 1536, z 2*6*8*8 = 768, b and a 2 * 2*6*8*2 = 384, out 2*6*8*8 = 768
    assert c.flops["matmul"] == 3456
    assert c.flops["scan"] == 2 * 6 * 16 * 4 == 768  # conv
    # per value head: pairs 4*5/2 + 2*3/2 = 13, times 6K + 4V = 40 -> 520; solve 4*3*2/3 = 8 (the
    # 2-token chunk: 0); state 6*T*K*V = 576 -> 1104; times H = 2
    assert c.flops["chunked"] == 2 * (520 + 8 + 576) == 2208
    # matrices 8*16 + 8*8 + 8*2 + 8*2 + 8*8 = 288; conv 16*4 (no bias) + norm 4; dt_bias, A_log 2 + 2
    assert c.params == {"matrix": 288, "vector": 68, "fp32": 4}
    assert c.act_read == 48 + 96 + (96 + 24) + 96 == 360
    assert c.act_write == 6 * (16 + 8 + 4) + 96 + 48 + 48 == 360
    assert c.state_write == {"conv": 3 * 16, "ssm": 2 * 4 * 4}
    d = _cost("mixer", "gated_deltanet", 8, Workload(batch=1, tokens=1, context=3), **kw)
    assert d.flops["scan"] == 2 * 1 * 16 * 4 + 2 * (7 * 16 + 2 * 4) == 368  # conv + one step per head
    assert d.state_read == {"conv": 48, "ssm": 32}


def _moe():
    # d_model 8, 4 experts, top 2, d_ff 6 (SwiGLU), shared expert 4 wide with a gate; N = 3 tokens
    c = _cost("ffn", "moe", 8, Workload(batch=1, tokens=3), n_experts=4, top_k=2, d_ff=6, shared_d_ff=4,
              shared_gate=True)
    # router 2*3*8*4 = 192; routed 2*3*2*8*6*3 = 1728; shared 2*3*8*4*3 = 576; gate 2*3*8 = 48
    assert c.flops == {"matmul": 192 + 1728 + 576 + 48}
    # stored: router 32, experts 4*6*8*3 = 576, shared 96, gate 8
    assert c.params == {"matrix": 32 + 576 + 96 + 8}
    # read: 3 tokens x 2 of 4 experts touch 4 * (1 - (1/2)^3) = 3.5 experts on average
    assert c.weight_reads == {"matrix": 32 + 3.5 * 144 + 96 + 8}
    assert c.act_read == 24 + 48 + 72 + 48 + (24 + 24) == 240
    assert c.act_write == 12 + 72 + 48 + 24 + (24 + 24) == 204
    one = _cost("ffn", "moe", 8, Workload(batch=1, tokens=1), n_experts=4, top_k=2, d_ff=6)
    assert one.weight_reads == {"matrix": 32 + 2 * 144}  # a single token reads exactly its k experts
    # Nemotron-H latent experts, L = 4: projections 8 -> 4 -> 8, experts in width 4
    lat = _cost("ffn", "moe", 8, Workload(batch=1, tokens=1), n_experts=4, top_k=2, d_ff=6, gated=False,
                latent_dim=4)
    # router 2*8*4 = 64; fc1 2*8*4 = 64; fc2 64; routed 2*2*4*6*2 = 192
    assert lat.flops == {"matmul": 64 + 64 + 64 + 192}
    # stored: router 32, fc1 32, fc2 32, experts 4*6*4*2 = 192
    assert lat.params == {"matrix": 32 + 32 + 32 + 192}


def _short_conv():
    c = _cost("mixer", "short_conv", 8, Workload(batch=1, tokens=2, context=4), kernel=3)  # N = 2
    assert c.flops == {"matmul": 2 * 2 * 8 * 24 + 2 * 2 * 8 * 8, "scan": 2 * 2 * 8 * 3}
    assert c.params == {"matrix": 8 * 24 + 8 * 8, "vector": 8 * 3}
    assert c.act_read == 16 + 32 + 32 and c.act_write == 48 + 16 + 16
    assert c.state_read == c.state_write == {"conv": 2 * 8}


def _parallel():
    # Falcon-H1 style: a Mamba-2 and an attention branch on the same input; their costs (checked by
    # hand above) add, plus one read of the running sum (N*D) for the second branch
    w = Workload(batch=2, tokens=6)
    m = dict(kind="mamba2", d_state=4, head_dim=4, chunk_size=4)
    a = dict(kind="attention", n_heads=2)
    c = _cost("mixer", "parallel", 8, w, branches={"mamba": m, "attn": a})
    parts = [_cost("mixer", k.pop("kind"), 8, w, **k) for k in (dict(m), dict(a))]
    total = parts[0] + parts[1]
    assert c.flops == total.flops and c.flops["matmul"] == 11520 + 2 * 12 * 8 * 24 + 2 * 12 * 8 * 8
    assert c.params == total.params and c.state_write == total.state_write
    assert c.act_read == total.act_read + 12 * 8


def _rglru():
    # d_model 8, width 12 in 3 blocks of 4, conv 4 taps; N = 2 tokens after 5 cached
    c = _cost("mixer", "rglru", 8, Workload(batch=1, tokens=2, context=5), width=12, n_heads=3, conv_width=4)
    # linear_y, linear_x 2 * 2*2*8*12 = 768, linear_out 2*2*12*8 = 384, gates 2 * 2*2*12*4 = 384
    assert c.flops == {"matmul": 768 + 384 + 384, "scan": 2 * 2 * 12 * 4 + 10 * 2 * 12}
    # matrices 8*12*2 + 12*8 + gates 2*3*4*4; vectors: biases 12+12+8, conv 12*4 + 12, gate biases 24,
    # recurrent_param 12
    assert c.params == {"matrix": 192 + 96 + 96, "vector": 32 + 60 + 24 + 12}
    assert c.act_read == 16 + 24 + 24 + 48 and c.act_write == 48 + 24 + 24 + 16
    assert c.state_read == c.state_write == {"conv": 3 * 12, "ssm": 12}


def _lightning():
    # d_model 8, 2 heads of 4; N = 6 tokens in chunks of 4 (one of 4, one of 2)
    c = _cost("mixer", "lightning", 8, Workload(batch=1, tokens=6), n_heads=2, chunk_size=4)
    # qkv 2*6*8*24 = 2304, gate 2*6*8*8 = 768, out 2*6*8*8 = 768
    assert c.flops["matmul"] == 2304 + 768 + 768
    # SSD form with h = g = 2, p = n = 4: pairs 10 + 3 = 13 -> 13 * (2*2*4 + 2 + 2*2*4) = 442;
    # states + outputs 4*6*2*4*4 = 768; passing 2*1*2*2*4*4 = 128; skip 3*6*2*4 = 144
    assert c.flops["chunked"] == 442 + 768 + 128 + 144
    assert c.params == {"matrix": 8 * 24 + 8 * 8 + 8 * 8, "vector": 8, "fp32": 2}
    assert c.state_write == {"ssm": 2 * 4 * 4} and c.state_read == {}


def _kda():
    # d_model 8, 2 heads of 4 (Q = 8), conv 4 taps; N = 6 tokens in chunks of 4
    c = _cost("mixer", "kda", 8, Workload(batch=1, tokens=6), n_heads=2, head_dim=4, chunk_size=4)
    # q, k, v 3 * 2*6*8*8 = 2304; f_a, g_a 2 * 2*6*8*4 = 768; f_b, g_b 2 * 2*6*4*8 = 768; b 2*6*8*2 = 192;
    # o 2*6*8*8 = 768
    assert c.flops["matmul"] == 2304 + 768 + 768 + 192 + 768
    # the delta rule as gated_deltanet with K = V = 4, H = 2: pairs 13 * (6*4 + 4*4) = 520, solve 8, state
    # 6*6*16 = 576 -> 1104 per head; per-channel decays 2 * 13 * 4 = 104 per head
    assert c.flops["chunked"] == 2 * 1104 + 2 * 104
    assert c.flops["scan"] == 2 * 6 * 24 * 4  # conv
    assert c.params == {"matrix": 3 * 64 + 2 * 32 + 2 * 32 + 16 + 64, "vector": 4 * 24 + 4, "fp32": 8 + 2}
    assert c.state_write == {"conv": 3 * 24, "ssm": 2 * 4 * 4}


def _mla():
    # d_model 8, 2 heads, latent 6, nope 4 + rope 2, v 3, no q bottleneck; 2 new tokens after 3 cached
    c = _cost("mixer", "mla", 8, Workload(batch=1, tokens=2, context=3), n_heads=2, kv_lora_rank=6,
              qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=3)
    # q 2*2*8*12 = 384, kv_a 2*2*8*8 = 256, o 2*2*6*8 = 192, kv_b over 5 keys 2*5*6*2*7 = 840
    assert c.flops["matmul"] == 384 + 256 + 192 + 840
    # visible pairs for queries at 3 and 4: 4 + 5 = 9; per pair and head 2*6 + 2*3 = 18
    assert c.flops["attention"] == 18 * 2 * 9
    assert c.params == {"matrix": 96 + 64 + 48 + 84, "vector": 6}
    assert c.state_read == {"kv": 3 * 8} and c.state_write == {"kv": 2 * 8}


_DSV4 = dict(n_heads=2, head_dim=4, q_lora_rank=6, rope_dims=2, window=3, o_groups=2, o_lora_rank=3)
_W52 = Workload(batch=1, tokens=5, context=2)  # queries at positions 2..6


def _dsv4_sliding():
    c = _cost("mixer", "dsv4_sliding", 8, _W52, **_DSV4)
    # q_a 2*5*8*6 = 480, q_b 2*5*6*8 = 480, kv 2*5*8*4 = 320, o_a 2 groups of 4 -> 3: 2*5*4*6 = 240,
    # o_b 2*5*6*8 = 480
    assert c.flops["matmul"] == 480 + 480 + 320 + 240 + 480
    # every query sees min(3, p + 1) = 3 window keys: 15 pairs x 4*d*H = 32
    assert c.flops["attention"] == 32 * 15
    assert c.params == {"matrix": 48 + 48 + 32 + 24 + 48, "vector": 6 + 4 + 2}
    assert c.state_read == {"kv": 4 * 2} and c.state_write == {"kv": 4 * 3}


def _hca():
    c = _cost("mixer", "hca", 8, _W52, compress_rate=3, **_DSV4)
    # + compressor kv / gate 2 * 2*5*8*4 = 640
    assert c.flops["matmul"] == 2000 + 640
    # windows complete by positions 2..6: (p + 1) // 3 = 1, 1, 1, 2, 2 -> 7 entry pairs; 15 window pairs
    assert c.flops["attention"] == 32 * (15 + 7)
    # windows 0 and 1 complete in the call: 2 entries x 2*m*d pooling
    assert c.flops["scan"] == 2 * 2 * 3 * 4
    assert c.params == {"matrix": 200 + 64, "vector": 12 + 3 * 4 + 4}
    # read: ring 8 + no entry yet + the raw ring (kv, gate) of min(2, 3) tokens x 4
    assert c.state_read == {"kv": 8 + 0 + 2 * 2 * 4}
    assert c.state_write == {"kv": 12 + 2 * 4 + 2 * 3 * 4}


def _csa():
    c = _cost("mixer", "csa", 8, _W52, compress_rate=2, index_n_heads=2, index_head_dim=4, index_topk=1, **_DSV4)
    # + compressor kv / gate (D -> 2d) 2 * 2*5*8*8 = 1280; indexer kv / gate 1280, q_b 2*5*6*8 = 480,
    # weights 2*5*8*2 = 160
    assert c.flops["matmul"] == 2000 + 1280 + 1280 + 480 + 160
    # entries visible to p = 2..6: 1, 2, 2, 3, 3 (11); top-1 keeps 5. Indexer scores 2*Hi*di = 16 per pair
    assert c.flops["attention"] == 32 * (15 + 5) + 16 * 11
    # windows 1 and 2 complete: 2 entries x 2*(2m)*d, twice (compressor and indexer, di = d = 4)
    assert c.flops["scan"] == 2 * 2 * 4 * 4 * 2
    assert c.params == {"matrix": 200 + 128 + 128 + 48 + 16, "vector": 12 + (16 + 4) + (16 + 4)}
    # entries d + di = 8 each (one so far); raw rings (kv and gate) of 2d + 2di = 16 features per
    # token over R = 4 tokens: the 2 cached ones read, 4 of the 5 new written
    assert c.state_read == {"kv": 8 + 1 * 8 + 2 * 2 * 16}
    assert c.state_write == {"kv": 12 + 2 * 8 + 2 * 4 * 16}


def _hash_moe():
    w = Workload(batch=1, tokens=3)
    c = _cost("ffn", "hash_moe", 8, w, n_experts=4, top_k=2, d_ff=6, vocab_size=10)
    plain = _cost("ffn", "moe", 8, w, n_experts=4, top_k=2, d_ff=6)
    assert c.flops == plain.flops  # the router still scores every expert
    # the int32 table: 10 x 2 stored, 3 tokens' rows read
    assert c.params == {**plain.params, "fp32": 20} and c.weight_reads == {**plain.weight_reads, "fp32": 6}


HAND = {("mixer", "dsv4_sliding"): _dsv4_sliding, ("mixer", "hca"): _hca, ("mixer", "csa"): _csa,
        ("ffn", "hash_moe"): _hash_moe, ("mixer", "mla"): _mla, ("mixer", "kda"): _kda, ("mixer", "lightning"): _lightning, ("mixer", "rglru"): _rglru, ("mixer", "mamba2"): _mamba2, ("mixer", "mamba1"): _mamba1, ("mixer", "attention"): _attention,
        ("mixer", "sliding_attention"): _sliding_attention, ("mixer", "gated_deltanet"): _gated_deltanet,
        ("mixer", "short_conv"): _short_conv, ("mixer", "parallel"): _parallel,
        ("ffn", "mlp"): _mlp, ("ffn", "moe"): _moe}
KINDS = [("mixer", k) for k in registered("mixer")] + [("ffn", k) for k in registered("ffn")]


@pytest.mark.parametrize("role,kind", KINDS)
def test_every_registered_kind_has_a_cost(role, kind):
    assert kind in registered_costs(role), f"{role} kind {kind!r} has no roofline cost"


@pytest.mark.parametrize("role,kind", KINDS)
def test_every_registered_kind_has_a_hand_computed_case(role, kind):
    assert (role, kind) in HAND, f"no hand-computed roofline test for {role} kind {kind!r}"
    HAND[(role, kind)]()


def test_params_counted_equal_the_initialised_tree_for_every_kind():
    """Stored parameters of the report == alloy.params.count_params(model.init(...))."""
    import mlx.core as mx
    from alloy.params import count_params
    cfg = {"vocab_size": 37, "d_model": 16,
           "layer_types": ["mamba2", "mamba1", "attention", "sliding_attention", "gated_deltanet", "short_conv",
                           "parallel", "rglru"],
           "ffn_types": ["mlp", "none", "wide", "mlp", "moe", "none", "mlp", "mlp"],
           "mixers": {"mamba2": {"d_state": 8, "head_dim": 8, "n_groups": 2, "bias": True},
                      "mamba1": {"d_state": 4, "conv_bias": False},
                      "attention": {"n_heads": 4, "n_kv_heads": 1, "qkv_bias": True, "o_bias": True,
                                    "qk_norm": True},
                      "sliding_attention": {"n_heads": 2, "window": 3},
                      "gated_deltanet": {"n_k_heads": 2, "n_v_heads": 4, "head_k_dim": 8, "head_v_dim": 4,
                                         "conv_bias": True},
                      "short_conv": {"kernel": 3, "bias": True},
                      "rglru": {"width": 24, "n_heads": 4},
                      "parallel": {"branches": {"m": {"kind": "mamba2", "d_state": 8, "head_dim": 8},
                                                "a": {"kind": "sliding_attention", "n_heads": 2, "window": 4}}}},
           "ffns": {"mlp": {"d_ff": 24}, "wide": {"kind": "mlp", "d_ff": 40, "gated": False, "bias": True},
                    "moe": {"n_experts": 4, "top_k": 2, "d_ff": 12, "router_bias": True, "shared_d_ff": 8,
                            "shared_gate": True}}}
    for tied in (True, False):
        cfg["tie_embeddings"] = tied
        model = alloy.build(cfg)
        assert roofline(cfg, "H100", "prefill", seq_len=8).params == count_params(model.init(mx.random.key(0)))


@given(T=st.integers(1, 40), C=st.integers(0, 40), W=st.integers(0, 50))
def test_visible_pairs_equals_brute_force(T, C, W):
    brute = sum(1 for i in range(T) for j in range(C + i + 1) if not W or (C + i) - j < W)
    assert visible_pairs(T, C, W) == brute


@given(T=st.integers(1, 60), Q=st.integers(1, 20))
def test_pairs_in_chunks_equals_brute_force(T, Q):
    assert pairs_in_chunks(T, Q) == sum(1 for l in range(T) for s in range(l + 1) if l // Q == s // Q)


def test_unregistered_kind_names_itself_then_works_once_registered(monkeypatch):
    spec = get_layer("mixer", "mamba2")
    monkeypatch.setitem(_REGISTRY["mixer"], "my_mixer", spec.__class__(**{**spec.__dict__, "kind": "my_mixer"}))
    cfg = ModelConfig(vocab_size=11, d_model=8, layer_types=("my_mixer",), ffn_types=("none",),
                      mixers={"my_mixer": {"d_state": 4, "head_dim": 4}})
    with pytest.raises(ValueError, match="no roofline cost registered for mixer kind 'my_mixer'"):
        roofline(cfg)
    from alloy.roofline import costs
    monkeypatch.setitem(costs._COSTS["mixer"], "my_mixer", None)  # restored after the test
    register_cost("my_mixer", replace=True)(costs.mamba2_cost)
    r = roofline(cfg, "H100", "decode", context=10)
    assert r.layer(0).mixer == "my_mixer" and r.total_flops > 0


def test_register_cost_refuses_a_silent_replacement():
    with pytest.raises(ValueError, match="already registered"):
        register_cost("mamba2")(lambda s, w: None)
    with pytest.raises(ValueError, match="role"):
        register_cost("x", role="norm")


def test_params_counted_for_shared_blocks_and_ffn_only_layers():
    """Zamba2-style shared blocks (stored once per block, adapters and linears per call) and
    FFN-only layers are counted exactly like the initialised tree."""
    import mlx.core as mx
    from alloy.params import count_params
    cfg = {"vocab_size": 37, "d_model": 16, "layer_types": ["mamba2", "mamba2", "none", "mamba2", "mamba2"],
           "ffn_types": ["none", "none", "mlp", "none", "none"],
           "mixers": {"mamba2": {"d_state": 8, "head_dim": 8}}, "ffns": {"mlp": {"d_ff": 24}},
           "shared": {"n_blocks": 2, "at": [0, 1, 3], "attention": {"n_heads": 4, "n_kv_heads": 2, "output_gate": True},
                      "mlp": {"d_ff": 20, "activation": "gelu"}, "adapter_rank": 3}}
    model = alloy.build(cfg)
    rep = roofline(cfg, "H100", "prefill", seq_len=8)
    assert rep.params == count_params(model.init(mx.random.key(0)))
    shared = next(r for r in rep.rows if r.mixer == "shared")
    assert shared.layers == (0, 1, 3) and shared.flops["matmul"] > 0
    none_rows = [r for r in rep.rows if r.mixer == "none"]
    assert len(none_rows) == 1 and none_rows[0].layers == (2,)


def test_params_counted_for_hyper_connections_and_deepseek_v4_kinds():
    """DeepSeek-V4 kinds, hash routing and hyper-connection streams are counted exactly."""
    import mlx.core as mx
    from alloy.params import count_params
    cfg = {"vocab_size": 37, "d_model": 16, "layer_types": ["dsv4_sliding", "csa", "hca", "none"],
           "ffn_types": ["hash_moe", "moe", "none", "moe"],
           "mixers": {"dsv4_sliding": {**_DSV4, "head_dim": 8}, "hca": {**_DSV4, "compress_rate": 4},
                      "csa": {**_DSV4, "compress_rate": 2, "index_n_heads": 2, "index_head_dim": 4}},
           "ffns": {"hash_moe": {"n_experts": 4, "top_k": 2, "d_ff": 8, "shared_d_ff": 8},
                    "moe": {"n_experts": 4, "top_k": 2, "d_ff": 8}},
           "block_style": "hyper", "hyper": {"streams": 3}}
    model = alloy.build(cfg)
    assert roofline(cfg, "H100", "prefill", seq_len=8).params == count_params(model.init(mx.random.key(0)))

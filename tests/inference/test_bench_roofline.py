"""`alloy bench --hardware`: measured rates as fractions of the analytic roofline."""
import alloy
from alloy.inference.cli import roofline_fraction
from alloy.roofline import roofline


def test_fraction_is_measured_over_roofline_rate():
    model = alloy.build("alloy/configs/hybrid-tiny.json")
    r = {"batch": 2, "prompt_len": 64, "gen_len": 16, "prompt_tok_s": 1000.0, "decode_tok_s": 50.0}
    f = roofline_fraction(model, r, "H100")
    pre = roofline(model.config, "H100", "prefill", batch=2, seq_len=64)
    dec = roofline(model.config, "H100", "decode", batch=2, context=72)
    assert abs(f["prefill_tok_s"] - 128 / pre.time_s) < 1e-6 * f["prefill_tok_s"]
    assert abs(f["decode_fraction"] - 50.0 / (2 / dec.time_s)) < 1e-12
    q = roofline_fraction(model, r, "H100", bits=4)
    assert q["decode_tok_s"] > f["decode_tok_s"]  # 4-bit weights move fewer bytes

"""`alloy bench` / `alloy generate` run end to end on a tiny model; bench reports every field."""
import json

import alloy  # noqa: F401
import pytest

from alloy.cli import main

TINY = json.dumps({"name": "cli-tiny", "vocab_size": 256, "d_model": 16,
                   "layer_types": ["mamba2", "sliding_attention"], "ffn_types": ["none", "mlp"],
                   "mixers": {"mamba2": {"d_state": 4, "head_dim": 8},
                              "sliding_attention": {"n_heads": 2, "window": 8}},
                   "ffns": {"mlp": {"d_ff": 32}}})


def test_bench_reports_throughput_ttft_and_memory(capsys):
    assert main(["bench", "--config", TINY, "--prompt-len", "20", "--gen-len", "4", "--batch", "2",
                 "--chunk", "8", "--json", "--quantize", "8", "--group-size", "32"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["model"] == "cli-tiny" and r["batch"] == 2 and r["prompt_len"] == 20 and r["gen_len"] == 4
    for k in ("prompt_tok_s", "decode_tok_s", "ttft_s", "peak_memory_bytes", "state_bytes"):
        assert r[k] > 0, k
    assert r["quantize"] == {"bits": 8, "group_size": 32}
    wide = TINY.replace('"d_model": 16', '"d_model": 64')  # head dim 32: groupable
    sizes = {}
    for extra in ([], ["--kv-bits", "8"]):
        assert main(["bench", "--config", wide, "--prompt-len", "20", "--gen-len", "3", "--json", *extra]) == 0
        sizes[len(extra)] = json.loads(capsys.readouterr().out)
    assert sizes[2]["kv_bits"] == 8 and sizes[2]["state_bytes"] < sizes[0]["state_bytes"]


def test_generate_streams_bytes_and_bad_flags_are_reported(capsys):
    assert main(["generate", "--config", TINY, "--prompt", "héllo", "--max-tokens", "5",
                 "--temperature", "0.9", "--top-p", "0.9"]) == 0
    assert "5 tokens" in capsys.readouterr().err
    # quantized KV caches: a head dim of 8 cannot be grouped (named); 32 generates
    assert main(["generate", "--config", TINY, "--prompt", "hello", "--max-tokens", "3", "--kv-bits", "8"]) == 2
    assert "quantize_kv: group_size" in capsys.readouterr().err
    wide = TINY.replace('"d_model": 16', '"d_model": 64')
    assert main(["generate", "--config", wide, "--prompt", "hello", "--max-tokens", "3", "--kv-bits", "4"]) == 0
    assert "3 tokens" in capsys.readouterr().err
    assert main(["bench", "--config", "no-such-config"]) == 2
    assert "no-such-config" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--quantize", "3"])

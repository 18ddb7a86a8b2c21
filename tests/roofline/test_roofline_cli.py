"""`alloy roofline` through its argparse registration."""
import argparse
import json

import pytest

import alloy  # noqa: F401
from alloy.roofline import cli, roofline


def _run(argv):
    p = argparse.ArgumentParser()
    cli.register(p.add_subparsers())
    a = p.parse_args(["roofline", *argv])
    a.fn(a)


def test_markdown_and_json_match_the_api(capsys):
    _run(["qwen3-4b-shape", "--hardware", "H100", "--mode", "decode", "--context", "32768"])
    md = capsys.readouterr().out
    r = roofline("qwen3-4b-shape", "H100", "decode", context=32768)
    assert md.strip() == r.to_markdown().strip()
    _run(["hybrid-tiny", "--hardware", "M3 Max", "--mode", "mini-prefill", "--chunk", "64", "--context", "256",
          "--batch", "2", "--dtype", "bf16", "--weight-dtype", "int4-g32", "--json"])
    d = json.loads(capsys.readouterr().out)
    assert d["workload"] == {"batch": 2, "tokens": 64, "context": 256}
    assert d["precision"]["weight"] == "int4-g32" and d["hardware"]["name"] == "Apple M3 Max"


def test_bad_arguments_raise_errors_naming_them():
    with pytest.raises(ValueError, match="unknown hardware 'B200'"):
        _run(["hybrid-tiny", "--hardware", "B200"])
    with pytest.raises(SystemExit):  # argparse: invalid choice
        _run(["hybrid-tiny", "--mode", "train"])

"""`alloy bench` / `alloy generate`: the prefill chunk follows the device when --chunk is not given."""
import mlx.core as mx

from alloy.inference import cli


def test_default_chunk_follows_the_device(monkeypatch):
    monkeypatch.setattr(mx, "default_device", lambda: mx.cpu)
    assert cli.default_chunk() == 512
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    assert cli.default_chunk() == 2048


def test_chunk_flag_defaults_to_none_and_is_kept_when_given():
    import argparse
    p = argparse.ArgumentParser()
    cli.register(p.add_subparsers())
    assert p.parse_args(["bench"]).chunk is None
    assert p.parse_args(["generate", "--prompt", "x", "--chunk", "64"]).chunk == 64

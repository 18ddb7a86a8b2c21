"""``alloy serve`` as a process: binds loopback by default, answers, and exits cleanly on SIGINT."""
import signal
import socket
import subprocess
import sys
import time

import pytest

httpx = pytest.importorskip("httpx")


def test_alloy_serve_process(tiny_checkpoint):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "alloy.cli", "serve", "--model", str(tiny_checkpoint),
                             "--port", str(port), "--max-len", "128", "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "alloy serve did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                       json={"model": "tiny", "prompt": "hi", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                       json={"model": "tiny", "prompt": "hi", "max_tokens": 200})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_binds_loopback_by_default():
    import argparse

    from alloy.serve.cli import register
    p = argparse.ArgumentParser()
    register(p.add_subparsers())
    args = p.parse_args(["serve", "--model", "ckpt"])
    assert (args.host, args.port) == ("127.0.0.1", 8000)


def test_build_engine_prepares_a_mamba2_stack_for_decoding(tmp_path):
    """`alloy serve` loads a pure Mamba-2 checkpoint with its layers stacked for the whole-stack decode
    kernel (`prepare_decode`, once at load), and the engine's params give the same logits."""
    import argparse

    import mlx.core as mx

    import alloy
    from alloy.serve.cli import build_engine, register
    cfg = {"name": "m2", "vocab_size": 257, "d_model": 32, "layer_types": ["mamba2"] * 2, "ffn_types": ["none"] * 2,
           "mixers": {"mamba2": {"d_state": 16, "head_dim": 16, "chunk_size": 16}}, "tie_embeddings": True}
    model = alloy.build(cfg)
    params = model.init(mx.random.key(1))
    alloy.save(tmp_path / "m2", model, params)
    p = argparse.ArgumentParser()
    register(p.add_subparsers())
    engine, name = build_engine(p.parse_args(["serve", "--model", str(tmp_path / "m2")]))  # not started
    assert name == "m2" and "decode_stack" in engine.params
    toks = mx.array([[5, 6, 7]])
    a, _ = model.apply(params, toks)
    b, _ = model.apply(engine.params, toks)
    assert mx.allclose(a, b, atol=1e-5)

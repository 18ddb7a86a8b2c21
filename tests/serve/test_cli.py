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

"""A tiny random byte-level model served in-process by uvicorn on a free loopback port."""
import socket
import threading
import time
import types

import pytest

import alloy  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

TINY = {"name": "serve-tiny", "vocab_size": 257, "d_model": 32,
        "layer_types": ["mamba2", "attention"], "ffn_types": ["mlp", "none"],
        "mixers": {"mamba2": {"d_state": 16, "head_dim": 16, "chunk_size": 16},
                   "attention": {"n_heads": 2}},
        "ffns": {"mlp": {"d_ff": 64}}, "tie_embeddings": True}
MODEL_NAME = "tiny"
MAX_LEN = 256


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    model = alloy.build(TINY)
    params = model.init(mx.random.key(3))
    alloy.save(path, model, params)
    return path


@pytest.fixture(scope="session")
def loaded(tiny_checkpoint):
    from alloy.tokenizer import load_model_and_tokenizer
    return load_model_and_tokenizer(tiny_checkpoint)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(loaded):
    """Namespace(url, engine, name, max_len): uvicorn in a background thread, stopped at the end of
    the session."""
    from alloy.inference.prefix_cache import PrefixCache
    from alloy.serve.app import create_app
    from alloy.serve.engine import Engine

    model, params, tok = loaded
    engine = Engine(model, params, tok, max_len=MAX_LEN, max_active=8, max_queue=512,
                    prefix_cache=PrefixCache(max_bytes=64 << 20, every=32), prefill_chunk=64)
    app = create_app(engine, MODEL_NAME, max_body_bytes=64 << 10, disconnect_poll_s=0.05)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "server did not start"
        assert th.is_alive(), "server thread died"
        time.sleep(0.02)
    yield types.SimpleNamespace(url=f"http://127.0.0.1:{port}", engine=engine, name=MODEL_NAME, max_len=MAX_LEN)
    srv.should_exit = True
    th.join(15)
    assert not th.is_alive(), "server did not stop"

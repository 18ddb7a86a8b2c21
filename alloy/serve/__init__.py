"""``alloy serve``: an OpenAI-compatible HTTP API over an Alloy model.

    from alloy.serve import Engine, create_app
    engine = Engine(model, params, tokenizer, max_len=2048)
    app = create_app(engine, "my-model")          # an ASGI app; run it with uvicorn

Needs the ``serve`` extra (starlette, uvicorn). See docs/serving.md.
"""
from alloy.serve.engine import Engine, Job, ListSink, QueueFull

__all__ = ["Engine", "Job", "ListSink", "QueueFull", "create_app"]


def create_app(*args, **kwargs):
    """``alloy.serve.app.create_app`` (imported lazily: it needs starlette)."""
    from alloy.serve.app import create_app as _create
    return _create(*args, **kwargs)

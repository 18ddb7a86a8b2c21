"""The README's main job until training lands: build the bundled hybrid, run it, compile it, time it.

Every figure it prints is measured in this process on this machine (no downloads, no network).
"""
from __future__ import annotations

import time
from importlib import resources

import mlx.core as mx

from alloy.model import build
from alloy.params.tree import count_params


def bundled_config_path(name: str = "hybrid-tiny") -> str:
    path = resources.files("alloy") / "configs" / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no bundled config {name!r}")
    return str(path)


def _sample_tokens(batch: int, length: int) -> mx.array:
    """Real bytes as tokens: the source of this very module, repeated to the needed length."""
    data = open(__file__, "rb").read()
    need = batch * length
    data = (data * (need // len(data) + 1))[:need]
    return mx.array(list(data), dtype=mx.int32).reshape(batch, length)


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def run(config: str | None = None, batch: int = 4, prompt_len: int = 256, decode_steps: int = 32,
        seed: int = 0, out=print) -> dict:
    model = build(config or bundled_config_path())
    cfg = model.config
    params = model.init(mx.random.key(seed))
    mx.eval(params)
    kinds = ", ".join(f"{t}+{f}" for t, f in zip(cfg.layer_types, cfg.ffn_types))
    out(f"model {cfg.name}: {cfg.n_layers} layers [{kinds}], d_model {cfg.d_model}, "
        f"vocab {cfg.vocab_size}, {count_params(params):,} parameters ({cfg.dtype})")
    out(f"device: {mx.default_device()}")

    tokens = _sample_tokens(batch, prompt_len)
    logits, _ = model.apply(params, tokens)
    mx.eval(logits)
    out(f"forward: tokens {tuple(tokens.shape)} -> logits {tuple(logits.shape)}")

    fwd = mx.compile(model.apply)
    mx.eval(fwd(params, tokens)[0])  # trace + warm up
    t = _median_time(lambda: mx.eval(fwd(params, tokens)[0]), 3)
    prefill_tps = batch * prompt_len / t
    out(f"compiled full forward: {t * 1e3:.1f} ms  ({prefill_tps:,.0f} tok/s)")

    step = mx.compile(model.apply)
    state = model.init_state(batch, prompt_len + decode_steps + 1)
    logits, state = step(params, tokens, state)  # prefill into the state
    nxt = mx.argmax(logits[:, -1:], axis=-1).astype(mx.int32)
    mx.eval(nxt, state)
    t0 = time.perf_counter()
    for _ in range(decode_steps):
        logits, state = step(params, nxt, state)
        nxt = mx.argmax(logits[:, -1:], axis=-1).astype(mx.int32)
        mx.eval(nxt, state)
    dt = time.perf_counter() - t0
    decode_tps = batch * decode_steps / dt
    out(f"compiled decode: {decode_steps} steps x batch {batch}: {dt / decode_steps * 1e3:.1f} ms/step "
        f"({decode_tps:,.0f} tok/s); state pos {state['pos'].tolist()}")
    return {"params": count_params(params), "prefill_tok_s": prefill_tps, "decode_tok_s": decode_tps}


def register(sub) -> None:
    """``alloy demo``."""
    d = sub.add_parser("demo", help="build the bundled hybrid, run, compile and time it")
    d.add_argument("--config", default=None, help="model config JSON (default: bundled hybrid-tiny)")
    d.add_argument("--batch", type=int, default=4)
    d.add_argument("--prompt-len", type=int, default=256)
    d.add_argument("--steps", type=int, default=32, help="decode steps to time")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=lambda a: run(a.config, batch=a.batch, prompt_len=a.prompt_len,
                                    decode_steps=a.steps, seed=a.seed))

"""Generation benchmark: prompt tok/s, decode tok/s, time to first token, peak memory.

    run(model, params, prompt_len=512, gen_len=128, batch=1)

Random-token prompts (no data needed). Timing follows the generation path exactly: chunked prefill
through the compiled ``apply``, the first token sampled from the last logits, then the compiled
greedy decode step, pipelined one step ahead with ``mx.async_eval``. A warm-up pass with the same
shapes runs first, so no trace or compile time is counted. Every figure is wall-clock on the
default device; peak memory is ``mx.get_peak_memory()`` after ``mx.reset_peak_memory()``.

    prompt_tok_s = batch * prompt_len / prefill seconds
    ttft_s       = prefill + first sample (the first token materialised)
    decode_tok_s = batch * (gen_len - 1) / seconds of the remaining steps
"""
from __future__ import annotations

import time

import numpy as np

import mlx.core as mx

from alloy.inference.generate import compiled_step, prefill
from alloy.inference.sampling import SamplingParams, make_sampler
from alloy.params.tree import tree_bytes


def _once(model, params, tokens, gen_len, prefill_chunk, max_len, kv_bits=None):
    B, T = tokens.shape
    sp = SamplingParams()
    sampler = make_sampler(sp)
    step = compiled_step(model, sp)
    counts = mx.zeros((B, 1), dtype=mx.int32)
    rng = mx.random.key(0)
    state = model.init_state(B, max_len)
    if kv_bits is not None:
        from alloy.inference.generate import quantize_kv
        state = quantize_kv(model, state, kv_bits)
    mx.eval(state)
    t0 = time.perf_counter()
    state, last = prefill(model, params, state, tokens, np.full((B,), T), 0, prefill_chunk)
    mx.eval(state, last)
    t1 = time.perf_counter()
    tok, _ = sampler(rng, last, counts)
    mx.eval(tok)
    t2 = time.perf_counter()
    for _ in range(gen_len - 1):
        tok, _, state, rng, counts = step(params, tok, state, rng, counts)
        mx.async_eval(tok)
    mx.eval(tok, state)
    t3 = time.perf_counter()
    return t1 - t0, t2 - t0, t3 - t2


def run(model, params, prompt_len: int = 512, gen_len: int = 128, batch: int = 1,
        prefill_chunk: int = 512, seed: int = 0, repeats: int = 1, kv_bits: int | None = None) -> dict:
    """Measure one configuration (see module docstring); the best of ``repeats`` timed runs.
    ``kv_bits``: attention KV rings stored quantized (``alloy.inference.quantize_kv``)."""
    for name, v in (("prompt_len", prompt_len), ("gen_len", gen_len), ("batch", batch),
                    ("prefill_chunk", prefill_chunk), ("repeats", repeats)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"bench: {name} must be a positive int, got {v!r}")
    if gen_len < 2:
        raise ValueError(f"bench: gen_len must be >= 2 (one first token, then decode steps), got {gen_len}")
    V = model.config.vocab_size
    tokens = np.random.default_rng(seed).integers(0, V, (batch, prompt_len)).astype(np.int32)
    max_len = prompt_len + gen_len
    _once(model, params, tokens, min(gen_len, 4), prefill_chunk, max_len, kv_bits)  # compile with these shapes
    best = None
    for _ in range(repeats):
        mx.reset_peak_memory()
        pre, ttft, dec = _once(model, params, tokens, gen_len, prefill_chunk, max_len, kv_bits)
        peak = mx.get_peak_memory()
        if best is None or pre + dec < best[0] + best[2]:
            best = (pre, ttft, dec, peak)
    pre, ttft, dec, peak = best
    state0 = model.init_state(batch, max_len)
    if kv_bits is not None:
        from alloy.inference.generate import quantize_kv
        state0 = quantize_kv(model, state0, kv_bits)
    state_bytes = tree_bytes(state0)
    return {
        "model": model.config.name, "dtype": model.config.dtype, "device": str(mx.default_device()),
        "batch": batch, "prompt_len": prompt_len, "gen_len": gen_len, "prefill_chunk": prefill_chunk,
        "prompt_tok_s": batch * prompt_len / pre, "decode_tok_s": batch * (gen_len - 1) / dec,
        "ttft_s": ttft, "peak_memory_bytes": int(peak), "params_bytes": int(tree_bytes({k: v for k, v in params.items() if k != "decode_stack"})),
        "state_bytes": int(state_bytes),
    }


def format_result(r: dict) -> str:
    gib = 1024 ** 3
    return (f"{r['model']} ({r['dtype']}, {r['device']}) batch {r['batch']}, prompt {r['prompt_len']}, "
            f"gen {r['gen_len']}: prompt {r['prompt_tok_s']:,.0f} tok/s | decode {r['decode_tok_s']:,.1f} tok/s"
            f" | TTFT {r['ttft_s'] * 1e3:,.1f} ms | peak {r['peak_memory_bytes'] / gib:.3f} GiB"
            f" (params {r['params_bytes'] / gib:.3f} GiB, state {r['state_bytes'] / gib:.4f} GiB)")

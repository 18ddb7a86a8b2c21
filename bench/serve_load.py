"""Load test of ``alloy serve``: N concurrent streaming chat requests against an in-process server.

    python bench/serve_load.py --model CKPT [--clients 16] [--max-tokens 64] [--max-active 1 8]
    python bench/serve_load.py --config hybrid-tiny ...      # random weights, byte vocabulary

For each ``--max-active`` value a fresh engine + uvicorn server is started on a free loopback port and
``--clients`` threads each send one streaming chat request (greedy, distinct prompts sharing a
system message). Reports, per setting: wall time, completion tokens/s over the run, time to first
streamed token (mean / p95) and request latency (mean / p95). Prints the device and prefix-cache hits.
"""
from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import alloy  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(args):
    from alloy.tokenizer import load_model_and_tokenizer
    if args.model:
        return load_model_and_tokenizer(args.model)
    from alloy.inference.cli import _config_source
    model = alloy.build(_config_source(args.config))
    path = tempfile.mkdtemp() + "/model"
    alloy.save(path, model, model.init(mx.random.key(0)))
    return load_model_and_tokenizer(path)


def run(loaded, clients, max_tokens, max_active, max_len):
    import openai
    import uvicorn

    from alloy.inference.prefix_cache import PrefixCache
    from alloy.serve.app import create_app
    from alloy.serve.engine import Engine

    model, params, tok = loaded
    engine = Engine(model, params, tok, max_len=max_len, max_active=max_active, max_queue=4 * clients,
                    prefix_cache=PrefixCache(every=64))
    port = _port()
    srv = uvicorn.Server(uvicorn.Config(create_app(engine, "bench"), host="127.0.0.1", port=port,
                                       log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    while not srv.started:
        time.sleep(0.02)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=600, max_retries=0)
    system = {"role": "system", "content": "You are a terse assistant that answers in Python. " * 3}
    # warm-up: compile the prefill buckets and the decode step
    client.chat.completions.create(model="bench", messages=[system, {"role": "user", "content": "warm"}],
                                   max_tokens=4, temperature=0)

    def one(i):
        t0 = time.perf_counter()
        ttft, n = None, 0
        stream = client.chat.completions.create(
            model="bench", messages=[system, {"role": "user", "content": f"request {i}: print {i} squared"}],
            max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True},
            extra_body={"logit_bias": {str(t): -100 for t in tok.eos_token_ids}})
        for ch in stream:
            if ch.choices and ch.choices[0].delta.content and ttft is None:
                ttft = time.perf_counter() - t0
            if ch.usage:
                n = ch.usage.completion_tokens
        return ttft if ttft is not None else float("nan"), time.perf_counter() - t0, n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        res = list(ex.map(one, range(clients)))
    wall = time.perf_counter() - t0
    srv.should_exit = True
    th.join(30)
    ttfts, lats, toks = zip(*res)

    def p95(xs):
        return sorted(xs)[max(0, int(round(0.95 * len(xs))) - 1)]
    return {"max_active": max_active, "clients": clients, "wall_s": round(wall, 3),
            "completion_tokens": sum(toks), "tokens_per_s": round(sum(toks) / wall, 1),
            "ttft_mean_s": round(statistics.mean(ttfts), 3), "ttft_p95_s": round(p95(ttfts), 3),
            "latency_mean_s": round(statistics.mean(lats), 3), "latency_p95_s": round(p95(lats), 3),
            "prefix_cache_hits": engine.prefix_cache.hits}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", help="checkpoint directory")
    g.add_argument("--config", default="hybrid-tiny", help="bundled config (random weights) if no --model")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-active", type=int, nargs="+", default=[1, 8])
    p.add_argument("--max-len", type=int, default=512)
    args = p.parse_args()
    loaded = _load(args)
    print(f"device: {mx.default_device()} ({platform.machine()}, {platform.processor() or 'cpu'}), "
          f"mlx {mx.__version__}, model {loaded[0].config.name or args.model}")
    for k in args.max_active:
        print(json.dumps(run(loaded, args.clients, args.max_tokens, k, args.max_len)))


if __name__ == "__main__":
    main()

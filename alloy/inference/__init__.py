"""Inference: sampling, streaming generation, prefix reuse, speculative decoding, benchmarks.

    for ev in alloy.generate(model, params, prompt_ids, max_tokens=64, temperature=0.8, top_p=0.95):
        print(ev.text, end="")
"""
from alloy.inference.generate import ByteTokenizer, GenerationEvent, TextStream, generate, prepare_decode, quantize_kv
from alloy.inference.prefix_cache import PrefixCache
from alloy.inference.sampling import SamplingParams, make_sampler
from alloy.inference.speculative import speculative_generate

__all__ = ["ByteTokenizer", "GenerationEvent", "PrefixCache", "SamplingParams", "TextStream", "prepare_decode", "quantize_kv",
           "generate", "make_sampler", "speculative_generate"]

"""An adapter so lm-evaluation-harness (``lm_eval``) can drive Alloy models.

``AlloyLM`` implements the three request types of lm-eval's ``LM`` interface on plain Python
objects; each request only needs ``.args`` (lm-eval's ``Instance`` has it):

    loglikelihood(requests)          args = (context, continuation)  -> [(logprob sum, is_greedy)]
    loglikelihood_rolling(requests)  args = (text,)                  -> [logprob sum of the whole text]
    generate_until(requests)         args = (context, {"until": [...], "max_gen_toks": int,
                                             "temperature": float, "do_sample": bool}) -> [text]

``lm_eval`` is imported only by ``register_lm_eval()``, which registers the adapter under the name
"alloy" (``lm_eval --model alloy --model_args path=CKPT``)::

    from alloy.eval.harness import register_lm_eval
    register_lm_eval()
"""
from __future__ import annotations

from alloy.eval.scoring import continuation_logprobs, sequence_logprobs


class AlloyLM:
    """AlloyLM(model, params, tokenizer, batch_size=16, max_gen_toks=256), or ``AlloyLM.load(path)``."""

    def __init__(self, model, params, tokenizer, batch_size: int = 16, max_gen_toks: int = 256):
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.batch_size, self.max_gen_toks = int(batch_size), int(max_gen_toks)
        eos = tuple(getattr(tokenizer, "eos_token_ids", ()))
        self._bos = list(eos[:1])

    @classmethod
    def load(cls, path, **kwargs) -> "AlloyLM":
        from alloy.tokenizer import load_model_and_tokenizer
        model, params, tok = load_model_and_tokenizer(path)
        return cls(model, params, tok, **kwargs)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text)) if text else []

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = []
        for r in requests:
            context, continuation = r.args[0], r.args[1]
            ctx, cont = self._encode(context), self._encode(continuation)
            if not ctx:  # an empty context: condition on the BOS/EOS token (or the first token)
                ctx, cont = (self._bos, cont) if self._bos else (cont[:1], cont[1:])
            pairs.append((ctx, cont))
        out: list = [None] * len(pairs)
        scorable = [i for i, (a, c) in enumerate(pairs) if c]
        for i in range(len(pairs)):
            if not pairs[i][1]:
                out[i] = (0.0, True)  # nothing left to score
        res = continuation_logprobs(self.model, self.params, [pairs[i] for i in scorable], self.batch_size)
        for i, (s, greedy, _) in zip(scorable, res):
            out[i] = (s, greedy)
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        rows = []
        for r in requests:
            ids = self._bos + self._encode(r.args[0])
            rows.append(ids)
        out = []
        for ids, (lp, _) in zip(rows, sequence_logprobs(self.model, self.params, [r or [0] for r in rows],
                                                        self.batch_size)):
            out.append(float(lp.sum()))
        return out

    def generate_until(self, requests) -> list[str]:
        from alloy.inference.generate import generate
        out = []
        for r in requests:
            context, kw = r.args[0], dict(r.args[1] if len(r.args) > 1 and r.args[1] else {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kw.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kw.pop("temperature", 0.0)) if kw.pop("do_sample", False) else 0.0
            ids = self._encode(context) or self._bos
            text = "".join(ev.text or "" for ev in generate(
                self.model, self.params, ids, max_tokens=n, tokenizer=self.tokenizer, stop_strings=until,
                stop_tokens=self.tokenizer.eos_token_ids, temperature=temperature,
                seed=int(kw.pop("seed", 0))))
            out.append(text)
        return out


def register_lm_eval(name: str = "alloy"):
    """Register ``AlloyLM`` with lm-evaluation-harness under ``name``; returns the registered class."""
    try:
        from lm_eval.api.model import LM
        from lm_eval.api.registry import register_model
    except ImportError:
        raise ImportError("the lm-evaluation-harness adapter needs lm_eval: pip install lm-eval") from None

    class AlloyHarnessLM(AlloyLM, LM):
        def __init__(self, path: str, batch_size: int = 16, max_gen_toks: int = 256, **_):
            LM.__init__(self)
            from alloy.tokenizer import load_model_and_tokenizer
            model, params, tok = load_model_and_tokenizer(path)
            AlloyLM.__init__(self, model, params, tok, int(batch_size), int(max_gen_toks))

        @classmethod
        def create_from_arg_string(cls, arg_string, additional_config=None):
            args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv)
            args.update({k: v for k, v in (additional_config or {}).items() if v is not None})
            return cls(**args)

    return register_model(name)(AlloyHarnessLM)

"""``alloy eval``: perplexity / bits-per-byte, multiple-choice log-likelihood scoring, and an
lm-evaluation-harness adapter. See docs/eval.md.

    from alloy.eval import perplexity, evaluate_choices, read_choice_jsonl
    r = perplexity(model, params, tokenizer, texts, seq_len=512)       # {"ppl", "bits_per_byte", ...}
    r = evaluate_choices(model, params, tokenizer, read_choice_jsonl(path))   # {"acc", "acc_norm", ...}
"""
from alloy.eval.harness import AlloyLM, register_lm_eval
from alloy.eval.scoring import continuation_logprobs, sequence_logprobs
from alloy.eval.tasks import (ChoiceItem, evaluate_choices, parse_choice_item, perplexity, read_choice_jsonl,
                              read_text_jsonl, score_choices, stdlib_texts)

__all__ = ["AlloyLM", "ChoiceItem", "continuation_logprobs", "evaluate_choices", "parse_choice_item",
           "perplexity", "read_choice_jsonl", "read_text_jsonl", "register_lm_eval", "score_choices",
           "sequence_logprobs", "stdlib_texts"]

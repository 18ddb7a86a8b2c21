"""Tokenizers: byte-level round trips, tokenizer.json loading, chat templates."""
import json

import pytest

from alloy.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

tokenizers = pytest.importorskip("tokenizers")


def _train_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, héllo wörld! " * 20, "the quick brown fox 🦊 jumps"], trainer)
    tok.save(str(path / "tokenizer.json"))
    tmpl = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": tmpl, "eos_token": "<|im_end|>"}))


def test_byte_tokenizer_round_trip_and_template():
    tok = ByteTokenizer(eos_token_ids=(256,))
    text = "héllo 🦊"
    assert tok.decode(tok.encode(text)) == text and max(tok.encode(text)) < 256
    out = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert out.endswith("<|assistant|>\n") and "hi" in out


def test_hf_tokenizer_json_round_trip_eos_and_chat_template(tmp_path):
    _train_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    text = "hello wörld 🦊"
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token_ids == (tok._tok.token_to_id("<|im_end|>"),)
    prompt = tok.apply_chat_template([{"role": "system", "content": "be brief"},
                                      {"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_bad_messages_are_named():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="non-empty list"):
        tok.apply_chat_template([])
    with pytest.raises(ValueError, match=r"messages\[1\].content must be a string"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": 3}])


def test_template_raise_exception_surfaces(tmp_path):
    _train_tokenizer(tmp_path)
    cfg = {"chat_template": "{{ raise_exception('only user turns') }}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    from jinja2.exceptions import TemplateError
    with pytest.raises(TemplateError, match="only user turns"):
        load_tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])

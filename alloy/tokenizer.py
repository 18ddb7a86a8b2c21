"""Tokenizers: byte-level for Alloy-trained checkpoints, Hugging Face ``tokenizer.json`` otherwise,
plus chat templates rendered with a sandboxed Jinja2 environment (the ``transformers`` convention).

    tok = load_tokenizer(path)          # a checkpoint directory
    ids = tok.encode("hello")           # list[int]
    text = tok.decode(ids)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)

Every tokenizer has ``encode``, ``decode``, ``eos_token_ids`` (a tuple) and ``apply_chat_template``.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Sequence

from alloy.inference.generate import ByteTokenizer as _Bytes

# A plain template for models without one: role headers and an end marker per turn.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _render(template: str, messages, add_generation_prompt: bool, **extra) -> str:
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("chat templates need jinja2: pip install 'alloy[hf]'") from None

    def raise_exception(msg):
        raise TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
    _check_messages(messages)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            **extra)


def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("chat: messages must be a non-empty list of {'role', 'content'} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"chat: messages[{i}] must be an object with a string 'role'")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"chat: messages[{i}].content must be a string")


class ByteTokenizer(_Bytes):
    """UTF-8 bytes as ids 0..255; optional special ids past 255 (e.g. an EOS of 256)."""

    def __init__(self, eos_token_ids: Sequence[int] = (), chat_template: str | None = None):
        self.eos_token_ids = tuple(int(i) for i in eos_token_ids)
        self.chat_template = chat_template or DEFAULT_CHAT_TEMPLATE

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        return _render(self.chat_template, messages, add_generation_prompt)


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json`` with the special tokens and chat template of
    ``tokenizer_config.json`` (and ``chat_template.jinja`` / ``generation_config.json`` if present)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError("Hugging Face tokenizers need the tokenizers package: pip install 'alloy[hf]'") from None
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise FileNotFoundError(f"tokenizer: {path} has no tokenizer.json")
        self._tok = Tokenizer.from_file(str(tj))
        cfg = _read_json(path / "tokenizer_config.json")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        self.chat_template = template
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        eos = set()
        if self.eos_token is not None and self._tok.token_to_id(self.eos_token) is not None:
            eos.add(self._tok.token_to_id(self.eos_token))
        for f in ("generation_config.json", "config.json"):
            e = _read_json(path / f).get("eos_token_id")
            eos.update([e] if isinstance(e, int) else (e or []))
        self.eos_token_ids = tuple(sorted(eos))
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        return _render(self.chat_template or DEFAULT_CHAT_TEMPLATE, messages, add_generation_prompt,
                       bos_token=self.bos_token or "", eos_token=self.eos_token or "")


def _token_text(t):
    if isinstance(t, dict):  # {"content": "<eos>", ...}
        return t.get("content")
    return t


def _read_json(p: Path) -> dict:
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"tokenizer: {p} is not valid JSON: {e}") from None


def load_tokenizer(path: str | Path, vocab_size: int | None = None):
    """The tokenizer of a checkpoint directory: ``tokenizer.json`` when present, else byte-level
    (Alloy-trained models; ids 256.. are special, the first of them is EOS when the vocab has it)."""
    path = Path(path)
    if (path / "tokenizer.json").is_file():
        return HFTokenizer(path)
    if vocab_size is not None and vocab_size < 256:
        raise ValueError(f"tokenizer: {path} has no tokenizer.json and its vocab ({vocab_size}) is too small "
                         "for byte-level tokens")
    return ByteTokenizer(eos_token_ids=(256,) if vocab_size and vocab_size > 256 else ())


def load_model_and_tokenizer(path: str | Path):
    """``(model, params, tokenizer)`` for inference from a checkpoint directory.

    Accepts an Alloy or Hugging Face checkpoint (``alloy.load``) and an ``alloy train`` run directory
    (its ``latest`` checkpoint). Checkpoints written by ``alloy train`` (they hold ``trainer.msgpack``)
    are byte-level with byte 0 (NUL) as the document separator, so their tokenizer stops at id 0.
    """
    from alloy.checkpoint import load

    path = Path(path)
    if path.is_dir() and not (path / "config.json").is_file():
        from alloy.train.checkpoint import resolve_checkpoint
        path = resolve_checkpoint(path)
    model, params = load(path)
    tok = load_tokenizer(path, model.config.vocab_size)
    if isinstance(tok, ByteTokenizer) and (path / "trainer.msgpack").is_file():
        tok = ByteTokenizer(eos_token_ids=(0,))
    return model, params, tok

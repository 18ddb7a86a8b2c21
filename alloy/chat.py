"""``alloy chat``: interactive multi-turn chat with streaming output.

    alloy chat --model CKPT [--system "..."] [--max-tokens 512] [--temperature 0.7] [--max-len 4096]

Each turn renders the whole conversation with the checkpoint's chat template (``tokenizer.json`` +
``tokenizer_config.json`` for Hugging Face checkpoints; a plain ``<|role|>`` template for byte-level
ones) and generates the reply with ``alloy.generate``, streaming its text as it arrives
(``TextStream`` holds back incomplete UTF-8 sequences, so a multi-byte character is never split).

State reuse. The rendered conversation of turn n extends that of turn n-1, so the session keeps the
previous prompt's token ids and tokenizes only the new text (the previous reply, the template's
glue and the new message); a ``PrefixCache`` holds the model state snapshotted at the end of every
prompt, so generation resumes from the previous prompt's state and prefills only those new tokens
instead of re-reading the history:

    turn 1:  prefill [system, user1]                        -> snapshot S1, generate reply1
    turn 2:  resume S1, prefill [reply1, user2]             -> snapshot S2, generate reply2

If a template re-renders earlier turns differently (the rendered text no longer starts with the
previous prompt), the conversation is re-tokenized and the cache resumes from its longest matching
prefix. Commands: ``/reset`` (forget the conversation), ``/quit`` (or end of input).
"""
from __future__ import annotations

import sys
from typing import Callable, Iterator

from alloy.inference.generate import generate
from alloy.inference.prefix_cache import PrefixCache
from alloy.inference.sampling import SamplingParams
from alloy.tokenizer import DEFAULT_CHAT_TEMPLATE

HELP = "commands: /reset (new conversation), /quit (exit), /help"


class ContextFull(ValueError):
    """The conversation no longer fits the session's context length."""


class ChatSession:
    """A conversation with one model (see module docstring).

    ChatSession(model, params, tokenizer, system=None, max_tokens=512, max_len=4096,
    sampling=SamplingParams(), seed=0, stop_strings=None, prefill_chunk=512, cache_bytes=1 << 30)

    ``send(text)`` yields the reply's text pieces and records the turn; ``reset()`` starts over.
    After each turn ``last`` holds {"prompt_tokens", "new_tokens" (prefilled this turn),
    "reused_tokens" (resumed from the cache), "completion_tokens", "finish_reason"}.
    """

    def __init__(self, model, params, tokenizer, system: str | None = None, max_tokens: int = 512,
                 max_len: int = 4096, sampling: SamplingParams | None = None, seed: int = 0,
                 stop_strings=None, prefill_chunk: int = 512, cache_bytes: int = 1 << 30):
        for name, v in (("max_tokens", max_tokens), ("max_len", max_len)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ChatSession.{name} must be a positive int, got {v!r}")
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.system, self.max_tokens, self.max_len = system, max_tokens, max_len
        self.sampling = sampling or SamplingParams()
        self.seed, self.prefill_chunk = seed, prefill_chunk
        if stop_strings is None:  # the plain template ends every turn with "\n<|end|>"
            template = getattr(tokenizer, "chat_template", None)
            stop_strings = ("\n<|end|>", "<|end|>") if template in (None, DEFAULT_CHAT_TEMPLATE) else ()
        self.stop_strings = tuple(stop_strings)
        self.cache = PrefixCache(max_bytes=cache_bytes)
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (cached states of earlier prompts are dropped too)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self._text, self._ids = "", []  # the previous prompt: rendered text and its token ids
        self.turns = 0
        self.last: dict = {}
        self.cache.clear()

    def prompt_ids(self, messages) -> tuple[list[int], str]:
        """(token ids, text) of ``messages`` rendered with a generation prompt, reusing the previous
        prompt's ids when the rendering extends it."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if self._text and text.startswith(self._text):
            return self._ids + list(self.tokenizer.encode(text[len(self._text):])), text
        return list(self.tokenizer.encode(text)), text

    def send(self, content: str) -> Iterator[str]:
        """Stream the reply to the user message ``content`` (text pieces, valid UTF-8 each)."""
        messages = self.messages + [{"role": "user", "content": content}]
        ids, text = self.prompt_ids(messages)
        room = self.max_len - len(ids)
        if room < 1:
            raise ContextFull(f"the conversation has {len(ids)} tokens and the context is {self.max_len}; "
                              f"/reset to start over")
        reused0, pieces, ev = self.cache.reused_tokens, [], None
        for ev in generate(self.model, self.params, ids, max_tokens=min(self.max_tokens, room),
                           sampling=self.sampling, stop_tokens=self.tokenizer.eos_token_ids,
                           stop_strings=self.stop_strings, tokenizer=self.tokenizer,
                           seed=self.seed + self.turns, prefill_chunk=self.prefill_chunk, max_len=self.max_len,
                           prefix_cache=self.cache):
            if ev.text:
                pieces.append(ev.text)
                yield ev.text
        reused = self.cache.reused_tokens - reused0
        self.messages = messages + [{"role": "assistant", "content": "".join(pieces)}]
        self._text, self._ids = text, ids
        self.turns += 1
        self.last = {"prompt_tokens": len(ids), "reused_tokens": reused, "new_tokens": len(ids) - reused,
                     "completion_tokens": 0 if ev is None else ev.index + 1,
                     "finish_reason": None if ev is None else ev.finish_reason}


def read_line(prompt: str) -> str:
    """Write ``prompt`` to stdout and read one line of stdin (EOFError at the end). Unlike
    ``input``, the prompt goes to stdout even on a terminal, next to the streamed replies."""
    sys.stdout.write(prompt)
    sys.stdout.flush()
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\r\n")


def repl(session: ChatSession, read: Callable[[str], str] = read_line, write: Callable[[str], object] = None,
         stats: Callable[[str], object] | None = None, prompt: str = ">>> ") -> int:
    """The interactive loop: read a line, stream the reply through ``write``. Returns the number
    of turns. ``read`` raises EOFError at the end of input (like ``input``); ``stats`` (optional)
    receives a one-line summary after every reply."""
    if write is None:
        def write(s):
            sys.stdout.write(s)
            sys.stdout.flush()
    turns = 0
    while True:
        try:
            line = read(prompt)
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return turns
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/quit", "/exit"):
            return turns
        if cmd == "/reset":
            session.reset()
            write("[conversation reset]\n")
            continue
        if cmd == "/help":
            write(HELP + "\n")
            continue
        if cmd.startswith("/"):
            write(f"unknown command {cmd.split()[0]}; {HELP}\n")
            continue
        try:
            for piece in session.send(line):
                write(piece)
        except ContextFull as e:
            write(f"[{e}]\n")
            continue
        except KeyboardInterrupt:  # stop this reply, keep the session
            write("\n[interrupted]\n")
            continue
        write("\n")
        turns += 1
        if stats is not None:
            s = session.last
            stats(f"[{s['completion_tokens']} tokens, {s['finish_reason']}; prompt {s['prompt_tokens']} tokens, "
                  f"{s['reused_tokens']} reused, {s['new_tokens']} prefilled]\n")


def _chat(args):
    from alloy.tokenizer import load_model_and_tokenizer

    model, params, tok = load_model_and_tokenizer(args.model)
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              min_p=args.min_p, repetition_penalty=args.repetition_penalty)
    session = ChatSession(model, params, tok, system=args.system, max_tokens=args.max_tokens,
                          max_len=args.max_len, sampling=sampling, seed=args.seed,
                          stop_strings=tuple(args.stop) if args.stop else None)
    if hasattr(sys.stdin, "reconfigure"):  # a stray invalid byte typed must not end the session
        sys.stdin.reconfigure(errors="replace")
    if sys.stdin.isatty():
        print(f"alloy chat: {args.model} ({HELP})", file=sys.stderr)

    def stats(s):
        sys.stderr.write(s)
        sys.stderr.flush()

    repl(session, stats=stats if args.verbose else None)


def register(sub) -> None:
    p = sub.add_parser("chat", help="interactive multi-turn chat with streaming replies")
    p.add_argument("--model", required=True, help="checkpoint directory (Alloy, Hugging Face or an alloy "
                                                 "train run directory)")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--max-tokens", type=int, default=512, help="longest reply")
    p.add_argument("--max-len", type=int, default=4096, help="context length of the whole conversation")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="print token counts and state reuse after each reply")
    p.set_defaults(fn=_chat)

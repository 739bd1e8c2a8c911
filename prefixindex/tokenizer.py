"""Tokenizers: the model's view of a prompt, shared by the gateway and the simulated engine.

A real deployment loads the same `tokenizer.json` in the engine and in the gateway, so both see the
same token ids. kvgate does the same: `HFTokenizer` loads a HuggingFace tokenizer directory (chat
template from `tokenizer_config.json`, rendered as vLLM renders it), and `WordTokenizer` is the fast
deterministic default that needs no files, used by the simulator and the gateway alike so that the
embedded demo aligns. Block hashing, the index and KV-event decoding are *not* shared with the
simulator: only the tokenizer, which is the model's property, is.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import orjson
import xxhash

Message = Mapping[str, Any]

# A word, a run of punctuation, or a single other symbol; whitespace separates and is dropped.
_WORD_RE = re.compile(r"\w+|[^\w\s]+")
_CACHE_LIMIT = 1 << 20


class Tokenizer(Protocol):
    """What the gateway and the simulator need of a tokenizer."""

    name: str
    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` as for a completion prompt (BOS if the model has one)."""
        ...

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The prompt text a chat request becomes, as the engine's chat template renders it."""
        ...

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a chat request (vLLM tokenizes rendered chats without adding special tokens)."""
        ...


def message_text(content: Any) -> str:
    """The text of an OpenAI message `content`: a string, or its text parts joined by newlines (as vLLM)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type", "text") == "text"
        )
    raise TypeError("message content must be a string or a list of content parts")


class WordTokenizer:
    """Deterministic tokenizer that needs no files: one token per word or punctuation run.

    id = xxh32(word) mod (vocab_size - 4) + 4; ids 0..3 are reserved (`<unk> <s> </s> <pad>`) and
    no BOS is added, so a prompt and its extension share their leading tokens exactly. The chat template
    is `<|role|>\\ncontent\\n` per message, then `<|assistant|>\\n` when a reply is asked for.
    """

    name = "word"

    def __init__(self, vocab_size: int = 32000) -> None:
        if vocab_size <= 4:
            raise ValueError("vocab_size must exceed the 4 reserved ids")
        self.vocab_size = vocab_size
        self._span = vocab_size - 4
        self._ids: dict[str, int] = {}

    def _id(self, word: str) -> int:
        tid = xxhash.xxh32_intdigest(word.encode()) % self._span + 4
        if len(self._ids) >= _CACHE_LIMIT:
            self._ids.clear()
        self._ids[word] = tid
        return tid

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._ids
        get = ids.get
        out = []
        append = out.append
        for word in _WORD_RE.findall(text):
            tid = get(word)
            append(tid if tid is not None else self._id(word))
        return out

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        parts = [f"<|{m.get('role', 'user')}|>\n{message_text(m.get('content'))}\n" for m in messages]
        if add_generation_prompt:
            parts.append("<|assistant|>\n")
        return "".join(parts)

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)


class HFTokenizer:
    """A HuggingFace tokenizer directory (or `tokenizer.json`) with its chat template, as vLLM uses it."""

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer as _HF

        directory = path if os.path.isdir(path) else os.path.dirname(path)
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        self.name = directory
        self._tok = _HF.from_file(file)
        self.vocab_size = self._tok.get_vocab_size()
        config: dict[str, Any] = {}
        config_path = os.path.join(directory, "tokenizer_config.json")
        if os.path.exists(config_path):
            with open(config_path, "rb") as f:
                config = orjson.loads(f.read())
        self._special = {
            k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self._template = _compile_template(template) if template else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids))

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ValueError("this tokenizer has no chat template")
        msgs = [{**m, "content": message_text(m.get("content"))} for m in messages]
        return self._template.render(
            messages=msgs, add_generation_prompt=add_generation_prompt, **self._special
        )

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _compile_template(source: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def load_tokenizer(path: str | None = None, vocab_size: int = 32000) -> Tokenizer:
    """The HuggingFace tokenizer at `path`, or the default `WordTokenizer` when `path` is empty."""
    if path:
        return HFTokenizer(path)
    return WordTokenizer(vocab_size)

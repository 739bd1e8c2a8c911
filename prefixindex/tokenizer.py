"""Tokenizers: the model's view of a prompt, shared by the gateway and the simulated engine.

A real deployment loads the same `tokenizer.json` in the engine and in the gateway, so both see the
same token ids. kvgate does the same: `HFTokenizer` loads a HuggingFace tokenizer directory or a repo
id from the local HF cache (prefixindex/hf_cache.py), with its chat template rendered as vLLM renders
it (prefixindex/chat_template.py), and `WordTokenizer` is the fast
deterministic default that needs no files, used by the simulator and the gateway alike so that the
embedded demo aligns. Block hashing, the index and KV-event decoding are *not* shared with the
simulator: only the tokenizer, which is the model's property, is.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import orjson
import xxhash

from prefixindex.chat_template import ChatRenderError, ChatTemplate, find_chat_template, special_tokens
from prefixindex.hf_cache import resolve_tokenizer
from prefixindex.token_reuse import safe_cut_tokens

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

    def encode_chat_request(self, body: Mapping[str, Any]) -> list[int]:
        """Token ids of a chat-completions request body (messages, tools, template kwargs...)."""
        ...

    def render_chat_request(self, body: Mapping[str, Any]) -> tuple[str, bool]:
        """The text a chat-completions body becomes and whether it is tokenized with special tokens:
        `encode_chat_request(body) == encode(*render_chat_request(body))`."""
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
    tokens_never_span_whitespace = True  # a text cut at a space encodes as its pieces do, joined

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
        # Without punctuation the words are exactly the whitespace-separated runs: `\s` and str.split
        # agree on whitespace, `\w` is str.isalnum() or "_". Checking that costs less than the regex.
        words = text.split()
        if words and not "".join(words).replace("_", "a").isalnum():
            words = _WORD_RE.findall(text)
        out = list(map(self._ids.get, words))
        if None in out:
            out = [tid if tid is not None else self._id(w) for tid, w in zip(out, words, strict=True)]
        return out  # type: ignore[return-value]

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        parts = [f"<|{m.get('role', 'user')}|>\n{message_text(m.get('content'))}\n" for m in messages]
        if add_generation_prompt:
            parts.append("<|assistant|>\n")
        return "".join(parts)

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)

    def encode_chat_request(self, body: Mapping[str, Any]) -> list[int]:
        return self.encode(*self.render_chat_request(body))

    def render_chat_request(self, body: Mapping[str, Any]) -> tuple[str, bool]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
            raise ValueError("'messages' must be a list of objects")
        return self.render_chat(messages, body.get("add_generation_prompt", True) is not False), False


class HFTokenizer:
    """A HuggingFace tokenizer directory (or its `tokenizer.json`) with its chat template, as vLLM uses it.

    The template is found and compiled once (prefixindex/chat_template.py renders requests as vLLM
    does); `encode_chat_request` renders a chat-completions body and tokenizes it without special
    tokens unless the body asks for them (`add_special_tokens`, vLLM's default false for chat).
    """

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
        source = find_chat_template(directory, config)
        self.chat_template = ChatTemplate(source, special_tokens(directory, config)) if source else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        """Token ids of each text, as `encode` gives them. The encoding runs without the GIL (the
        tokenizers library's batch encode, without offsets), so a thread calling this leaves the
        event loop free; only turning the ids into Python lists holds it."""
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]

    def cut_tokens(self) -> list[str]:
        """The special tokens a text may be cut just before, its pieces tokenized apart giving the
        whole text's tokens (prefixindex/token_reuse.py); none with truncation or padding set."""
        tok = self._tok
        if tok.truncation is not None or tok.padding is not None:
            return []
        return safe_cut_tokens(tok.get_added_tokens_decoder().values())

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids))

    def _template(self) -> ChatTemplate:
        if self.chat_template is None:
            raise ChatRenderError(f"the tokenizer {self.name} has no chat template")
        return self.chat_template

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        body = {"messages": list(messages), "add_generation_prompt": add_generation_prompt}
        return self._template().render_request(body)

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)

    def encode_chat_request(self, body: Mapping[str, Any]) -> list[int]:
        return self.encode(*self.render_chat_request(body))

    def render_chat_request(self, body: Mapping[str, Any]) -> tuple[str, bool]:
        return self._template().render_request(body), body.get("add_special_tokens", False) is True


def load_tokenizer(path: str | None = None, vocab_size: int = 32000) -> Tokenizer:
    """The tokenizer `path` names, or the default `WordTokenizer` when it is empty.

    `path` is a local tokenizer directory (or `tokenizer.json`), or a HuggingFace repo id (`org/name`,
    optionally `@revision`) already in the local HF cache (resolved offline: `resolve_tokenizer`).
    A tokenizer is loaded once per resolved path and shared (it holds no per-request state).
    """
    if path:
        return _load_hf(resolve_tokenizer(path))
    return WordTokenizer(vocab_size)


@functools.lru_cache(maxsize=16)
def _load_hf(path: str) -> HFTokenizer:
    return HFTokenizer(path)

"""What a workload is: sessions of requests, each request a ready-to-send OpenAI body.

A *session* is a unit of arrival: one request for the shared-prefix and trace workloads, one
conversation (its turns in order, a think time between them) for multi-turn. Open-loop arrivals start
sessions at scheduled times; closed-loop users each run one session after another.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from prefixindex.tokenizer import Tokenizer

Api = Literal["completions", "chat"]
PromptFormat = Literal["text", "tokens"]

API_PATHS: dict[str, str] = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass(slots=True, frozen=True)
class BenchRequest:
    """One request: a completion `prompt` (text or token ids) or chat `messages`, and its output length.

    `tag` names it in results (e.g. `g12/p3`, `c4/t2`, `trace/917`).
    """

    tag: str
    api: Api
    max_tokens: int
    prompt: str | tuple[int, ...] | None = None
    messages: tuple[Mapping[str, str], ...] | None = None

    @property
    def path(self) -> str:
        return API_PATHS[self.api]

    def body(self, model: str) -> dict[str, Any]:
        """The streaming OpenAI request body; `ignore_eos` makes the engine produce exactly max_tokens."""
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.api == "chat":
            body["messages"] = list(self.messages or ())
        else:
            body["prompt"] = list(self.prompt) if isinstance(self.prompt, tuple) else self.prompt
        return body

    def token_ids(self, tokenizer: Tokenizer) -> list[int]:
        """The prompt's token ids as the engine sees them (chat rendered through the chat template)."""
        if self.api == "chat":
            return tokenizer.encode_chat(list(self.messages or ()))
        if isinstance(self.prompt, tuple):
            return list(self.prompt)
        return tokenizer.encode(self.prompt or "")


@dataclass(slots=True, frozen=True)
class Session:
    """Requests run in order by one user; `think_times[i]` is the pause after request i (seconds).

    `at` is the session's own start offset in seconds (trace replay); None lets the arrival process
    decide.
    """

    requests: tuple[BenchRequest, ...]
    think_times: tuple[float, ...] = ()
    at: float | None = None

    def think_after(self, index: int) -> float:
        return self.think_times[index] if index < len(self.think_times) else 0.0


@dataclass(slots=True)
class Workload:
    """A named, deterministic list of sessions and the parameters that made it."""

    name: str
    sessions: list[Session]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def num_requests(self) -> int:
        return sum(len(s.requests) for s in self.sessions)

    def requests(self) -> Iterator[BenchRequest]:
        for session in self.sessions:
            yield from session.requests

    def head(self, n: int) -> Workload:
        """The first `n` sessions (all of them when n >= len)."""
        return Workload(self.name, self.sessions[:n], {**self.params, "sessions": min(n, len(self.sessions))})


def as_prompt(text: str, prompt_format: PromptFormat, tokenizer: Tokenizer) -> str | tuple[int, ...]:
    """`text` itself, or its token ids when the workload sends token-id prompts."""
    if prompt_format == "tokens":
        return tuple(tokenizer.encode(text))
    return text


def check_positive(**values: float) -> None:
    """Raise ValueError naming the first parameter that is not > 0."""
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def join_words(parts: Sequence[str]) -> str:
    return " ".join(p for p in parts if p)

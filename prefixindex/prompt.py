"""What a request asks the engine to prefill: its prompt tokens and the key root they chain from.

Completions: `prompt` as text (tokenized with special tokens, as vLLM does), as token ids (used as
they are), or a batch of either (the first prompt routes the request). A batch of batches is not a
prompt vLLM accepts: extraction follows the first prompt without recursion and refuses one at once,
however deep (`check_prompt_nesting` checks just that, in a few steps). Chat: the request (`messages`,
`tools`, `chat_template_kwargs`, `add_generation_prompt`/`continue_final_message`, ...) rendered with the
model's chat template as vLLM renders it and tokenized without special tokens unless the request sets
`add_special_tokens`, as vLLM does. `cache_salt` and the
LoRA adapter (the request's `model` when it names an adapter rather than the pool's base model) go
into the root so that tenants and adapters never share keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prefixindex.hashing import root_key
from prefixindex.tokenizer import Tokenizer

# A batch of prompts (texts or token-id lists) is one level; a batch of batches is not a prompt.
MAX_BATCH_DEPTH = 1


class PromptError(ValueError):
    """The request carries no prompt the index can name (missing or malformed prompt/messages).

    `reason` says why, for the metric of requests routed without keys: "prompt" (no usable prompt) or
    "chat_template" (a chat the gateway cannot render as the pod would: see prefixindex/chat_template.py).
    """

    def __init__(self, message: str, reason: str = "prompt") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Prompt:
    """The tokens a request prefills and the root of their block-key chain."""

    tokens: list[int]
    root: int
    lora: str | None = None
    cache_salt: str | None = None


@dataclass(frozen=True, slots=True)
class PromptText:
    """A prompt still to tokenize: its text (a chat already rendered) and whether special tokens are
    added. `Tokenizer.encode(text, add_special_tokens)` gives its tokens, inline or in a worker."""

    text: str
    add_special_tokens: bool
    failure_reason: str = "prompt"  # PromptError.reason when encoding it fails (chats: chat_template)


def prompt_input(body: Mapping[str, Any], path: str, tokenizer: Tokenizer) -> PromptText | list[int]:
    """What a request body asks to prefill: a text to tokenize (a chat rendered with the model's
    template) or the token ids it gave. Raises PromptError when there is none."""
    if "messages" in body or path.endswith("/chat/completions"):
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise PromptError("'messages' must be a non-empty list")
        if not all(isinstance(m, Mapping) for m in messages):
            raise PromptError("each message must be an object")
        try:
            text, add_special = tokenizer.render_chat_request(body)
        except (TypeError, ValueError) as exc:
            raise PromptError(f"cannot render messages: {exc}", reason="chat_template") from exc
        return PromptText(text, add_special, "chat_template")
    prompt = _first_prompt(body.get("prompt"))
    if isinstance(prompt, str):
        return PromptText(prompt, True)
    if isinstance(prompt, list) and prompt and _is_token_id(prompt[0]):
        if all(_is_token_id(t) and t >= 0 for t in prompt):
            return prompt
        raise PromptError("token-id prompts must be non-negative integers")
    raise PromptError("'prompt' must be a string, a list of token ids, or a batch of them")


def prompt_tokens(body: Mapping[str, Any], path: str, tokenizer: Tokenizer) -> list[int]:
    """The prompt token ids of an OpenAI request body, tokenized here. Raises PromptError when there
    is none (a chat the tokenizer cannot render or encode included)."""
    source = prompt_input(body, path, tokenizer)
    if isinstance(source, list):
        return source
    try:
        return tokenizer.encode(source.text, add_special_tokens=source.add_special_tokens)
    except (TypeError, ValueError) as exc:
        raise PromptError(f"cannot tokenize the prompt: {exc}", source.failure_reason) from exc


def check_prompt_nesting(prompt: Any) -> None:
    """PromptError when `prompt` is a batch of batches (`[["a"]]`, `[[[1]]]`, ...); anything else
    about it is left to `prompt_tokens` or the pod."""
    _first_prompt(prompt)


def _first_prompt(prompt: Any) -> Any:
    """The first prompt of a batch, or `prompt` itself when it is not one; followed without recursion
    and refused past MAX_BATCH_DEPTH, so a deeply nested list costs a few steps, not a RecursionError."""
    batches = 0
    while isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        batches += 1
        if batches > MAX_BATCH_DEPTH:
            raise PromptError("'prompt' is nested too deeply: a batch holds texts or token-id lists")
        prompt = prompt[0]
    return prompt


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def extract_prompt(
    body: Mapping[str, Any], path: str, tokenizer: Tokenizer, base_model: str
) -> Prompt:
    """Tokens and key root of a request to a pool serving `base_model`. Raises PromptError."""
    lora, salt = prompt_scope(body, base_model)
    tokens = prompt_tokens(body, path, tokenizer)
    return Prompt(tokens, root_key(base_model, lora, salt), lora, salt)


def prompt_scope(body: Mapping[str, Any], base_model: str) -> tuple[str | None, str | None]:
    """The LoRA adapter and `cache_salt` a request's keys are rooted at. Raises PromptError."""
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise PromptError("'cache_salt' must be a non-empty string")
    model = body.get("model")
    lora = model if isinstance(model, str) and model and model != base_model else None
    return lora, salt

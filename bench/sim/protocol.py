"""Request validation and response bodies in vLLM 0.32's OpenAI-server shapes.

Shapes and messages follow real vLLM 0.32 (tests/fixtures/vllm/http; vLLM source:
vllm/entrypoints/openai/{completion,chat_completion}/protocol.py, vllm/renderers/params.py):
- full responses carry every field (None as null); stream chunks the fields vLLM sets explicitly;
  the usage chunk drops nulls; the last chunk carries `system_fingerprint` unless a usage chunk follows;
- errors are `{"error": {"message", "type", "param", "code"}}`: vLLM's own validation errors end in
  ` (parameter=P, value=V)` and have type BadRequestError; schema errors are pydantic's
  (`N validation error(s):\\n  {...}`, type "Bad Request", param "body.<field>").
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from bench.sim.config import LoraAdapter
from prefixindex.tokenizer import Tokenizer, message_text

VLLM_VERSION = "0.32.0"
_UNSET = object()


class APIError(Exception):
    """An error answered as vLLM's ErrorResponse."""

    def __init__(
        self, message: str, status: int = 400, err_type: str = "BadRequestError", param: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.err_type = err_type
        self.param = param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.err_type, "param": self.param,
                          "code": self.status}}


def invalid(message: str, param: str, value: Any = _UNSET) -> APIError:
    """vLLM's VLLMValidationError: the message names the parameter (and the value, when given)."""
    suffix = f"parameter={param}" if value is _UNSET else f"parameter={param}, value={value}"
    return APIError(f"{message} ({suffix})", param=param)


def _input_repr(value: Any) -> Any:
    if isinstance(value, dict):
        return f"<dict of {len(value)} items>"
    if isinstance(value, list):
        return f"<list of {len(value)} items>"
    return "None" if value is None else value


def schema_error(kind: str, loc: str, msg: str, value: Any, **ctx: Any) -> APIError:
    """A pydantic validation error as vLLM's FastAPI handler reports it."""
    detail: dict[str, Any] = {"type": kind, "loc": loc, "msg": msg, "input": _input_repr(value)}
    if ctx:
        detail["ctx"] = ctx
    return APIError(f"1 validation error:\n  {detail!r}", err_type="Bad Request", param=loc)


def schema_errors(errors: list[tuple[str, str, str, Any]]) -> APIError:
    """Several pydantic errors (kind, loc, msg, input) in one response; param is the first loc."""
    lines = "".join(
        f"\n  {({'type': k, 'loc': loc, 'msg': m, 'input': _input_repr(v)})!r}" for k, loc, m, v in errors
    )
    return APIError(f"{len(errors)} validation errors:{lines}", err_type="Bad Request", param=errors[0][1])


def model_not_found(name: str, served: str) -> APIError:
    return APIError(f"The model `{name}` does not exist. Valid aliases: {served}.", 404, "NotFoundError",
                    "model")


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The request's JSON object, or the schema error vLLM answers for an empty, bad or non-object body."""
    if not raw.strip():
        raise schema_error("missing", "body", "Field required", None)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        # Only on the error path: the stdlib parser words the error as vLLM (pydantic) reports it.
        try:
            json.loads(raw)
            pos, err = 0, "Invalid JSON"
        except json.JSONDecodeError as exc:
            pos, err = exc.pos, exc.msg
        except UnicodeDecodeError as exc:
            pos, err = exc.start, str(exc)
        except ValueError as exc:  # e.g. an integer literal too long to convert
            pos, err = 0, str(exc)
        raise schema_error("json_invalid", f"body.{pos}", "JSON decode error", {}, error=err) from None
    if not isinstance(body, dict):
        raise schema_error("model_attributes_type", "body",
                           "Input should be a valid dictionary or object to extract fields from", body)
    return body


def check_model(body: Mapping[str, Any], served: str, adapters: Collection[str] = ()) -> str | None:
    """The LoRA adapter the body's `model` names, None for the base model (or none named); an
    unknown model is a 404."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise schema_error("string_type", "body.model", "Input should be a valid string", model)
    if model and model in adapters:
        return model
    if model and model != served:  # vLLM accepts a missing model
        raise model_not_found(model, served)
    return None


# -- lax coercion, as pydantic does for these fields -----------------------------------------------
_TRUE = {"1", "on", "t", "true", "y", "yes"}
_FALSE = {"0", "off", "f", "false", "n", "no"}


def lax_bool(body: Mapping[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise schema_error("bool_parsing", f"body.{key}", "Input should be a valid boolean, unable to interpret "
                       "input", value)


def _int(body: Mapping[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
        raise schema_error("int_parsing", f"body.{key}",
                           "Input should be a valid integer, unable to parse string as an integer", value)
    raise schema_error("int_type", f"body.{key}", "Input should be a valid integer", value)


def _float(body: Mapping[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise schema_error("float_type", f"body.{key}", "Input should be a valid number", value)


@dataclass(slots=True)
class GenRequest:
    """A validated generation request: one token list per prompt, and the options the sim honours."""

    prompts: list[list[int]]
    max_tokens: list[int]  # per prompt, already clamped to the context left
    stream: bool
    include_usage: bool
    continuous_usage: bool
    cache_salt: str | None
    kv_transfer_params: dict[str, Any] | None
    chat: bool


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _prompts(body: Mapping[str, Any], tokenizer: Tokenizer) -> tuple[list[list[int]], bool]:
    """Token lists of a completion `prompt`; the flag tells whether they came from text."""
    prompt = body.get("prompt")
    if prompt is None or prompt == "" or prompt == []:
        raise invalid("Either prompt or prompt_embeds must be provided and non-empty.", "prompt")
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)], True
    if isinstance(prompt, list):
        if all(_is_int(t) for t in prompt):
            return [list(prompt)], False
        if all(isinstance(p, str) for p in prompt):
            return [tokenizer.encode(p) for p in prompt], True
        if all(isinstance(p, list) and all(_is_int(t) for t in p) for p in prompt):
            return [list(p) for p in prompt], False
    # pydantic tries each member of vLLM's prompt union: list[int], list[list[int]], str, list[str]
    kinds = [("list_type", "Input should be a valid list")] * 2 + [
        ("string_type", "Input should be a valid string"), ("list_type", "Input should be a valid list")]
    if isinstance(prompt, list):
        raise schema_error("list_type", "body.prompt", "Input should be a valid list", prompt)
    raise schema_errors([(k, "body.prompt", m, prompt) for k, m in kinds])


def chat_tokens(body: Mapping[str, Any], tokenizer: Tokenizer) -> list[int]:
    """Token ids of a chat body's `messages` through the chat template (validated as vLLM does)."""
    messages = body.get("messages")
    if messages is None:
        raise schema_error("missing", "body.messages", "Field required", dict(body))
    if not isinstance(messages, list):
        raise schema_error("list_type", "body.messages", "Input should be a valid list", messages)
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise schema_error("model_type", f"body.messages.{i}", "Input should be a valid dictionary", m)
        if not isinstance(m.get("role"), str):
            raise schema_error("missing", f"body.messages.{i}.role", "Field required", m)
        try:
            message_text(m.get("content"))
        except TypeError:
            raise schema_error("string_type", f"body.messages.{i}.content", "Input should be a valid string",
                               m.get("content")) from None
    add_generation_prompt = lax_bool(body, "add_generation_prompt", True)
    try:
        return tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    except ValueError as exc:
        raise APIError(str(exc)) from None


def parse_generation(
    body: Mapping[str, Any], *, chat: bool, tokenizer: Tokenizer, max_model_len: int
) -> GenRequest:
    """Validate a /v1/completions or /v1/chat/completions body as vLLM 0.32 does (the sim's subset)."""
    stream = lax_bool(body, "stream", False)
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise schema_error("model_type", "body.stream_options", "Input should be a valid dictionary",
                               stream_options)
        if not stream:
            raise invalid("Stream options can only be defined when `stream=True`.", "stream_options")
    n = _int(body, "n")
    if n is not None and n != 1:
        raise invalid("the simulator serves n=1 only", "n", n)
    temperature = _float(body, "temperature")
    if temperature is not None and temperature < 0:
        raise invalid(f"temperature must be non-negative, got {temperature}.", "temperature", temperature)
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or salt == ""):
        raise invalid("Parameter 'cache_salt' must be a non-empty string if provided.", "cache_salt")
    params = body.get("kv_transfer_params")
    if params is not None and not isinstance(params, dict):
        raise schema_error("dict_type", "body.kv_transfer_params", "Input should be a valid dictionary",
                           params)

    param_name = "max_tokens"
    if chat:
        requested = _int(body, "max_completion_tokens")
        if requested is not None:
            param_name = "max_completion_tokens"
        else:
            requested = _int(body, "max_tokens")
    else:
        requested = _int(body, "max_tokens") if body.get("max_tokens") is not None else 16  # vLLM default
    if requested is not None:
        if requested < 1:
            raise invalid(f"max_tokens must be at least 1, got {requested}.", "max_tokens", requested)
        if requested > max_model_len:
            raise invalid(f"{param_name}={requested} cannot be greater than max_model_len={max_model_len}. "
                          "Please request fewer output tokens.", param_name, requested)

    if chat:
        prompts, from_text = [chat_tokens(body, tokenizer)], True
    else:
        prompts, from_text = _prompts(body, tokenizer)
    max_tokens = []
    vocab_size = tokenizer.vocab_size
    for ids in prompts:
        if not ids:
            raise invalid("Either prompt or prompt_embeds must be provided and non-empty.", "prompt")
        if not from_text:
            bad = next((t for t in ids if t < 0 or t >= vocab_size), None)
            if bad is not None:
                raise APIError(f"Token id {bad} is out of vocabulary")
        if len(ids) > max_model_len:
            # Text is tokenized with truncation at max_model_len + 1, so vLLM only knows "at least".
            count = max_model_len + 1 if from_text else len(ids)
            qualifier = "at least " if from_text else ""
            raise invalid(
                f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
                f"contains {qualifier}{count} input tokens, which exceeds this limit even without any "
                "output tokens. Please reduce the length of the input prompt.", "input_tokens", count,
            )
        left = max_model_len - len(ids)
        limit = left if requested is None else min(requested, left)
        if limit < 1:
            raise invalid(f"max_tokens must be at least 1, got {limit}.", "max_tokens", limit)
        max_tokens.append(limit)
    opts = stream_options or {}
    return GenRequest(
        prompts=prompts,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=bool(opts.get("include_usage")),
        continuous_usage=bool(opts.get("continuous_usage_stats")),
        cache_salt=salt,
        kv_transfer_params=params,
        chat=chat,
    )


# -- responses -----------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int,
          created_cache_tokens: int | None = None) -> dict[str, Any]:
    """UsageInfo as vLLM dumps it with --enable-prompt-tokens-details."""
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens,
                                  "created_cache_tokens": created_cache_tokens, "multimodal_tokens": None},
        "completion_tokens_details": None,
    }


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value


def completion_response(
    rid: str, model: str, created: int, fingerprint: str, texts: list[str], finish: list[str | None],
    use: dict[str, Any], kv_transfer_params: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": [
            {"index": i, "text": text, "logprobs": None, "finish_reason": finish[i], "stop_reason": None,
             "token_ids": None, "prompt_logprobs": None, "prompt_token_ids": None, "routed_experts": None}
            for i, text in enumerate(texts)
        ],
        "service_tier": None, "system_fingerprint": fingerprint, "usage": use,
        "kv_transfer_params": kv_transfer_params, "ec_transfer_params": None, "metrics": None,
    }


def chat_response(
    rid: str, model: str, created: int, fingerprint: str, text: str, finish: str | None,
    use: dict[str, Any], kv_transfer_params: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None, "annotations": None,
                        "audio": None, "function_call": None, "reasoning": None},
            "logprobs": None, "finish_reason": finish, "stop_reason": None, "token_ids": None,
            "routed_experts": None,
        }],
        "service_tier": None, "system_fingerprint": fingerprint, "usage": use,
        "prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None,
        "kv_transfer_params": kv_transfer_params, "ec_transfer_params": None, "metrics": None,
    }


def completion_chunk(rid: str, model: str, created: int, index: int, text: str,
                     finish: str | None) -> dict[str, Any]:
    return {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish,
                     "stop_reason": None, "prompt_token_ids": None, "token_ids": None}],
    }


def chat_role_chunk(rid: str, model: str, created: int) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}],
        "prompt_token_ids": None, "prompt_text": None,
    }


def chat_chunk(rid: str, model: str, created: int, text: str, finish: str | None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "delta": {"content": text}, "logprobs": None,
                              "finish_reason": finish}
    if finish is not None:
        choice["stop_reason"] = None
    choice["token_ids"] = None
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [choice]}


def usage_chunk(rid: str, model: str, created: int, fingerprint: str, chat: bool,
                use: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created, "model": model, "choices": [], "usage": _drop_none(use),
        "system_fingerprint": fingerprint,
    }


def models_response(
    model: str, max_model_len: int, root: str, adapters: Iterable[LoraAdapter] = ()
) -> dict[str, Any]:
    """vLLM's model list: the base model, then each LoRA module (root: its path, parent: the base
    model, no max_model_len)."""
    now = int(time.time())
    cards = [_model_card(model, root, None, max_model_len, now)]
    cards += [_model_card(a.name, a.path, model, None, now) for a in adapters]
    return {"object": "list", "data": cards}


def _model_card(
    name: str, root: str, parent: str | None, max_model_len: int | None, now: int
) -> dict[str, Any]:
    return {
        "id": name, "object": "model", "created": now, "owned_by": "vllm", "root": root,
        "parent": parent, "max_model_len": max_model_len,
        "permission": [{
            "id": f"modelperm-{uuid.uuid4().hex[:16]}", "object": "model_permission",
            "created": now, "allow_create_engine": False, "allow_sampling": True,
            "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
            "allow_fine_tuning": False, "organization": "*", "group": None, "is_blocking": False,
        }],
    }

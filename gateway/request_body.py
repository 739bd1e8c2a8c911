"""Reading and checking a client's JSON body: size limit, JSON syntax, the types of the fields the
gateway itself relies on. Everything else is left for the pod to validate, as vLLM would."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from gateway import errors

_NUMBER = (int, float)
# field -> accepted types; None is accepted for every field (OpenAI clients send explicit nulls).
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "stream": (bool,),
    "stream_options": (dict,),
    "max_tokens": (int,),
    "max_completion_tokens": (int,),
    "n": (int,),
    "temperature": _NUMBER,
    "top_p": _NUMBER,
    "presence_penalty": _NUMBER,
    "frequency_penalty": _NUMBER,
    "stop": (str, list),
    "user": (str,),
    "cache_salt": (str,),
}
# path -> (required field, its accepted types)
REQUIRED: dict[str, tuple[str, tuple[type, ...]]] = {
    "/v1/chat/completions": ("messages", (list,)),
    "/v1/completions": ("prompt", (str, list)),
}


async def read_body(request: web.Request, limit: int) -> bytes:
    """The raw body; 413 when it exceeds `limit` bytes (checked on Content-Length first)."""
    if request.content_length is not None and request.content_length > limit:
        raise errors.body_too_large(limit)
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise errors.body_too_large(limit) from exc


def parse_body(raw: bytes, path: str) -> dict[str, Any] | None:
    """The JSON object in `raw` (None when empty), with field types checked; 400 otherwise."""
    if not raw:
        if path in REQUIRED:
            raise errors.bad_request("The request body must be a JSON object.")
        return None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise errors.bad_request(f"The request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise errors.bad_request("The request body must be a JSON object.")
    for name, types in FIELD_TYPES.items():
        value = body.get(name)
        if value is not None and (not isinstance(value, types) or _is_bool_as_number(value, types)):
            raise errors.bad_request(f"'{name}' must be of type {_type_names(types)}.", param=name)
    required = REQUIRED.get(path)
    if required is not None:
        name, types = required
        value = body.get(name)
        if value is None:
            raise errors.bad_request(f"'{name}' is a required property.", param=name)
        if not isinstance(value, types):
            raise errors.bad_request(f"'{name}' must be of type {_type_names(types)}.", param=name)
    return body


def _is_bool_as_number(value: Any, types: tuple[type, ...]) -> bool:
    return isinstance(value, bool) and bool not in types


def _type_names(types: tuple[type, ...]) -> str:
    names = {int: "integer", float: "number", str: "string", list: "array", dict: "object", bool: "boolean"}
    return " or ".join(names.get(t, t.__name__) for t in types)

"""Reading and checking a client's JSON body: content coding, size limit, JSON syntax and nesting, the
types of the fields the gateway itself relies on. Everything else is left for the pod to validate, as
vLLM would.

The gateway's HTTP server does not decompress request bodies itself (`SERVER_ARGS`): `read_body`
decodes `Content-Encoding` here, so that an undecodable body is a 400, an unsupported coding a 415 and
a decompression bomb a 413, all OpenAI-shaped, and the pod is sent the decoded bytes (the proxy drops
the client's Content-Encoding header; the client library sets Content-Length).
"""

from __future__ import annotations

import asyncio
import zlib
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway import errors
from prefixindex.prompt import PromptError, check_prompt_nesting

# aiohttp server (RequestHandler) settings the app needs wherever it is served (Application.handler_args).
SERVER_ARGS: dict[str, Any] = {"auto_decompress": False}

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
# Deepest nesting of arrays and objects accepted in a body. Far beyond any real request (a JSON schema
# in `response_format` or `tools` nests a few levels), far below what recursive code can handle: the
# chat template's `tojson`, and orjson.dumps when a P/D step re-serialises the body (limit ~255).
MAX_JSON_DEPTH = 64

_GZIP, _ZLIB, _RAW_DEFLATE = 16 + zlib.MAX_WBITS, zlib.MAX_WBITS, -zlib.MAX_WBITS
CODINGS = {"gzip": _GZIP, "x-gzip": _GZIP, "deflate": _ZLIB}
MAX_CODINGS = 2  # `gzip, gzip` at most: each layer is another full decompression
THREAD_DECODE_BYTES = 256 << 10  # compressed bodies above this are decoded off the event loop


async def read_body(request: web.Request, limit: int, idle_timeout: float) -> bytes:
    """The body as the pod must read it: decoded per Content-Encoding. 413 when it exceeds `limit`
    bytes (checked on Content-Length first, as it arrives, and on the decoded size), 415 for a coding
    other than gzip/deflate/identity, 400 for a body that does not decode or whose framing broke, 408
    when the client goes silent for `idle_timeout` seconds before its body is complete."""
    codings = content_codings(request.headers.getall("Content-Encoding", ()))
    if request.content_length is not None and request.content_length > limit:
        raise errors.body_too_large(limit)
    try:
        raw = await _read_raw(request, limit, idle_timeout)
    except (web.RequestPayloadError, HttpProcessingError) as exc:
        raise errors.unreadable_body(_first_line(exc)) from None
    except TimeoutError:
        raise errors.body_timeout(idle_timeout) from None
    if not codings or not raw:
        return raw
    if len(raw) > THREAD_DECODE_BYTES:
        return await asyncio.to_thread(decode_body, raw, codings, limit)
    return decode_body(raw, codings, limit)


async def _read_raw(request: web.Request, limit: int, idle_timeout: float) -> bytes:
    """The body's bytes as sent, at most `limit`, with a deadline reset by every chunk that arrives (a
    slow upload goes on; a client that stalls mid-body does not hold the request forever)."""
    content = request.content
    chunks: list[bytes] = []
    size = 0
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(idle_timeout) as deadline:
        while chunk := await content.readany():
            size += len(chunk)
            if size > limit:
                raise errors.body_too_large(limit)
            chunks.append(chunk)
            deadline.reschedule(loop.time() + idle_timeout)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def content_codings(values: Any) -> list[str]:
    """The codings a Content-Encoding header lists, in the order applied (identity dropped);
    415 for an unsupported one or more than MAX_CODINGS."""
    codings = []
    for value in values:
        for item in value.split(","):
            coding = item.strip().lower()
            if coding and coding != "identity":
                if coding not in CODINGS:
                    raise errors.unsupported_encoding(coding)
                codings.append(coding)
    if len(codings) > MAX_CODINGS:
        raise errors.unsupported_encoding(", ".join(codings))
    return codings


def decode_body(data: bytes, codings: list[str], limit: int) -> bytes:
    """Undo `codings` (last applied first) with at most `limit` bytes of output per layer."""
    for coding in reversed(codings):
        wbits = CODINGS[coding]
        try:
            data = _inflate(data, wbits, limit, coding)
        except errors.GatewayError as exc:
            if wbits != _ZLIB or exc.status != 400:
                raise
            data = _inflate(data, _RAW_DEFLATE, limit, coding)  # "deflate" sent without its zlib header
    return data


def _inflate(data: bytes, wbits: int, limit: int, coding: str) -> bytes:
    out = bytearray()
    while True:  # gzip bodies may hold several members, one after the other
        inflater = zlib.decompressobj(wbits)
        try:
            out += inflater.decompress(data, limit + 1 - len(out))
        except zlib.error:
            raise errors.undecodable_body(coding) from None
        if len(out) > limit or inflater.unconsumed_tail:
            raise errors.body_too_large(limit)
        if not inflater.eof:  # the stream was cut off
            raise errors.undecodable_body(coding)
        data = inflater.unused_data
        if not data or wbits != _GZIP:
            break
    if data:  # bytes after the end of a zlib or raw deflate stream
        raise errors.undecodable_body(coding)
    return bytes(out)


def parse_body(raw: bytes, path: str) -> dict[str, Any] | None:
    """The JSON object in `raw` (None when empty), with field types and nesting checked; 400 otherwise."""
    if not raw:
        if path in REQUIRED:
            raise errors.bad_request("The request body must be a JSON object.")
        return None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        message = f"The request body is not valid JSON: {exc}"
        raise errors.bad_request(message, reason="invalid_json") from None
    if not isinstance(body, dict):
        raise errors.bad_request("The request body must be a JSON object.", reason="invalid_json")
    if nesting_exceeds(raw, body, MAX_JSON_DEPTH):
        raise errors.bad_request(
            f"The request body nests arrays and objects deeper than {MAX_JSON_DEPTH} levels.",
            reason="too_deep",
        )
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
    try:  # O(depth): the batch nesting prompt extraction follows, checked for every policy
        check_prompt_nesting(body.get("prompt"))
    except PromptError as exc:
        raise errors.bad_request(str(exc), param="prompt", reason="too_deep") from None
    return body


def nesting_exceeds(raw: bytes, body: Any, limit: int) -> bool:
    """Whether `body` (parsed from `raw`) nests containers more than `limit` deep. A body with at most
    `limit` brackets cannot (the usual case, counted at C speed); otherwise it is walked, without
    recursion."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def _is_bool_as_number(value: Any, types: tuple[type, ...]) -> bool:
    return isinstance(value, bool) and bool not in types


def _type_names(types: tuple[type, ...]) -> str:
    names = {int: "integer", float: "number", str: "string", list: "array", dict: "object", bool: "boolean"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1].strip() if text else type(exc).__name__

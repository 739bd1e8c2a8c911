"""Is a pod's 2xx answer to a generation request shaped like vLLM's? Checked once, on what the proxy
holds after the first read anyway (status, headers, first chunk), never per chunk:

- streamed (`"stream": true`): `Content-Type: text/event-stream` and a first chunk that opens an SSE
  field (`data:`; also a comment or `event:`/`id:`/`retry:`, which SSE allows);
- not streamed: `Content-Type: application/json` and, when the whole body came in the first chunk
  (the usual case: vLLM sends it in one write), a body that parses as a JSON object; otherwise a
  first chunk that opens one.

A body carrying its own Content-Encoding is only checked by its type. Anything else is a broken pod:
the proxy answers the client 502 and charges the pod (health.attempt_failed).
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson

from router.pd import GENERATION_PATHS

_SSE_FIELDS = (b"data:", b":", b"event:", b"id:", b"retry:")


def answer_problem(
    path: str, streamed: bool, status: int, headers: Mapping[str, str], first: bytes, complete: bool
) -> str | None:
    """What is wrong with a pod's answer to a POST on `path` (None: nothing the cheap checks see).
    `first` is the first chunk of the body, `complete` whether it is the whole body."""
    if not 200 <= status < 300 or path not in GENERATION_PATHS:
        return None
    content_type = headers.get("Content-Type", "").lower()
    plain = headers.get("Content-Encoding", "identity").lower() in ("", "identity")
    if streamed:
        if not content_type.startswith("text/event-stream"):
            return f"a stream answered as {content_type or 'no content type'!r}"
        head = first.lstrip(b"\r\n")
        if plain and not head:
            return "an empty stream"
        if plain and not any(head.startswith(f) or f.startswith(head) for f in _SSE_FIELDS):
            return "a stream whose first bytes are not an SSE event"
        return None
    if not content_type.startswith("application/json"):
        return f"an answer of type {content_type or 'none'!r} where JSON was due"
    if not plain:
        return None
    if complete:
        try:
            body = orjson.loads(first)
        except orjson.JSONDecodeError:
            return "a body that is not JSON"
        return None if isinstance(body, dict) else "a JSON body that is not an object"
    return None if first.lstrip()[:1] in (b"{", b"") else "a body that does not open a JSON object"

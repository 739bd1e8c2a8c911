"""One streaming OpenAI request and what it measured: TTFT, inter-token gaps, tokens, cached tokens.

TTFT is the time to the first chunk carrying generated text (a chat stream's role-only first chunk
does not count); ITL are the gaps between later text chunks. Token counts come from the final `usage`
chunk (`stream_options.include_usage`), falling back to counting text chunks.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from bench.workloads.base import BenchRequest

ENDPOINT_HEADER = "x-kvgate-endpoint"
QUEUE_WAIT_HEADER = "x-kvgate-queue-wait"  # seconds a request waited in kvgate's admission queue


@dataclass(slots=True)
class RequestResult:
    """Everything measured about one request. Times are seconds; `scheduled`/`started` are offsets
    from the run's start (their difference is the load generator's own lag)."""

    tag: str
    scheduled: float
    started: float = 0.0
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int | None = None
    status: int = 0
    error: str | None = None
    endpoint: str | None = None
    queue_wait: float | None = None  # from QUEUE_WAIT_HEADER, when the gateway queued the request

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200

    def to_json(self) -> dict[str, Any]:
        return {
            "tag": self.tag, "scheduled": self.scheduled, "started": self.started, "ttft": self.ttft,
            "e2e": self.e2e, "itl": self.itl, "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens, "cached_tokens": self.cached_tokens,
            "status": self.status, "error": self.error, "endpoint": self.endpoint,
        }


def chunk_text(chunk: dict[str, Any]) -> str:
    """Generated text carried by one stream chunk (completions `text` or chat `delta.content`)."""
    choices = chunk.get("choices")
    if not choices:
        return ""
    choice = choices[0]
    text = choice.get("text")
    if text is None:
        text = (choice.get("delta") or {}).get("content")
    return text or ""


def _error_message(status: int, body: bytes) -> str:
    try:
        err = orjson.loads(body)["error"]
        return f"{status} {err.get('type', '')}: {err.get('message', '')}"[:300]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return f"{status} {body[:200].decode(errors='replace')}"


async def send(
    http: aiohttp.ClientSession, base_url: str, model: str, req: BenchRequest, result: RequestResult,
    t0: float, request_timeout_s: float = 300.0, headers: Mapping[str, str] | None = None,
) -> RequestResult:
    """Send `req` to `base_url`, streaming, filling `result` (offsets relative to `t0`), with `headers`
    added (e.g. x-kvgate-tenant). Never raises for HTTP or network failures: they end up in
    `result.error`."""
    start = time.perf_counter()
    result.started = start - t0
    last: float | None = None
    chunks = 0
    usage: dict[str, Any] | None = None
    try:
        async with http.post(
            base_url + req.path, data=orjson.dumps(req.body(model)),
            headers={"Content-Type": "application/json", **(headers or {})},
            timeout=aiohttp.ClientTimeout(total=request_timeout_s),
        ) as resp:
            result.status = resp.status
            result.endpoint = resp.headers.get(ENDPOINT_HEADER)
            if (waited := resp.headers.get(QUEUE_WAIT_HEADER)) is not None:
                result.queue_wait = float(waited)
            if resp.status != 200:
                result.error = _error_message(resp.status, await resp.read())
                return result
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = orjson.loads(data)
                if "error" in chunk:
                    result.error = _error_message(resp.status, data)
                    break
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if chunk_text(chunk):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
    except (TimeoutError, aiohttp.ClientError, orjson.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    result.e2e = time.perf_counter() - start
    if usage:
        result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        result.output_tokens = int(usage.get("completion_tokens") or chunks)
        details = usage.get("prompt_tokens_details") or {}
        cached = details.get("cached_tokens")
        result.cached_tokens = int(cached) if cached is not None else None
    else:
        result.output_tokens = chunks
    if result.error is None and result.ttft is None and not (usage and result.output_tokens > 0):
        # tokens that detokenize to nothing (a random-weight model's) are an answer, not a TTFT sample
        result.error = "stream ended without any generated text"
    return result

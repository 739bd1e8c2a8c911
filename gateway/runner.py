"""The gateway's HTTP runner: aiohttp's, with its own protocol-level errors in the OpenAI shape.

HTTP that aiohttp cannot parse (a bad request line, duplicate Content-Length, broken chunked framing
before the handler runs, an Expect it refuses) is answered by aiohttp's `RequestHandler.handle_error`
before any gateway code runs, as `text/plain`. `OpenAIErrorHandler` keeps aiohttp's logic (the status,
logging through the server logger that gateway.rejections counts, closing the connection) and only
gives the answer the same `{"error": {...}}` body as every other gateway error.
"""

from __future__ import annotations

import gc
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server


class OpenAIErrorHandler(RequestHandler):
    """aiohttp's per-connection protocol, answering its own errors as OpenAI error bodies."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        plain = super().handle_error(request, status, exc, message)  # logs; raises if bytes went out
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        detail = (message or "").strip().splitlines()
        text = f"{phrase}: {detail[0]}" if detail and detail[0] != phrase else phrase
        error = {
            "message": text[:300],
            "type": "invalid_request_error" if status < 500 else "server_error",
            "param": None,
            "code": status,
        }
        resp = web.Response(status=plain.status, body=orjson.dumps({"error": error}),
                            content_type="application/json")
        resp.force_close()
        return resp


class _OpenAIErrorServer(Server):
    def __call__(self) -> RequestHandler:
        return OpenAIErrorHandler(self, loop=self._loop, **self._kwargs)


def app_runner(app: web.Application, **kwargs: Any) -> web.AppRunner:
    """`web.AppRunner(app, **kwargs)` whose connections answer protocol errors as OpenAI errors."""
    return _Runner(app, **kwargs)


class _Runner(web.AppRunner):
    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = _OpenAIErrorServer  # same state; only how it builds connection handlers
        return server


def freeze_startup_heap() -> None:
    """Once listening, before the ready line: collect, then move every object alive (modules, config,
    tokenizers, the app: ~50k objects) to the collector's permanent generation (`gc.freeze`), so a
    full collection walks only what was made since. Unfrozen, a full collection took 15-22 ms on the
    event loop, stalling every stream at once, and a burst of long prompts set one off
    (bench/stream_stall.py)."""
    gc.collect()
    gc.freeze()

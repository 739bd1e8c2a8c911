"""A tiny OpenAI-style SSE server on 127.0.0.1 (OS-chosen port) for load-generator tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import orjson
import pytest
from aiohttp import web

from prefixindex.tokenizer import WordTokenizer


@dataclass
class FakeServer:
    url: str
    bodies: list[dict] = field(default_factory=list)
    delay_s: float = 0.0  # before the first token
    concurrent: int = 0
    max_concurrent: int = 0
    text: str = " w{i}"  # each token's text ("" for tokens that detokenize to nothing)
    usage: bool = True  # the closing usage chunk


async def _handler(request: web.Request) -> web.StreamResponse:
    server = request.app[SERVER]
    body = orjson.loads(await request.read())
    server.bodies.append(body)
    if body.get("model") != "m":
        return web.json_response(
            {"error": {"message": "The model `x` does not exist.", "type": "NotFoundError", "param": None,
                       "code": 404}}, status=404)
    tok = WordTokenizer()
    chat = request.path.endswith("/chat/completions")
    prompt_tokens = len(tok.encode_chat(body["messages"]) if chat else tok.encode(body["prompt"]))
    server.concurrent += 1
    server.max_concurrent = max(server.max_concurrent, server.concurrent)
    try:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "x-kvgate-endpoint": "pod-a"})
        await resp.prepare(request)
        if chat:  # vLLM's first chat chunk carries only the role
            await resp.write(b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n')
        await asyncio.sleep(server.delay_s)
        for i in range(body["max_tokens"]):
            piece = server.text.format(i=i)
            choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
            await resp.write(b"data: " + orjson.dumps({"choices": [choice]}) + b"\n\n")
            await asyncio.sleep(0.001)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": body["max_tokens"],
                 "prompt_tokens_details": {"cached_tokens": 16}}
        if server.usage:
            await resp.write(b"data: " + orjson.dumps({"choices": [], "usage": usage}) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp
    finally:
        server.concurrent -= 1


SERVER = web.AppKey("server", FakeServer)


@pytest.fixture
async def fake_server() -> AsyncIterator[FakeServer]:
    server = FakeServer("")
    app = web.Application()
    app[SERVER] = server
    app.router.add_post("/v1/completions", _handler)
    app.router.add_post("/v1/chat/completions", _handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    server.url = f"http://127.0.0.1:{port}"
    yield server
    await runner.cleanup()

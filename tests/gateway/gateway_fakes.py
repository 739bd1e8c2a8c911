"""Helpers for the gateway tests: scriptable fake pods and configs, all on 127.0.0.1 with OS-chosen
ports. The fake pods exist for faults the simulator does not script (a pod answering
503, dying after N chunks, going silent); end-to-end behaviour is tested against bench.sim too."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from gateway.config import GatewayConfig, config_from_mapping


@dataclass
class FakePod:
    """An OpenAI-ish pod whose behaviour tests script through its fields."""

    name: str
    url: str = ""
    chunks: int = 3  # SSE chunks per streamed answer
    chunk_delay: float = 0.0
    first_delay: float = 0.0  # silence before the response headers
    status: int = 200  # answer every API call with this status (with an error body when not 2xx)
    die_after_chunks: int | None = None  # drop the connection after this many chunks
    truncate_body: bool = False  # non-streamed answers: promise 1000 bytes, send 10, drop the connection
    healthy: bool = True
    seen: list[dict[str, Any]] = field(default_factory=list)  # headers, body, path of each API call
    running: int = 0
    cancelled: int = 0
    finished: int = 0
    _runner: web.AppRunner | None = None
    _started: asyncio.Event = field(default_factory=asyncio.Event)

    async def api(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = orjson.loads(raw) if raw else {}
        self.seen.append({"path": request.path, "headers": request.headers.copy(), "body": body, "raw": raw})
        self._started.set()
        self.running += 1
        try:
            if self.first_delay:
                await asyncio.sleep(self.first_delay)
            if self.status != 200:
                err = {"error": {"message": "pod says no", "type": "x", "param": None, "code": self.status}}
                return web.json_response(err, status=self.status)
            if body.get("stream"):
                return await self._stream(request)
            if self.truncate_body:
                return await self._truncated(request)
            return web.json_response(
                {"id": "cmpl-1", "object": "text_completion", "pod": self.name, "choices": [{"text": "hi"}]}
            )
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1
            self.finished += 1

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(self.chunks):
            if self.die_after_chunks is not None and i == self.die_after_chunks:
                assert request.transport is not None
                request.transport.abort()
                raise asyncio.CancelledError
            await resp.write(b"data: " + orjson.dumps({"pod": self.name, "i": i}) + b"\n\n")
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _truncated(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "1000"})
        await resp.prepare(request)
        await resp.write(b'{"id": "cm')
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        raise asyncio.CancelledError

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model", "parent": None}]})

    async def metrics(self, request: web.Request) -> web.Response:
        text = (
            f'vllm:num_requests_running{{engine="0",model_name="m"}} {float(self.running)}\n'
            'vllm:num_requests_waiting{engine="0",model_name="m"} 2.0\n'
            'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5\n'
            'vllm:cache_config_info{block_size="32",num_gpu_blocks="128"} 1.0\n'
        )
        return web.Response(text=text)

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/v1/models", self.models)  # the gateway's adapter poll, not an API call
        app.router.add_route("*", "/v1/{tail:.*}", self.api)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.1, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def restart(self) -> None:
        """Listen again on the same port (a pod coming back)."""
        port = int(self.url.rsplit(":", 1)[1])
        await self.start(port)


def pool_config(urls: list[str], *, policy: str = "round_robin", **sections: Any) -> GatewayConfig:
    data: dict[str, Any] = {
        "pools": {"m": {"policy": {"name": policy}, "endpoints": [{"url": u} for u in urls]}},
        "health": {"interval": 0.2, "timeout": 0.2, "eject_after": 2},
        "scrape": {"interval": 0.1, "timeout": 0.5},
        "seed": 1,
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return config_from_mapping(data)

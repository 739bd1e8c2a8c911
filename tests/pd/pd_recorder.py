"""A recording reverse proxy in front of one simulated pod: what reached the pod, exactly as sent.

Every request's path, headers and JSON body are kept in `seen`; generation requests can be made to
fail (`fail_status`) or to stall (`stall_s`) so tests can break one step of the P/D flow. A request
whose client went away while it was being served is counted in `cancelled`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

GENERATION = ("/v1/completions", "/v1/chat/completions")


@dataclass
class Seen:
    path: str
    headers: CIMultiDict[str]
    body: Any


@dataclass
class Recorder:
    target: str  # the pod's base URL
    version: str = ""
    fail_status: int | None = None  # answer generation requests with this status instead
    stall_s: float = 0.0  # hold generation requests this long before forwarding them
    seen: list[Seen] = field(default_factory=list)
    cancelled: int = 0
    url: str = ""
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None

    def generations(self) -> list[Seen]:
        return [s for s in self.seen if s.path in GENERATION]

    def prefills(self) -> list[Seen]:
        return [s for s in self.generations() if _params(s).get("do_remote_decode")]

    def decodes(self) -> list[Seen]:
        """Generation requests that were not prefill steps (remote-prefilled or whole)."""
        return [s for s in self.generations() if not _params(s).get("do_remote_decode")]

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.1, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = orjson.loads(raw) if raw else None
        generation = request.path in GENERATION
        if generation:
            self.seen.append(Seen(request.path, CIMultiDict(request.headers), body))
        try:
            return await self._serve(request, raw, generation)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def _serve(self, request: web.Request, raw: bytes, generation: bool) -> web.StreamResponse:
        if generation and self.stall_s:
            await asyncio.sleep(self.stall_s)
        if generation and self.fail_status is not None:
            err = {"error": {"message": "injected", "type": "InternalServerError", "param": None,
                             "code": self.fail_status}}
            return web.json_response(err, status=self.fail_status)
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self._session.request(
            request.method, self.target + request.raw_path, data=raw or None, headers=headers
        ) as up:
            resp = web.StreamResponse(status=up.status)
            for key in ("Content-Type",):
                if key in up.headers:
                    resp.headers[key] = up.headers[key]
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp


def _params(seen: Seen) -> dict[str, Any]:
    params = seen.body.get("kv_transfer_params") if isinstance(seen.body, dict) else None
    return params if isinstance(params, dict) else {}

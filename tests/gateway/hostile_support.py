"""Helpers for the hostile-client tests: raw HTTP/1.1 over a socket (the test writes the request bytes
itself, so the gateway receives exactly what a hostile client sends; aiohttp's client would normalise
targets and headers first), a pod whose answers a test scripts, and the checks every gateway answer
must pass."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson
from aiohttp import web
from multidict import CIMultiDict

CRLF = b"\r\n"
# What a gateway may ask a pod for: the API, and its own probes (/health) and scrapes (/metrics).
POD_API = re.compile(r"/v1/[^?#]+|/tokenize|/detokenize")
GATEWAY_PROBES = frozenset({"/health", "/metrics"})


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def from_gateway(self) -> bool:
        """The gateway answered itself (no pod named in the answer)."""
        return "x-kvgate-endpoint" not in self.headers


def build_request(
    method: str | bytes,
    target: str | bytes,
    headers: Iterable[tuple[str | bytes, str | bytes]] = (),
    body: bytes = b"",
    *,
    host: str = "gw",
    chunked: bool = False,
    content_length: bool = True,
) -> bytes:
    """The bytes of one HTTP/1.1 request that closes its connection; Content-Length (or chunked framing)
    is added for `body` unless `content_length` is False."""
    lines = [_b(method) + b" " + _b(target) + b" HTTP/1.1", b"Host: " + host.encode()]
    lines += [_b(k) + b": " + _b(v) for k, v in headers]
    if chunked:
        lines.append(b"Transfer-Encoding: chunked")
        payload = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in _chunks(body)) + b"0\r\n\r\n"
    else:
        if content_length and (body or _b(method) in (b"POST", b"PUT", b"PATCH")):
            lines.append(b"Content-Length: %d" % len(body))
        payload = body
    lines.append(b"Connection: close")
    return CRLF.join(lines) + CRLF + CRLF + payload


async def send_raw(base_url: str, data: bytes, *, within: float = 20.0) -> RawResponse:
    """Write `data` to the server of `base_url`; read until the final response (1xx skipped) is
    complete, or to EOF; parse it."""
    url = urlsplit(base_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        try:
            writer.write(data)
            await writer.drain()
        except ConnectionError:
            pass  # the server answered and closed before taking all of a body it refused: read its answer
        return await read_response(reader, within=within)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass


async def read_response(reader: asyncio.StreamReader, *, within: float = 20.0) -> RawResponse:
    """Read one final response from `reader` (until its framing says it is complete, or EOF)."""
    raw = b""
    async with asyncio.timeout(within):
        while not _complete(raw):
            chunk = await reader.read(65536)
            if not chunk:
                break
            raw += chunk
    return parse_response(raw)


def _complete(raw: bytes) -> bool:
    """Whether `raw` holds a whole final response whose end its framing tells (a server that keeps
    reading an unwanted body, as aiohttp's lingering close does, need not be waited for)."""
    try:
        resp = parse_response(raw)
    except (AssertionError, ValueError):
        return False
    if resp.headers.get("Transfer-Encoding", "").lower() == "chunked":
        return raw.endswith(b"0\r\n\r\n")
    length = resp.headers.get("Content-Length")
    return length is not None and len(resp.body) >= int(length)


def parse_response(raw: bytes) -> RawResponse:
    while True:
        head, sep, rest = raw.partition(CRLF + CRLF)
        if not sep:
            raise AssertionError(f"no complete response head in {raw[:200]!r}")
        status_line, *header_lines = head.split(CRLF)
        _version, status, reason = [*status_line.decode("latin-1").split(" ", 2), ""][:3]
        headers: CIMultiDict[str] = CIMultiDict()
        for line in header_lines:
            name, _, value = line.decode("latin-1").partition(":")
            headers.add(name.strip(), value.strip())
        if 100 <= int(status) < 200:
            raw = rest
            continue
        if headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = _dechunk(rest)
        elif "Content-Length" in headers:
            body = rest[: int(headers["Content-Length"])]
        else:
            body = rest
        return RawResponse(int(status), reason, headers, body)


def assert_openai_error(resp: RawResponse, status: int | None = None) -> dict[str, Any]:
    """The answer is an OpenAI error body (and the status, when given); returns its `error`."""
    if status is not None:
        assert resp.status == status, (resp.status, resp.body[:300])
    assert resp.headers.get("Content-Type", "").startswith("application/json"), (resp.status, resp.headers)
    body = resp.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert "Traceback" not in error["message"]
    return error


def pod_path_allowed(raw_target: str) -> bool:
    """Whether a raw target a pod received is one a gateway may send it: an API path (or the gateway's
    probes) whose segments are neither dot segments nor hide a slash or backslash, encoded or not."""
    path = raw_target.split("?", 1)[0]
    if path in GATEWAY_PROBES:
        return True
    if not POD_API.fullmatch(path) or "\\" in path or re.search("%(2f|5c)", path, re.I):
        return False
    return all(seg not in (".", "..", "") for seg in unquote(path)[1:].split("/"))


async def pod_paths(session: Any, pod_url: str) -> list[tuple[str, str, int]]:
    """The (method, raw target, count) a simulated pod recorded (bench.sim.server PATHS_PATH)."""
    async with session.get(pod_url + "/kvgate_sim/paths") as r:
        data = await r.json()
    assert data["overflow"] == 0
    return [tuple(p) for p in data["paths"]]


Answer = Callable[[web.Request, bytes], Awaitable[web.StreamResponse]]


@dataclass
class ScriptedPod:
    """A pod that answers every /v1/* call with `answer(request, body)`; records what it received."""

    answer: Answer
    url: str = ""
    seen: list[dict[str, Any]] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    async def _api(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append({"path": request.raw_path, "headers": request.headers.copy(), "body": body})
        return await self.answer(request, body)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", _ok)
        app.router.add_route("*", "/v1/{tail:.*}", self._api)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.1, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def _ok(request: web.Request) -> web.Response:
    return web.Response(status=200)


def _b(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


def _chunks(body: bytes, size: int = 7) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(CRLF)
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)

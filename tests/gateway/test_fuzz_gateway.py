"""Issue 10, done when: thousands of hostile and careless requests through a real `kvgate serve` in
front of two simulated pods (`kvgate sim` processes), written byte for byte on raw sockets.

Hypothesis generates the requests (methods, targets, headers, content codings, JSON and other
bodies); a list of known attack strings is sent as well. Every answer must be below 500, and every
error the gateway produced itself an OpenAI error body. Afterwards: no pod was asked for a path outside
what a gateway may send (the simulator records every target it receives, served at
/kvgate_sim/paths, a path the gateway refuses to reach), no pod was charged a failure or ejected,
/health and /ready answer, the gateway logged no traceback, and its RSS returned near its idle size.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import os
import signal
import sys
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import psutil
import pytest
from helpers import eventually
from hostile_support import (
    RawResponse,
    assert_openai_error,
    build_request,
    pod_path_allowed,
    pod_paths,
    send_raw,
)
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from bench.sim.fleet import SimFleetProcess

FAST = {
    "model": "m",
    "itl_ms": 0.5,
    "itl_ms_per_seq": 0.0,
    "prefill_tps": 1e7,
    "seed": 1,
    "max_model_len": 64,
}
GENERATED = 1200  # requests hypothesis generates, each sent in both framings
CONCURRENCY = 12
MAX_BODY = 1 << 20
RSS_SLACK = 48 << 20  # what the gateway may hold above its idle RSS once the burst is over

# ---- strategies ------------------------------------------------------------------------------------

# The HTTP/2 preface, a method aiohttp's C parser does not know, CONNECT (whose target it parses its own way).
NOT_METHODS = frozenset({"PRI", "FOO", "CONNECT"})
PRINTABLE = "".join(chr(c) for c in range(0x21, 0x7F))  # what an HTTP parser accepts in a target
WORDS = [
    "v1", "completions", "chat", "models", "embeddings", "tokenize", "detokenize", "health", "metrics",
    "ready", "kvgate_sim", "fault", "stats", "paths", "release_kv", "reset_prefix_cache", "version", "admin",
    "..", ".", "%2e%2e", "%2E%2e", ".%2e", "%2e", "%2f", "%2F", "%5c", "%5C", "\\", "%00", "%0a", "%zz", "%",
    "%252e%252e", "", "a%2Fb", "%c3%a9", "%ff", "~", ";", "@", "..;", "%u002e",
]  # fmt: skip
ATTACK_TARGETS = [
    "/v1/%2e%2e/kvgate_sim/fault", "/v1/%2E%2E/reset_prefix_cache", "/v1/../admin", "/v1/%2e%2e/metrics",
    "/v1/..%2fkvgate_sim%2ffault", "/v1/%2e%2e%2f%2e%2e%2fkvgate_sim/fault", "/v1/..\\kvgate_sim\\fault",
    "/v1\\..\\reset_prefix_cache", "/v1/%5c..%5creset_prefix_cache", "/v1//../kvgate_sim/paths",
    "/v1/./../version", "/v1/completions/../../metrics", "/v1/%252e%252e/kvgate_sim/fault",
    "/v1/..;/kvgate_sim/fault", "/v1/%c0%ae%c0%ae/kvgate_sim/fault", "/v1/%e0%80%ae%e0%80%ae/metrics",
    "/%2e%2e/kvgate_sim/fault", "/v1/completions?x=/../../kvgate_sim/fault", "/v1/completions#/../../admin",
    "/tokenize/../kvgate_sim/fault", "/detokenize%2f..%2fmetrics", "//kvgate_sim/fault", "/kvgate_sim/fault",
    "/reset_prefix_cache", "/version", "/v1/%00../metrics", "/v1/.%00./metrics",
    "http://x/v1/completions", "http://127.0.0.1:1/v1/completions", "https://evil.example/v1/models",
    "http://x/v1/%2e%2e/kvgate_sim/fault", "http://x", "x:443", "*",
]  # fmt: skip
ATTACK_BODIES = [
    b'{"model": "m", "prompt": ' + b"[" * 1000 + b'"x"' + b"]" * 1000 + b"}",
    b'{"model": "m", "prompt": ' + b"[" * 3 + b"1" + b"]" * 3 + b"}",
    b'{"model": "m", "messages": [{"role": "user", "content": ' + b"[" * 500 + b"]" * 500 + b"}]}",
    b'{"model": "m", "tools": ' + b'{"a": ' * 300 + b"1" + b"}" * 300 + b"}",
    b'{"model": "m", "prompt": "x", "max_tokens": 1e400}',
    b'{"model": "m", "prompt": "x", "max_tokens": NaN}',
    b'{"model": "m", "prompt": "\xff\xfe"}',
    b'{"model": "m", "prompt": "x"' + b', "a": 1' * 2000 + b"}",
    b'{"model": "m", "prompt": "' + b"x" * (MAX_BODY + 10) + b'"}',
    b"\x1f\x8b\x08\x00garbage",
    b'{"model": "m", "prompt": "x", "stream": true, "max_tokens": 3}',
    b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true, "max_tokens": 3}',
]  # fmt: skip
FIELDS = [
    "model", "prompt", "messages", "max_tokens", "stream", "stream_options", "cache_salt", "n", "temperature",
    "kv_transfer_params", "add_generation_prompt", "tools", "input", "tokens", "user", "stop",
]  # fmt: skip
HEADER_NAMES = [
    "Content-Type", "Expect", "Connection", "X-Forwarded-For", "Forwarded", "X-Request-Id", "Authorization",
    "Accept-Encoding", "TE", "Keep-Alive", "Proxy-Authorization", "Proxy-Connection", "Trailer", "Cookie",
    "X-Kvgate-Endpoint", "Accept", "Origin", "X-Session-Id", "Via",
]  # fmt: skip
CODINGS = [
    None,
    None,
    "gzip",
    "deflate",
    "x-gzip",
    "gzip, gzip",
    "identity",
    "zstd",
    "br",
    "GZIP",
    "compress",
]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 70), st.floats(allow_nan=False, width=32), st.text(max_size=8)
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
json_bodies = st.builds(
    lambda fields, model: orjson.dumps({**fields, **({"model": "m"} if model else {})}),
    st.dictionaries(st.sampled_from(FIELDS), values, max_size=5),
    st.booleans(),
)
# Requests a client means to be valid, some of them with a field gone wrong: most reach a pod.
words = st.text("abc xyz", max_size=20)
prompts = st.one_of(
    words, st.lists(st.integers(0, 50), min_size=1, max_size=8), st.lists(words, min_size=1, max_size=2)
)
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": words}), max_size=3
)
realistic = st.builds(
    lambda route, prompt, msgs, max_tokens, stream, extra: orjson.dumps(
        {"model": "m", **({"messages": msgs} if route == "chat" else {"prompt": prompt}),
         "max_tokens": max_tokens, "stream": stream, **extra}
    ),
    st.sampled_from(["chat", "completion"]), prompts, messages, st.integers(1, 6), st.booleans(),
    st.dictionaries(st.sampled_from(FIELDS), values, max_size=1),
)  # fmt: skip
ROUTES = [
    "/v1/completions",
    "/v1/chat/completions",
    "/tokenize",
    "/detokenize",
    "/v1/models",
    "/v1/embeddings",
]
segments = st.one_of(st.sampled_from(WORDS), st.text(PRINTABLE, max_size=6))
paths = st.builds(
    lambda lead, segs: lead + "/".join(segs),
    st.sampled_from(["/", "/v1/", "/v1/", "//", "/v1//", "/tokenize", "/V1/"]),
    st.lists(segments, max_size=4),
)
queries = st.one_of(st.just(""), st.just(""), st.text(PRINTABLE, max_size=12).map(lambda q: "?" + q))
targets = st.one_of(
    st.builds(str.__add__, st.sampled_from(ROUTES), queries),
    st.builds(str.__add__, st.sampled_from(ROUTES), queries),
    st.builds(str.__add__, paths, queries),
    st.sampled_from(ATTACK_TARGETS),
    st.builds(lambda host, path: f"http://{host}{path}", st.sampled_from(["x", "evil:1"]), paths),
)
methods = st.one_of(
    st.sampled_from(["POST", "POST", "POST", "GET"]),
    st.sampled_from(["POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "PROPFIND", "PURGE"]),
    st.sampled_from(sorted(NOT_METHODS)),
)
header_values = st.one_of(
    st.sampled_from(["100-continue", "foo", "", "application/json", "keep-alive", "close", "X-Request-Id",
                     "Content-Type", "gzip", "1.2.3.4", "for=1.2.3.4", "Bearer x", "trailers"]),
    st.text(PRINTABLE + " ", max_size=40).map(str.strip),
)  # fmt: skip
extra_names = st.text("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789-", min_size=1, max_size=12).map(
    "X-".__add__
)
header_names = st.one_of(st.sampled_from(HEADER_NAMES), extra_names)
headers = st.lists(st.tuples(header_names, header_values), max_size=4)


@dataclass(frozen=True)
class FuzzRequest:
    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    coding: str | None
    corrupt: bool
    chunked: bool

    def wire(self) -> bytes:
        body, hdrs = self.body, list(self.headers)
        if self.coding is not None:
            body = encode(body, self.coding)
            if self.corrupt and len(body) > 4:
                body = body[:2] + bytes(b ^ 0x5A for b in body[2:6]) + body[6:]
            hdrs.append(("Content-Encoding", self.coding))
        return build_request(self.method, self.target, hdrs, body, chunked=self.chunked)

    def variants(self) -> list[FuzzRequest]:
        """This request, and the same with the other framing (chunked or Content-Length)."""
        return [self, dataclasses.replace(self, chunked=not self.chunked)]

    @property
    def odd_expect(self) -> bool:
        return any(k == "Expect" and v.lower() != "100-continue" for k, v in self.headers)


def encode(body: bytes, coding: str) -> bytes:
    for c in reversed([c.strip().lower() for c in coding.split(",")]):
        if c in ("gzip", "x-gzip"):
            body = gzip.compress(body, mtime=0)
        elif c == "deflate":
            body = zlib.compress(body)
    return body


hostile = st.builds(
    FuzzRequest,
    method=methods,
    target=targets,
    headers=headers.map(tuple),
    body=st.one_of(
        realistic,
        realistic,
        json_bodies,
        st.binary(max_size=64),
        st.sampled_from(ATTACK_BODIES),
        st.just(b""),
    ),
    coding=st.sampled_from(CODINGS),
    corrupt=st.sampled_from([False, False, True]),
    chunked=st.booleans(),
)
# What a careful client sends (headers of the usual kinds, a supported coding): these reach the pods.
usual_headers = st.lists(
    st.tuples(st.sampled_from(["X-Forwarded-For", "Forwarded", "X-Request-Id", "Accept", "X-Session-Id"]),
              st.text(PRINTABLE, min_size=1, max_size=20)),
    max_size=3,
).map(lambda hs: (("Content-Type", "application/json"), *hs))  # fmt: skip
well_formed = st.builds(
    lambda body, hs, coding, chunked: FuzzRequest(
        "POST", "/v1/chat/completions" if b'"messages"' in body else "/v1/completions", hs, body, coding,
        False, chunked,
    ),
    realistic, usual_headers, st.sampled_from([None, None, "gzip", "deflate"]), st.booleans(),
)  # fmt: skip
fuzz_requests = st.one_of(hostile, hostile, well_formed)


def generate(n: int) -> list[FuzzRequest]:
    """`n` requests drawn by hypothesis (generation only: each is checked against the live gateway)."""
    drawn: list[FuzzRequest] = []

    @settings(
        max_examples=n, database=None, deadline=None, phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(fuzz_requests)
    def collect(request: FuzzRequest) -> None:
        drawn.append(request)

    collect()
    return drawn


def known_attacks() -> list[FuzzRequest]:
    json = (("Content-Type", "application/json"),)
    out = [
        FuzzRequest(m, t, json, b'{"dead": true}', None, False, False)
        for t in ATTACK_TARGETS
        for m in ("POST", "GET", "DELETE")
    ]
    out += [FuzzRequest("POST", "/v1/completions", json, b, None, False, False) for b in ATTACK_BODIES]
    out += [FuzzRequest("POST", "/v1/chat/completions", json, b, c, False, True) for b in ATTACK_BODIES[:4]
            for c in ("gzip", "deflate")]  # fmt: skip
    bomb = FuzzRequest("POST", "/v1/completions", json, b"[" * (32 << 20), "gzip", False, False)
    out += [bomb] * 8
    return out


# ---- the stack ----------------------------------------------------------------------------------------


@dataclass
class Stack:
    url: str
    pods: list[str]
    proc: asyncio.subprocess.Process
    stderr: Path


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with SimFleetProcess(2, **FAST) as fleet:
        args = [sys.executable, "-m", "gateway.cli", "serve", "--port", "0", "--model", "m",
                "--policy", "cache_aware", "--health-interval", "0.5", "--max-body-bytes", str(MAX_BODY),
                "--log-level", "INFO"]  # fmt: skip
        for url in fleet.urls:
            args += ["--backend", url]
        stderr = tmp_path / "serve.stderr"
        with stderr.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                *args, stdout=asyncio.subprocess.PIPE, stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1"}
            )
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.startswith(b"KVGATE_SERVE_READY "), line
        drain = asyncio.create_task(_read_all(proc.stdout))  # the access log: a pipe left full blocks wait()
        try:
            yield Stack(orjson.loads(line.split(b" ", 1)[1])["url"], fleet.urls, proc, stderr)
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), 15)
            await drain


async def _read_all(stream: asyncio.StreamReader) -> None:
    while await stream.read(1 << 16):
        pass


def check_answer(req: FuzzRequest, resp: RawResponse) -> None:
    assert resp.status < 500, f"{resp.status} {resp.body[:300]!r}"
    if not resp.from_gateway or resp.status < 400:
        return
    if "X-Request-Id" not in resp.headers:
        # aiohttp's own answer, before any gateway code (which stamps every answer with the id): only
        # for HTTP it refuses to parse, or a target with no path (it reaches no route, so aiohttp
        # answers its odd Expect itself)
        assert resp.status in (400, 417) and not_http(req), (resp.status, resp.body[:200])
    elif req.method == "HEAD":  # the same head, no body
        assert resp.headers.get("Content-Type", "").startswith("application/json"), resp.headers
    else:
        assert_openai_error(resp)


# Headers aiohttp refuses to see twice in a request (http_parser.SINGLETON_HEADERS, those we generate).
SINGLETONS = frozenset({"content-type", "content-location", "content-range", "etag", "max-forwards"})


def not_http(req: FuzzRequest) -> bool:
    """Whether `req` is not an HTTP/1.1 request aiohttp parses: a target that is not a path (`*` with
    another method than OPTIONS, `host:port` without CONNECT), the HTTP/2 preface or an unknown method,
    a singleton header given twice."""
    names = [k.lower() for k, _v in req.headers]
    duplicated = any(names.count(n) > 1 for n in SINGLETONS)
    return not req.target.startswith("/") or req.method in NOT_METHODS or duplicated


@pytest.mark.timeout(180)
async def test_fuzz_through_kvgate_serve(stack: Stack) -> None:
    gateway = psutil.Process(stack.proc.pid)
    async with aiohttp.ClientSession() as session:
        async with session.post(stack.url + "/v1/completions", json={"model": "m", "prompt": "hi"}) as r:
            assert r.status == 200  # warm: every lazily built piece of the request path exists now
        idle_rss = gateway.memory_info().rss
        requests = known_attacks() + [v for r in generate(GENERATED) for v in r.variants()]
        failures: list[str] = []
        statuses: dict[int, int] = {}
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(req: FuzzRequest) -> None:
            async with gate:
                try:
                    resp = await send_raw(stack.url, req.wire(), within=30)
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1
                    check_answer(req, resp)
                except Exception as exc:  # every failure is reported with its request
                    failures.append(f"{req!r:.600}\n  -> {exc!r:.400}")

        await asyncio.gather(*(one(r) for r in requests))
        assert not failures, f"{len(failures)} of {len(requests)} failed:\n" + "\n".join(failures[:5])
        assert sum(statuses.values()) == len(requests) > 2000
        assert statuses.get(200, 0) > 200, statuses  # the fuzz also reached pods, not only refusals

        # no pod was asked for anything but the API and the gateway's own probes
        for pod in stack.pods:
            paths = await pod_paths(session, pod)
            outside = [(m, t) for m, t, _n in paths if not pod_path_allowed(t)]
            assert outside == [("GET", "/kvgate_sim/paths")], outside  # only this very read
            async with session.get(pod + "/health") as r:
                assert r.status == 200  # the engine lives: its fault switch was never reached
        # no pod charged or ejected; the gateway answers
        async with session.get(stack.url + "/metrics") as r:
            metrics = await r.text()
        assert "kvgate_ejections_total{" not in metrics
        assert "kvgate_upstream_errors_total{" not in metrics
        assert 'kvgate_rejected_requests_total{reason="bad_target"}' in metrics
        async with session.get(stack.url + "/health") as r:
            assert r.status == 200
        async with session.get(stack.url + "/ready") as r:
            assert r.status == 200 and (await r.json())["healthy_endpoints"] == 2

    await eventually(
        lambda: gateway.memory_info().rss < idle_rss + RSS_SLACK,
        within=10,
        what=f"the gateway's RSS back within {RSS_SLACK >> 20} MiB of its idle {idle_rss >> 20} MiB",
    )
    stack.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(stack.proc.wait(), 15) == 0
    log = stack.stderr.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
    assert len(log.splitlines()) < 30, log[-3000:]  # summary lines, not one per request


@pytest.mark.parametrize(
    "target",
    ["/kvgate_sim/fault", "/v1/%2e%2e/x", "/v1/../x", "/v1/a%2fb", "/reset_prefix_cache", "/v1/a\\b",
     "/v1//x", "/version", "/v1/%2E%2E/metrics"],
)  # fmt: skip
def test_the_path_check_refuses_what_must_not_reach_a_pod(target: str) -> None:
    assert not pod_path_allowed(target)


def test_the_path_check_admits_what_a_gateway_sends() -> None:
    for target in (
        "/v1/completions",
        "/v1/chat/completions?x=%22",
        "/tokenize",
        "/health",
        "/metrics",
        "/v1/a%20b",
    ):
        assert pod_path_allowed(target), target

"""Issue 10, forwarding: hop-by-hop headers (RFC 9110 section 7.6.1) are dropped both ways, including
those a message's own Connection header names; X-Forwarded-For and Forwarded carry the client's
address appended to (or replacing) what the client claimed, per `forwarded.mode`."""

from __future__ import annotations

import pytest
from aiohttp import web
from gateway_fakes import pool_config
from hostile_support import ScriptedPod, build_request, send_raw

from gateway.config import config_from_mapping

COMPLETION = b'{"model": "m", "prompt": "x"}'
JSON = [("Content-Type", "application/json")]


@pytest.fixture
async def pod():
    async def answer(request: web.Request, body: bytes) -> web.StreamResponse:
        resp = web.Response(body=b'{"id": "cmpl-1", "choices": []}', content_type="application/json")
        resp.headers["Connection"] = "X-Pod-Secret, Keep-Alive"
        resp.headers["X-Pod-Secret"] = "internal"
        resp.headers["Keep-Alive"] = "timeout=5"
        resp.headers["Proxy-Authenticate"] = "Basic"
        resp.headers["Upgrade"] = "h2c"
        resp.headers["X-Pod-Public"] = "kept"
        return resp

    p = ScriptedPod(answer)
    await p.start()
    yield p
    await p.stop()


async def test_hop_by_hop_headers_dropped_both_ways(pod, start_gateway):
    gw = await start_gateway(pool_config([pod.url]))
    headers = [
        *JSON,
        ("Connection", "X-Client-Secret"),
        ("Connection", "X-Other"),  # a second Connection header counts too
        ("X-Client-Secret", "s"),
        ("X-Other", "o"),
        ("TE", "trailers"),
        ("Proxy-Authorization", "Basic eA=="),
        ("Upgrade", "websocket"),
        ("Keep-Alive", "timeout=1"),
        ("X-Client-Public", "kept"),
    ]
    resp = await send_raw(gw.url, build_request("POST", "/v1/completions", headers, COMPLETION))
    assert resp.status == 200
    up = pod.seen[-1]["headers"]
    for name in ("X-Client-Secret", "X-Other", "TE", "Proxy-Authorization", "Upgrade", "Keep-Alive"):
        assert name not in up, name
    assert up["X-Client-Public"] == "kept"
    for name in ("X-Pod-Secret", "Keep-Alive", "Proxy-Authenticate", "Upgrade"):
        assert name not in resp.headers, name
    assert resp.headers["X-Pod-Public"] == "kept"


def forwarded_config(url: str, mode: str | None):
    data = {"pools": {"m": {"endpoints": [{"url": url}]}}}
    if mode is not None:
        data["forwarded"] = {"mode": mode}
    return config_from_mapping(data)


@pytest.mark.parametrize(
    ("mode", "xff", "forwarded"),
    [
        (None, "203.0.113.9, 10.0.0.1, 127.0.0.1", "for=203.0.113.9, for=127.0.0.1;proto=http"),  # default
        ("append", "203.0.113.9, 10.0.0.1, 127.0.0.1", "for=203.0.113.9, for=127.0.0.1;proto=http"),
        ("replace", "127.0.0.1", "for=127.0.0.1;proto=http"),
        ("off", None, None),
    ],
)
async def test_forwarding_headers_per_mode(pod, start_gateway, mode, xff, forwarded):
    gw = await start_gateway(forwarded_config(pod.url, mode))
    claimed = [
        ("X-Forwarded-For", "203.0.113.9"),
        ("X-Forwarded-For", "10.0.0.1"),
        ("Forwarded", "for=203.0.113.9"),
    ]
    resp = await send_raw(gw.url, build_request("POST", "/v1/completions", [*JSON, *claimed], COMPLETION))
    assert resp.status == 200
    up = pod.seen[-1]["headers"]
    assert up.getall("X-Forwarded-For", [None]) == [xff]  # one header: the client's values joined
    assert up.getall("Forwarded", [None]) == [forwarded]


async def test_forwarding_headers_without_any_from_the_client(pod, start_gateway):
    gw = await start_gateway(forwarded_config(pod.url, None))
    resp = await send_raw(gw.url, build_request("POST", "/v1/completions", JSON, COMPLETION))
    assert resp.status == 200
    up = pod.seen[-1]["headers"]
    assert up["X-Forwarded-For"] == "127.0.0.1"
    assert up["Forwarded"] == "for=127.0.0.1;proto=http"


def test_forwarded_mode_is_validated():
    with pytest.raises(ValueError, match=r"forwarded\.mode"):
        forwarded_config("http://pod:1", "trust")


async def test_an_unsafe_client_request_id_is_replaced_not_echoed(pod, start_gateway):
    gw = await start_gateway(pool_config([pod.url]))
    for rid in (b"\xff\xfe", b"a b", b"x" * 129):
        data = build_request("POST", "/v1/completions", [*JSON, (b"X-Request-Id", rid)], COMPLETION)
        resp = await send_raw(gw.url, data)
        assert resp.status == 200
        assert len(resp.headers["X-Request-Id"]) == 32  # a fresh one, also the pod's
        assert pod.seen[-1]["headers"]["X-Request-Id"] == resp.headers["X-Request-Id"]
    data = build_request("POST", "/v1/completions", [*JSON, ("X-Request-Id", "x" * 128)], COMPLETION)
    assert (await send_raw(gw.url, data)).headers["X-Request-Id"] == "x" * 128  # the longest kept

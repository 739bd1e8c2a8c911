"""Every client-visible error is OpenAI-shaped, with the right status, and never a stack trace."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web
from gateway_fakes import pool_config
from helpers import eventually

from gateway.app import build_app
from gateway.state import STATE

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def assert_openai_error(body: dict, code: str | None = None, param: str | None = None) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] and "Traceback" not in body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    if param is not None:
        assert body["error"]["param"] == param


@pytest.mark.parametrize(
    ("path", "data", "status", "param"),
    [
        ("/v1/completions", b'{"model": "m", "prompt": ', 400, None),  # invalid JSON
        ("/v1/completions", b"[1, 2]", 400, None),  # not an object
        ("/v1/completions", b"", 400, None),  # empty body
        ("/v1/completions", b'{"model": "m", "prompt": "x", "stream": "yes"}', 400, "stream"),
        ("/v1/completions", b'{"model": "m", "prompt": "x", "max_tokens": "4"}', 400, "max_tokens"),
        ("/v1/completions", b'{"model": "m", "prompt": "x", "max_tokens": true}', 400, "max_tokens"),
        ("/v1/completions", b'{"model": "m", "prompt": 5}', 400, "prompt"),
        ("/v1/completions", b'{"model": "m"}', 400, "prompt"),
        ("/v1/chat/completions", b'{"model": "m", "messages": "hi"}', 400, "messages"),
        ("/v1/chat/completions", b'{"model": 7, "messages": []}', 400, "model"),
        ("/v1/chat/completions", b'{"model": "nope", "messages": []}', 404, "model"),
    ],
)
async def test_bad_requests(fake_pods, start_gateway, client, path, data, status, param):
    (pod,) = await fake_pods(1)
    gw = await start_gateway(pool_config([pod.url]))
    async with client.post(gw.url + path, data=data, headers={"X-Request-Id": "r1"}) as r:
        assert r.status == status
        assert r.headers["X-Request-Id"] == "r1"
        assert_openai_error(await r.json(), param=param)
    assert pod.seen == []  # rejected at the gateway


async def test_body_over_limit_is_413_with_and_without_content_length(fake_pods, start_gateway, client):
    (pod,) = await fake_pods(1)
    gw = await start_gateway(pool_config([pod.url], limits={"max_body_bytes": 1000}))
    big = b'{"model": "m", "prompt": "' + b"x" * 2000 + b'"}'

    async def chunked():
        for i in range(0, len(big), 100):
            yield big[i : i + 100]

    for data in (big, chunked()):
        async with client.post(gw.url + "/v1/completions", data=data) as r:
            assert r.status == 413
            assert_openai_error(await r.json(), code="request_too_large")
    assert pod.seen == []


async def test_unknown_route_is_openai_shaped_404(fake_pods, start_gateway, client):
    (pod,) = await fake_pods(1)
    gw = await start_gateway(pool_config([pod.url]))
    async with client.get(gw.url + "/nope") as r:
        assert r.status == 404
        assert_openai_error(await r.json())


async def test_pool_without_endpoints_is_503(fake_pods, start_gateway, client):
    # every pod ejected still serves (panic mode, test_gateway_health_panic.py); only a pool whose pods
    # were all removed (discovery) has nothing to try
    a, b = await fake_pods(2)
    gw = await start_gateway(pool_config([a.url, b.url]))
    pool = gw.app[STATE].pools.get("m")
    pool.update_endpoints([], list(pool.endpoints))
    async with client.post(gw.url + "/v1/chat/completions", json=CHAT) as r:
        assert r.status == 503
        assert_openai_error(await r.json(), code="no_healthy_endpoint")
    async with client.get(gw.url + "/ready") as r:
        assert r.status == 503
    assert a.seen == b.seen == []


async def test_every_attempt_failing_is_502(fake_pods, start_gateway, client):
    pods = await fake_pods(3)
    for pod in pods:
        pod.status = 503
    gw = await start_gateway(pool_config([p.url for p in pods], retries={"max_retries": 1}))
    async with client.post(gw.url + "/v1/chat/completions", json=CHAT) as r:
        assert r.status == 502
        assert_openai_error(await r.json(), code="upstream_failed")
    assert sum(len(p.seen) for p in pods) == 2  # the first attempt and one retry, on two pods
    assert all(len(p.seen) <= 1 for p in pods)


async def test_pod_error_other_than_retryable_passes_through(fake_pods, start_gateway, client):
    (pod,) = await fake_pods(1)
    pod.status = 400
    gw = await start_gateway(pool_config([pod.url]))
    async with client.post(gw.url + "/v1/chat/completions", json=CHAT) as r:
        assert r.status == 400
        assert (await r.json())["error"]["message"] == "pod says no"
        assert r.headers["x-kvgate-endpoint"] == pod.url
    assert len(pod.seen) == 1  # a 400 is the pod's verdict on the request: never retried


async def test_api_keys_from_file_and_env(fake_pods, start_gateway, client, tmp_path, monkeypatch):
    (pod,) = await fake_pods(1)
    keys = tmp_path / "keys"
    keys.write_text("# gateway keys\nfile-key\n\n")
    monkeypatch.setenv("KVGATE_TEST_KEYS", "env-key-1, env-key-2")
    gw = await start_gateway(
        pool_config([pod.url], auth={"api_keys_file": str(keys), "api_keys_env": "KVGATE_TEST_KEYS"})
    )
    url = gw.url + "/v1/chat/completions"
    for auth in (None, "Bearer wrong", "Basic file-key", "Bearer file-ke"):
        headers = {"Authorization": auth} if auth else {}
        async with client.post(url, json=CHAT, headers=headers) as r:
            assert r.status == 401
            assert_openai_error(await r.json(), code="invalid_api_key")
    for key in ("file-key", "env-key-1", "env-key-2"):
        async with client.post(url, json=CHAT, headers={"Authorization": f"Bearer {key}"}) as r:
            assert r.status == 200
    assert "Authorization" not in pod.seen[-1]["headers"]  # the gateway's key is not the pod's
    for open_path in ("/health", "/ready", "/metrics"):
        async with client.get(gw.url + open_path) as r:
            assert r.status == 200


async def test_graceful_shutdown_finishes_in_flight_stream_and_refuses_new(fake_pods, client):
    (pod,) = await fake_pods(1)
    pod.chunks, pod.chunk_delay = 5, 0.1
    app = build_app(pool_config([pod.url]))
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=5.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    async with client.post(url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        await r.content.readline()
        shutdown = asyncio.create_task(runner.cleanup())

        async def refused() -> bool:
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as probe:
                    await probe.get(url + "/health")
            except aiohttp.ClientConnectionError:
                return True
            return False

        await eventually(refused, within=2.0, what="the listener to close")
        with pytest.raises(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession() as fresh:
                await fresh.get(url + "/health")
        body = await r.read()
    await shutdown
    assert body.endswith(b"data: [DONE]\n\n")
    assert body.count(b"data: {") == 4  # the 4 chunks after the first line: nothing was cut
    assert app[STATE].pools.get("m").endpoints[0].in_flight == 0


async def test_every_response_carries_a_request_id(fake_pods, start_gateway, client):
    (pod,) = await fake_pods(1)
    gw = await start_gateway(pool_config([pod.url]))
    for method, path in (("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/completions")):
        async with client.request(method, gw.url + path, data=b"{") as r:
            assert len(r.headers["X-Request-Id"]) == 32, path
    async with client.get(gw.url + "/metrics") as r:
        text = await r.text()
    assert 'kvgate_requests_total{endpoint="",model="",status="400"} 1.0' in text

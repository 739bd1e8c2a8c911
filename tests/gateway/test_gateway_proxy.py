"""The proxy path against fake pods: pass-through, headers, streaming, retries, faults, cancellation."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest
from gateway_fakes import pool_config
from helpers import eventually

from gateway.state import STATE

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


async def test_non_stream_passes_body_and_names_pod(fake_pods, start_gateway, client):
    (pod,) = await fake_pods(1)
    gw = await start_gateway(pool_config([pod.url]))
    raw = b'{"model":"m",  "messages":[{"role":"user","content":"hi"}], "x_unknown": 1}'
    async with client.post(gw.url + "/v1/chat/completions", data=raw) as r:
        assert r.status == 200
        assert r.headers["x-kvgate-endpoint"] == pod.url
        assert r.headers["x-kvgate-cached-tokens"] == "0"
        request_id = r.headers["X-Request-Id"]
        assert len(request_id) >= 16
        assert (await r.json())["pod"] == "pod0"
    seen = pod.seen[-1]
    assert seen["raw"] == raw  # unchanged body: the original bytes, not a re-serialisation
    assert seen["headers"]["X-Request-Id"] == request_id


async def test_request_id_kept_and_hop_by_hop_dropped(fake_pods, start_gateway, client):
    (pod,) = await fake_pods(1)
    gw = await start_gateway(pool_config([pod.url]))
    headers = {"X-Request-Id": "abc-123", "Connection": "keep-alive, X-Secret", "X-Secret": "s",
               "Keep-Alive": "timeout=5", "Proxy-Authorization": "Basic x", "X-Custom": "kept"}  # fmt: skip
    async with client.post(gw.url + "/v1/chat/completions", json=CHAT, headers=headers) as r:
        assert r.status == 200
        assert r.headers["X-Request-Id"] == "abc-123"
        assert "Keep-Alive" not in r.headers
    sent = pod.seen[-1]["headers"]
    assert sent["x-request-id"] == "abc-123"
    assert sent["x-custom"] == "kept"
    for dropped in ("x-secret", "keep-alive", "proxy-authorization"):
        assert dropped not in sent


async def test_stream_arrives_chunk_by_chunk(fake_pods, start_gateway, client):
    (pod,) = await fake_pods(1)
    pod.chunks, pod.chunk_delay = 3, 0.3
    gw = await start_gateway(pool_config([pod.url]))
    async with client.post(gw.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        first = await r.content.readline()
        # the first event is here while the pod is still producing the rest: nothing was buffered
        assert first.startswith(b"data: ")
        assert pod.running == 1
        rest = await r.read()
    assert rest.endswith(b"data: [DONE]\n\n")
    assert rest.count(b"data: {") == 2


async def test_retry_on_503_goes_to_another_pod(fake_pods, start_gateway, client):
    bad, good = await fake_pods(2)
    bad.status = 503
    gw = await start_gateway(pool_config([bad.url, good.url], retries={"max_retries": 1}))
    for _ in range(4):
        async with client.post(gw.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
            assert r.headers["x-kvgate-endpoint"] == good.url
    assert len(good.seen) == 4


async def test_retry_on_refused_connection(fake_pods, start_gateway, client):
    dead, good = await fake_pods(2)
    gw = await start_gateway(pool_config([dead.url, good.url], health={"interval": 30}))
    await dead.stop()
    for _ in range(3):
        async with client.post(gw.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            assert r.status == 200
            assert r.headers["x-kvgate-endpoint"] == good.url
            assert (await r.read()).endswith(b"[DONE]\n\n")


async def test_pod_dying_mid_stream_ends_with_error_event_and_done(fake_pods, start_gateway, client):
    dying, steady = await fake_pods(2)
    dying.chunks, dying.die_after_chunks, dying.chunk_delay = 5, 2, 0.05
    steady.chunks, steady.chunk_delay = 6, 0.05
    gw = await start_gateway(pool_config([dying.url, steady.url], policy="round_robin"))

    async def stream() -> tuple[str, bytes]:
        async with client.post(gw.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            return r.headers["x-kvgate-endpoint"], await r.read()

    results = dict(await asyncio.gather(stream(), stream()))
    broken, intact = results[dying.url], results[steady.url]
    events = [e for e in broken.split(b"\n\n") if e]
    assert events[:2] == [b'data: {"pod":"pod0","i":0}', b'data: {"pod":"pod0","i":1}']  # no duplicate
    assert orjson.loads(events[2].removeprefix(b"data: "))["error"]["type"] == "upstream_error"
    assert events[3:] == [b"data: [DONE]"]
    assert intact.count(b'"pod":"pod1"') == 6 and intact.endswith(b"data: [DONE]\n\n")  # untouched


async def test_pod_dying_mid_plain_body_cuts_the_client_off(fake_pods, start_gateway, client):
    (pod,) = await fake_pods(1)
    pod.truncate_body = True
    gw = await start_gateway(pool_config([pod.url]))
    async with client.post(gw.url + "/v1/chat/completions", json=CHAT) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()  # a truncated body, never one that looks complete
    async with client.post(gw.url + "/v1/chat/completions", json=CHAT) as r:  # the gateway still serves
        assert r.status == 200


async def test_client_disconnect_cancels_upstream_and_restores_in_flight(fake_pods, start_gateway):
    (pod,) = await fake_pods(1)
    pod.chunks, pod.chunk_delay = 100, 0.05
    gw = await start_gateway(pool_config([pod.url]))
    session = aiohttp.ClientSession()
    r = await session.post(gw.url + "/v1/chat/completions", json={**CHAT, "stream": True})
    await r.content.readline()
    assert pod.running == 1
    r.close()
    await session.close()
    await eventually(lambda: pod.running == 0, within=3.0)
    assert pod.cancelled == 1
    assert gw.app[STATE].pools.get("m").endpoints[0].in_flight == 0


async def test_upstream_silence_gives_504(fake_pods, start_gateway, client):
    (pod,) = await fake_pods(1)
    pod.first_delay = 2.0
    gw = await start_gateway(pool_config([pod.url], timeouts={"read": 0.3}))
    async with client.post(gw.url + "/v1/chat/completions", json=CHAT) as r:
        assert r.status == 504
        assert (await r.json())["error"]["code"] == "upstream_timeout"


async def test_client_leaving_before_the_first_byte_cancels_upstream(fake_pods, start_gateway):
    (pod,) = await fake_pods(1)
    pod.first_delay = 5.0  # queued or prefilling at the pod
    gw = await start_gateway(pool_config([pod.url]))
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(session.post(gw.url + "/v1/chat/completions", json=CHAT))
        await eventually(lambda: pod.running == 1)
        task.cancel()
    await eventually(lambda: pod.running == 0, within=2.0)  # long before the 5 s answer
    assert pod.cancelled == 1
    assert gw.app[STATE].pools.get("m").endpoints[0].in_flight == 0

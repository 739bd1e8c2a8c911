"""End to end: the real gateway (a `kvgate serve` process, or in-process) in front of simulated vLLM
pods (bench.sim), driven by the unmodified openai SDK and by raw HTTP."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator

import aiohttp
import openai
import orjson
import pytest
from gateway_fakes import pool_config
from helpers import eventually

from bench.sim.fleet import SimFleet, SimFleetProcess
from gateway.state import STATE

# Pods that answer fast: the tests check behaviour, not the cost model.
FAST = {"model": "m", "itl_ms": 1.0, "itl_ms_per_seq": 0.0, "prefill_tps": 1e7, "seed": 1}
CHAT = [{"role": "user", "content": "Tell me about caches."}]


@pytest.fixture
async def fleet() -> AsyncIterator[SimFleet]:
    async with SimFleet(2, **FAST) as f:
        yield f


@pytest.fixture
async def serve_process(fleet: SimFleet) -> AsyncIterator[str]:
    """`kvgate serve` as a subprocess in front of the in-process fleet; yields its base URL."""
    args = [sys.executable, "-m", "gateway.cli", "serve", "--port", "0", "--model", "m",
            "--policy", "least_request", "--health-interval", "0.5", "--log-level", "WARNING"]  # fmt: skip
    for url in fleet.urls:
        args += ["--backend", url]
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert line.startswith(b"KVGATE_SERVE_READY "), line
    yield orjson.loads(line.split(b" ", 1)[1])["url"]
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 15) == 0  # graceful exit


def sync_sdk_calls(base_url: str) -> dict[str, object]:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    out: dict[str, object] = {}
    out["models"] = [m.id for m in client.models.list()]
    chat = client.chat.completions.with_raw_response.create(model="m", messages=CHAT, max_tokens=8)
    out["endpoint"] = chat.headers["x-kvgate-endpoint"]
    out["chat"] = chat.parse().choices[0].message.content
    stream = client.chat.completions.create(model="m", messages=CHAT, max_tokens=8, stream=True)
    out["chat_stream"] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    out["completion"] = client.completions.create(model="m", prompt="Hello", max_tokens=8).choices[0].text
    stream = client.completions.create(
        model="m", prompt="Hello", max_tokens=8, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    out["completion_stream"] = "".join(c.choices[0].text for c in chunks if c.choices)
    out["usage"] = chunks[-1].usage.completion_tokens if chunks[-1].usage else None
    try:
        client.chat.completions.create(model="nope", messages=CHAT)
    except openai.NotFoundError as exc:
        out["not_found"] = exc.status_code
    return out


async def test_openai_sdk_sync_through_serve_process(fleet, serve_process):
    # The sync client blocks, and the pods run in this event loop: call it from a thread.
    out = await asyncio.to_thread(sync_sdk_calls, serve_process)
    assert out["models"] == ["m"]
    assert out["endpoint"] in fleet.urls
    for key in ("chat", "chat_stream", "completion", "completion_stream"):
        assert isinstance(out[key], str) and out[key], key
    assert out["usage"] == 8
    assert out["not_found"] == 404


async def test_openai_sdk_async_through_serve_process(fleet, serve_process):
    client = openai.AsyncOpenAI(base_url=serve_process + "/v1", api_key="unused", max_retries=0)
    chat = await client.chat.completions.create(model="m", messages=CHAT, max_tokens=6)
    assert chat.choices[0].message.content and chat.usage.completion_tokens == 6
    parts = []
    async for chunk in await client.chat.completions.create(
        model="m", messages=CHAT, max_tokens=6, stream=True
    ):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
    assert "".join(parts)
    completion = await client.completions.create(model="m", prompt="Hi there", max_tokens=4)
    assert completion.choices[0].text
    n = 0
    async for _chunk in await client.completions.create(model="m", prompt="Hi", max_tokens=4, stream=True):
        n += 1
    assert n >= 4
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="m", messages="not a list")  # type: ignore[arg-type]
    await client.close()


async def test_client_disconnect_frees_the_pods_slot(start_gateway):
    async with SimFleet(1, **{**FAST, "itl_ms": 20.0}) as fleet:
        gw = await start_gateway(pool_config(fleet.urls))
        pod_metrics = fleet.urls[0] + "/metrics"
        async with aiohttp.ClientSession() as probe:

            async def running() -> float:
                async with probe.get(pod_metrics) as r:
                    text = await r.text()
                return float(
                    text.split('vllm:num_requests_running{engine="0",model_name="m"} ')[1].split()[0]
                )

            session = aiohttp.ClientSession()
            body = {"model": "m", "messages": CHAT, "max_tokens": 2000, "stream": True, "ignore_eos": True}
            r = await session.post(gw.url + "/v1/chat/completions", json=body)
            await r.content.readline()
            async def running_is(n: float) -> bool:
                return await running() == n

            await eventually(lambda: running_is(1.0), within=5.0, what="the pod to run the request")
            r.close()
            await session.close()
            # the whole answer would take 40 s
            await eventually(lambda: running_is(0.0), within=5.0, what="the pod to drop the request")
        assert fleet.pods[0].engine.running == []
        assert gw.app[STATE].pools.get("m").endpoints[0].in_flight == 0


async def test_killed_pod_requests_are_retried_on_live_pods(start_gateway):
    async with SimFleetProcess(3, **FAST) as fleet:
        # long health interval: only the retry path can save these requests
        gw = await start_gateway(pool_config(fleet.urls, health={"interval": 60}, retries={"max_retries": 2}))
        await fleet.kill(0)
        async with aiohttp.ClientSession() as client:
            for stream in (True, False) * 4:
                body = {"model": "m", "messages": CHAT, "max_tokens": 4, "stream": stream}
                async with client.post(gw.url + "/v1/chat/completions", json=body) as r:
                    assert r.status == 200
                    assert r.headers["x-kvgate-endpoint"] in fleet.urls[1:]
                    text = await r.read()
                    assert text.endswith(b"[DONE]\n\n") if stream else orjson.loads(text)["choices"]
            async with client.get(gw.url + "/metrics") as r:
                metrics = await r.text()
        assert 'kvgate_retries_total{model="m"}' in metrics
        assert f'kvgate_upstream_errors_total{{endpoint="{fleet.urls[0]}",kind="connect"}}' in metrics


async def test_sim_pod_down_is_ejected_and_readmitted(start_gateway):
    async with SimFleet(3, **FAST) as fleet:
        gw = await start_gateway(pool_config(fleet.urls, health={"interval": 0.2}))
        endpoint = gw.app[STATE].pools.get("m").endpoints[1]
        await fleet.pods[1].stop()
        await eventually(lambda: not endpoint.healthy, within=0.4, what="the ejection (two check intervals)")
        async with aiohttp.ClientSession() as client:

            async def served(n: int) -> set[str]:
                urls = set()
                for _ in range(n):
                    body = {"model": "m", "prompt": "x", "max_tokens": 2}
                    async with client.post(gw.url + "/v1/completions", json=body) as r:
                        assert r.status == 200
                        urls.add(r.headers["x-kvgate-endpoint"])
                return urls

            assert fleet.urls[1] not in await served(9)
            assert not endpoint.healthy
            await fleet.pods[1].start()
            await eventually(lambda: endpoint.healthy, within=2.0)
            assert fleet.urls[1] in await served(9)


async def test_serve_without_model_asks_the_first_backend(fleet):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "serve", "--port", "0", "--backend", fleet.urls[0],
        "--log-level", "WARNING", stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        ready = orjson.loads(line.split(b" ", 1)[1])
        assert ready["models"] == ["m"]
        async with aiohttp.ClientSession() as client, client.get(ready["url"] + "/v1/models") as r:
            assert [m["id"] for m in (await r.json())["data"]] == ["m"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0

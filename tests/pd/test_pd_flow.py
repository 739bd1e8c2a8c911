"""The P/D two-step flow end to end: simulated prefill and decode pods behind recorders, real sockets."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest
from helpers import eventually
from pd_harness import MODEL, PDWorld, PodSpec, long_prompt

from gateway.config import PDSpec
from gateway.pd_flow import PREFILL_TRANSFER_PARAMS, X_PREFILL_ENDPOINT
from router.policy import RouteRequest

PD = PDSpec(threshold_tokens=64, prefill_timeout_s=5.0)
PAIR = [PodSpec("prefill", "v1"), PodSpec("decode", "v1")]


async def test_prefill_gets_the_exact_request_shape_and_decode_gets_its_params(pd_world, client):
    world: PDWorld = await pd_world(PAIR, pd=PD)
    body = {"model": MODEL, "prompt": long_prompt(300), "max_tokens": 5, "temperature": 0}
    async with client.post(world.url + "/v1/completions", json=body, headers={"X-Request-Id": "rid-1"}) as r:
        assert r.status == 200
        answer = await r.json()
        assert r.headers["x-kvgate-endpoint"] == world.recorders[1].url
        assert r.headers[X_PREFILL_ENDPOINT] == world.recorders[0].url
    assert answer["usage"]["completion_tokens"] == 5
    assert answer.get("kv_transfer_params") is None  # the decode pod's answer, not the prefill's

    (prefill,) = world.recorders[0].generations()
    assert prefill.body == {
        **body,
        "kv_transfer_params": PREFILL_TRANSFER_PARAMS,
        "stream": False,
        "max_tokens": 1,
        "max_completion_tokens": 1,
    }
    assert prefill.headers["X-Request-Id"] == "rid-1"

    (decode,) = world.recorders[1].generations()
    params = decode.body.pop("kv_transfer_params")
    assert decode.body == body
    assert decode.headers["X-Request-Id"] == "rid-1"
    assert params["do_remote_prefill"] is True
    assert params["remote_engine_id"] == world.pod(0).engine_id
    assert params["remote_port"] == world.pod(0).port and params["remote_block_ids"]
    assert world.outcomes()["disaggregated"] == 1
    assert world.sample("kvgate_pd_prefill_duration_seconds_count", model=MODEL, result="ok") == 1
    await eventually(lambda: world.in_flight() == 0, what="no request in flight")


async def test_streaming_chat_through_the_flow_with_the_openai_sdk(pd_world):
    world: PDWorld = await pd_world(PAIR, pd=PD)
    sdk = openai.AsyncOpenAI(base_url=world.url + "/v1", api_key="unused", max_retries=0)
    try:
        raw = await sdk.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=[{"role": "user", "content": long_prompt(200)}],
            max_completion_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
        assert raw.headers[X_PREFILL_ENDPOINT] == world.recorders[0].url
        stream = raw.parse()
        text, usage = [], None
        async for chunk in stream:
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
            if chunk.usage is not None:
                usage = chunk.usage
    finally:
        await sdk.close()
    assert usage is not None and usage.completion_tokens == 12
    assert len("".join(text).split()) == 12
    (prefill,) = world.recorders[0].generations()
    assert prefill.body["stream"] is False and "stream_options" not in prefill.body
    assert prefill.body["max_completion_tokens"] == 1 and prefill.body["max_tokens"] == 1
    (decode,) = world.recorders[1].generations()
    assert decode.body["stream"] is True and decode.body["stream_options"] == {"include_usage": True}
    assert decode.body["kv_transfer_params"]["remote_engine_id"] == world.pod(0).engine_id


async def test_short_prompts_skip_the_prefill_pod(pd_world, client):
    world: PDWorld = await pd_world(PAIR, pd=PD)
    body = {"model": MODEL, "prompt": long_prompt(20), "max_tokens": 3}
    async with client.post(world.url + "/v1/completions", json=body) as r:
        assert r.status == 200
        assert X_PREFILL_ENDPOINT not in r.headers
        await r.read()
    assert world.recorders[0].generations() == []
    (decode,) = world.recorders[1].generations()
    assert decode.body == body
    assert world.outcomes() == {
        "disaggregated": 0, "local_short": 1, "local_no_prefill": 0, "fallback_prefill_failed": 0,
    }  # fmt: skip


async def test_a_prompt_cached_on_the_decode_pod_is_not_prefilled_again(pd_world, client):
    world: PDWorld = await pd_world(PAIR, pd=PD, policy="cache_aware")
    body = {"model": MODEL, "prompt": long_prompt(400), "max_tokens": 2}
    for _ in range(2):
        async with client.post(world.url + "/v1/completions", json=body) as r:
            assert r.status == 200
            await r.read()
    assert len(world.recorders[0].prefills()) == 1
    assert world.outcomes()["disaggregated"] == 1 and world.outcomes()["local_short"] == 1


@pytest.mark.parametrize("fault", ["error", "missing_params"])
async def test_a_failing_prefill_falls_back_to_local_prefill(pd_world, client, fault):
    specs = PAIR if fault == "error" else [PodSpec("both", "v1", gateway_role="prefill"), PAIR[1]]
    world: PDWorld = await pd_world(specs, pd=PD)
    if fault == "error":
        world.recorders[0].fail_status = 500
    body = {"model": MODEL, "prompt": long_prompt(300), "max_tokens": 4}
    async with client.post(world.url + "/v1/completions", json=body) as r:
        assert r.status == 200
        assert r.headers["x-kvgate-endpoint"] == world.recorders[1].url
        assert X_PREFILL_ENDPOINT not in r.headers
        answer = await r.json()
    assert answer["usage"]["completion_tokens"] == 4
    assert len(world.recorders[0].prefills()) == 1
    (decode,) = world.recorders[1].generations()
    assert decode.body == body  # prefilled locally: no transfer params
    assert world.outcomes()["fallback_prefill_failed"] == 1
    missing = world.sample(
        "kvgate_pd_transfer_params_missing_total", model=MODEL, endpoint=world.recorders[0].url
    )
    assert missing == (1 if fault == "missing_params" else 0)


async def test_a_slow_prefill_times_out_and_falls_back(pd_world, client):
    world: PDWorld = await pd_world(PAIR, pd=PDSpec(threshold_tokens=64, prefill_timeout_s=0.3))
    world.recorders[0].stall_s = 30.0
    body = {"model": MODEL, "prompt": long_prompt(300), "max_tokens": 4, "stream": True}
    async with client.post(world.url + "/v1/completions", json=body) as r:
        assert r.status == 200
        text = await r.text()
    assert text.endswith("data: [DONE]\n\n") and "error" not in text
    await eventually(lambda: world.recorders[0].cancelled == 1, what="the stalled prefill to be cancelled")
    assert world.outcomes()["fallback_prefill_failed"] == 1
    assert world.sample("kvgate_pd_prefill_duration_seconds_count", model=MODEL, result="timeout") == 1


async def test_client_disconnect_during_prefill_cancels_it(pd_world, client):
    world: PDWorld = await pd_world(PAIR, pd=PD)
    world.recorders[0].stall_s = 30.0
    body = {"model": MODEL, "prompt": long_prompt(300), "max_tokens": 4}
    with pytest.raises(TimeoutError):
        async with client.post(
            world.url + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=0.5)
        ) as r:
            await r.read()
    await eventually(lambda: world.recorders[0].cancelled == 1, what="the prefill step to be cancelled")
    await eventually(lambda: world.in_flight() == 0, what="no request in flight")
    assert world.recorders[1].generations() == []  # the decode step never started


async def test_client_disconnect_during_decode_aborts_the_decode_pod(pd_world, client):
    world: PDWorld = await pd_world(PAIR, pd=PD, itl_ms=5.0)
    body = {"model": MODEL, "prompt": long_prompt(300), "max_tokens": 2000, "stream": True}
    async with client.post(world.url + "/v1/completions", json=body) as r:
        assert r.status == 200
        await r.content.readany()
        decode_engine = world.pod(1).engine
        assert decode_engine is not None and decode_engine.running
    # the response is closed here, long before 2000 tokens
    await eventually(lambda: not decode_engine.running and not decode_engine.waiting,
                     what="the decode pod to abort")
    await eventually(lambda: world.recorders[1].cancelled == 1, what="the recorder to see the disconnect")


async def test_bad_input_gets_the_pods_openai_error_not_a_hang(pd_world, client):
    world: PDWorld = await pd_world(PAIR, pd=PD)
    body = {"model": MODEL, "prompt": long_prompt(300), "max_tokens": -1}
    async with client.post(world.url + "/v1/completions", json=body) as r:
        assert r.status == 400
        error = (await r.json())["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert "max_tokens" in error["message"]
    # the prefill copy (max_tokens 1) was valid; the decode pod judged the client's request
    (decode,) = world.recorders[1].generations()
    assert decode.body["max_tokens"] == -1


async def test_the_prefill_pick_follows_the_prompt_prefix(pd_world, client):
    specs = [PodSpec("prefill", "v1"), PodSpec("prefill", "v1"), PodSpec("decode", "v1")]
    world: PDWorld = await pd_world(specs, pd=PD, policy="cache_aware")
    shared = long_prompt(400, "shared")
    firsts = []
    for i in range(4):
        body = {"model": MODEL, "prompt": f"{shared} {long_prompt(150, f'q{i}')}", "max_tokens": 2}
        async with client.post(world.url + "/v1/completions", json=body) as r:
            assert r.status == 200
            firsts.append(r.headers[X_PREFILL_ENDPOINT])
            await r.read()
    assert len(set(firsts)) == 1  # the prefill pod that holds the shared prefix keeps getting it
    assert world.outcomes()["disaggregated"] == 4


async def test_a_decode_retry_pairs_again_from_the_clients_request(pd_world, client):
    specs = [PodSpec("prefill", "v1"), PodSpec("decode", "v1"), PodSpec("decode", "v1")]
    world: PDWorld = await pd_world(specs, pd=PD)
    world.recorders[1].fail_status = 503  # retryable: the proxy tries the other decode pod
    for i in range(4):
        body = {"model": MODEL, "prompt": long_prompt(300, f"r{i}"), "max_tokens": 3}
        headers = {"X-Request-Id": f"r{i}"}
        async with client.post(world.url + "/v1/completions", json=body, headers=headers) as r:
            assert r.status == 200
            assert r.headers["x-kvgate-endpoint"] == world.recorders[2].url
            assert r.headers[X_PREFILL_ENDPOINT] == world.recorders[0].url
            assert (await r.json())["usage"]["completion_tokens"] == 3
    served = world.recorders[2].decodes()
    assert len(served) == 4
    for seen in served:
        params = seen.body.pop("kv_transfer_params")
        assert params["do_remote_prefill"] is True
        assert seen.body["prompt"] == long_prompt(300, seen.headers["X-Request-Id"])
        assert set(seen.body) == {"model", "prompt", "max_tokens"}
    failed = world.recorders[1].decodes()
    assert failed, "the seeded picks never tried the failing pod: the test would prove nothing"
    prefills = world.recorders[0].prefills()
    assert len(prefills) == len(served) + len(failed)  # each attempt ran its own prefill step


async def test_precise_index_learns_both_pods_blocks_from_their_events(pd_world, client):
    precise = {"index": "precise", "pending_blocks": 0}  # the index knows only what the events say
    world: PDWorld = await pd_world(PAIR, pd=PD, policy="cache_aware", policy_params=precise, kv_events=True)
    body = {"model": MODEL, "prompt": long_prompt(320), "max_tokens": 2}
    async with client.post(world.url + "/v1/completions", json=body) as r:
        assert r.status == 200
        assert r.headers[X_PREFILL_ENDPOINT] == world.recorders[0].url
        await r.read()
    cache = world.pool.prefix_cache
    assert cache is not None
    keys = cache.keys_for(RouteRequest("probe", MODEL, "/v1/completions", body, {}))
    prefill, decode = world.endpoint(0), world.endpoint(1)

    def held() -> dict:
        return cache.index.match(keys, [prefill, decode])

    # 320 tokens = 20 full blocks; both pods report them (the decode pod after pulling the KV)
    await eventually(lambda: held().get(prefill, 0) >= 19 and held().get(decode, 0) >= 19,
                     what="both pods' events")


async def test_a_failed_decode_after_a_prefill_forgets_what_it_taught_the_decode_pod(pd_world, client):
    """The prefill step runs the policy hooks inside the decode attempt's: its record must not replace
    the decode attempt's, or a decode that fails leaves the decode pod credited with blocks it never got."""
    world: PDWorld = await pd_world(PAIR, pd=PD, policy="cache_aware", retries=0)
    world.recorders[1].fail_status = 503  # the decode pod refuses; the prefill pod answers
    body = {"model": MODEL, "prompt": long_prompt(320), "max_tokens": 2}
    async with client.post(world.url + "/v1/completions", json=body) as r:
        assert r.status == 502
    assert world.recorders[0].prefills() and world.recorders[1].decodes()  # both steps ran
    cache = world.pool.prefix_cache
    assert cache is not None
    keys = cache.keys_for(RouteRequest("probe", MODEL, "/v1/completions", body, {}))
    prefill, decode = world.endpoint(0), world.endpoint(1)
    await eventually(lambda: world.in_flight() == 0, what="no request in flight")
    assert cache.match(keys, [prefill, decode]) == {prefill: 20}  # the prefill succeeded: kept


async def test_prefill_work_is_charged_to_the_prefill_pod_while_it_runs(pd_world, client):
    world: PDWorld = await pd_world(PAIR, pd=PD, policy="cache_aware")
    world.recorders[0].stall_s = 30.0
    body = {"model": MODEL, "prompt": long_prompt(300), "max_tokens": 2}
    task = asyncio.create_task(client.post(world.url + "/v1/completions", json=body))
    await eventually(lambda: bool(world.recorders[0].prefills()), what="the prefill step")
    prefill, decode = world.endpoint(0), world.endpoint(1)
    assert (prefill.in_flight, prefill.in_flight_tokens) == (1, 300)
    assert (decode.in_flight, decode.in_flight_tokens) == (1, 0)
    task.cancel()
    await eventually(lambda: world.recorders[0].cancelled == 1, what="the prefill step to be cancelled")
    await eventually(lambda: world.in_flight() == 0, what="no request in flight")
    assert prefill.in_flight_tokens == 0 and decode.in_flight_tokens == 0

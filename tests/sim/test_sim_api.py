"""The simulator's OpenAI API over real HTTP: shapes of vLLM 0.32, streamed and not."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
from helpers import eventually
from sim_helpers import FAST, post, sse

from bench.sim.fleet import SimFleet
from bench.sim.pod import SimPod

WORDS = " ".join(f"w{i}" for i in range(100))  # 100 WordTokenizer tokens


async def test_completion_text_prompt(pod: SimPod, http: aiohttp.ClientSession) -> None:
    status, body = await post(http, pod.url + "/v1/completions",
                              {"model": "sim-model", "prompt": WORDS, "max_tokens": 7})
    assert status == 200
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == "sim-model"
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert len(choice["text"].split()) == 7  # one token per generated word
    assert body["usage"] == {
        "prompt_tokens": 100, "total_tokens": 107, "completion_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 0, "created_cache_tokens": None,
                                  "multimodal_tokens": None},
        "completion_tokens_details": None,
    }
    assert body["kv_transfer_params"] is None
    assert body["system_fingerprint"].startswith("vllm-0.32.0-")


async def test_generated_text_deterministic(pod: SimPod, http: aiohttp.ClientSession) -> None:
    body = {"prompt": WORDS, "max_tokens": 12}
    _, a = await post(http, pod.url + "/v1/completions", body)
    _, b = await post(http, pod.url + "/v1/completions", body)
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    _, tok = await post(http, pod.url + "/tokenize", {"prompt": a["choices"][0]["text"]})
    assert tok["count"] == 12


async def test_completion_prompt_forms(pod: SimPod, http: aiohttp.ClientSession) -> None:
    url = pod.url + "/v1/completions"
    _, ids = await post(http, pod.url + "/tokenize", {"prompt": "a b c"})
    for prompt, n_choices, n_prompt in [
        (["a b c", "d e"], 2, 5),
        (ids["tokens"], 1, 3),
        ([ids["tokens"], [5, 6, 7, 8]], 2, 7),
    ]:
        status, body = await post(http, url, {"prompt": prompt, "max_tokens": 2})
        assert status == 200, body
        assert [c["index"] for c in body["choices"]] == list(range(n_choices))
        assert body["usage"]["prompt_tokens"] == n_prompt
        assert body["usage"]["completion_tokens"] == 2 * n_choices


async def test_max_tokens_default_and_context_clamp(http: aiohttp.ClientSession) -> None:
    from sim_helpers import FAST

    from bench.sim.fleet import SimFleet

    async with SimFleet(1, **FAST, max_model_len=40) as fleet:
        url = fleet.urls[0] + "/v1/completions"
        _, body = await post(http, url, {"prompt": "x " * 10})
        assert body["usage"]["completion_tokens"] == 16  # vLLM's CompletionRequest default
        _, body = await post(http, url, {"prompt": "x " * 30, "max_tokens": 30})
        assert body["usage"]["completion_tokens"] == 10  # clamped to the context left
        assert body["choices"][0]["finish_reason"] == "length"


async def test_chat_completion(pod: SimPod, http: aiohttp.ClientSession) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    status, body = await post(http, pod.url + "/v1/chat/completions",
                              {"model": "sim-model", "messages": messages, "max_tokens": 4})
    assert status == 200
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    msg = body["choices"][0]["message"]
    assert msg["role"] == "assistant" and len(msg["content"].split()) == 4
    _, tok = await post(http, pod.url + "/tokenize", {"messages": messages})
    assert body["usage"]["prompt_tokens"] == tok["count"]
    status, body = await post(http, pod.url + "/v1/chat/completions",
                              {"messages": messages, "max_completion_tokens": 3})
    assert body["usage"]["completion_tokens"] == 3


async def test_request_id_header(pod: SimPod, http: aiohttp.ClientSession) -> None:
    async with http.post(pod.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1},
                         headers={"X-Request-Id": "req-42"}) as resp:
        body = await resp.json()
        assert "X-Request-Id" not in resp.headers  # vLLM's default
    assert body["id"] == "cmpl-req-42"
    async with SimFleet(1, **FAST, enable_request_id_headers=True) as fleet:
        async with http.post(fleet.urls[0] + "/v1/completions", json={"prompt": "hi", "max_tokens": 1},
                             headers={"X-Request-Id": "req-43"}) as resp:
            assert resp.headers["X-Request-Id"] == "req-43"
    async with http.post(pod.url + "/v1/chat/completions", headers={"X-Request-Id": "r7"},
                         json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}) as resp:
        assert (await resp.json())["id"] == "chatcmpl-r7"


async def test_completion_stream_with_usage(pod: SimPod, http: aiohttp.ClientSession) -> None:
    events = await sse(http, pod.url + "/v1/completions", {
        "prompt": WORDS, "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 100, "total_tokens": 105, "completion_tokens": 5,
                                    "prompt_tokens_details": {"cached_tokens": 0}}
    assert usage_chunk["system_fingerprint"].startswith("vllm-")
    assert all("system_fingerprint" not in c for c in events[:-2])
    chunks = events[:-2]
    assert all(c["object"] == "text_completion" and c["id"] == usage_chunk["id"] for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["text"] for c in chunks)
    _, full = await post(http, pod.url + "/v1/completions", {"prompt": WORDS, "max_tokens": 5})
    assert text == full["choices"][0]["text"]


async def test_chat_stream_without_usage(pod: SimPod, http: aiohttp.ClientSession) -> None:
    events = await sse(http, pod.url + "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all("usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "system_fingerprint" in chunks[-1]  # no usage chunk follows
    assert len("".join(c["choices"][0]["delta"].get("content", "") for c in chunks).split()) == 3


async def test_cached_tokens_on_repeat(pod: SimPod, http: aiohttp.ClientSession) -> None:
    body = {"prompt": WORDS, "max_tokens": 1}
    _, first = await post(http, pod.url + "/v1/completions", body)
    _, second = await post(http, pod.url + "/v1/completions", body)
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # full blocks of the first 99 tokens: vLLM recomputes the last prompt token
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 96
    salted = {**body, "cache_salt": "tenant-b"}
    _, third = await post(http, pod.url + "/v1/completions", salted)
    assert third["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


async def test_models_health_tokenize(pod: SimPod, http: aiohttp.ClientSession) -> None:
    async with http.get(pod.url + "/v1/models") as resp:
        models = await resp.json()
    assert models["object"] == "list"
    (card,) = models["data"]
    assert card["id"] == "sim-model" and card["object"] == "model" and card["max_model_len"] == 32768
    assert card["owned_by"] == "vllm"
    async with http.get(pod.url + "/health") as resp:
        assert resp.status == 200 and await resp.read() == b""
    status, tok = await post(http, pod.url + "/tokenize", {"prompt": "Hello, world!"})
    assert status == 200
    assert tok["count"] == len(tok["tokens"]) == 4 and tok["max_model_len"] == 32768


async def test_openai_sdk(pod: SimPod) -> None:
    client = openai.AsyncOpenAI(base_url=pod.url + "/v1", api_key="unused", max_retries=0)
    try:
        done = await client.completions.create(model="sim-model", prompt="hello", max_tokens=3)
        assert done.usage.completion_tokens == 3
        stream = await client.chat.completions.create(
            model="sim-model", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        assert chunks[-1].usage.completion_tokens == 4
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 0
        models = await client.models.list()
        assert [m.id for m in models.data] == ["sim-model"]
        try:
            await client.completions.create(model="nope", prompt="x", max_tokens=1)
        except openai.NotFoundError as exc:
            assert "The model `nope` does not exist." in str(exc)
        else:
            raise AssertionError("unknown model accepted")
    finally:
        await client.close()


async def test_client_disconnect_aborts(pod: SimPod, http: aiohttp.ClientSession) -> None:
    async with http.post(pod.url + "/v1/completions",
                         json={"prompt": "x", "max_tokens": 10_000, "stream": True}) as resp:
        await resp.content.readline()
    engine = pod.engine
    assert engine is not None
    await eventually(lambda: not engine.running and not engine.waiting, within=2.0,
                     what="the engine to drop the abandoned request")
    assert engine.pool.usage == 0.0


async def test_chat_stream_sends_its_first_chunk_after_prefill() -> None:
    """vLLM sends a chat stream's role chunk on the first engine output: the first byte a gateway sees
    comes after the prefill (a lower bound of the modelled prefill time: a busy machine only adds)."""
    prompt = " ".join(f"w{i % 500}" for i in range(2000))
    async with SimFleet(1, model="sim-model", prefill_tps=4000.0) as fleet:
        async with aiohttp.ClientSession() as http:
            body = {"model": "sim-model", "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": 2, "stream": True}
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            async with http.post(fleet.urls[0] + "/v1/chat/completions", json=body) as resp:
                first = await resp.content.readany()
                waited = loop.time() - t0
                rest = await resp.read()
    assert b'"role":"assistant"' in first
    assert waited >= 0.4  # 2000 uncached tokens at 4000 tokens/s: 0.5 s of prefill
    assert rest.endswith(b"data: [DONE]\n\n")

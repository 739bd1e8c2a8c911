"""The simulator against the recordings of a real vLLM in tests/fixtures/vllm: no vLLM needed.

scripts/capture_vllm.py sent a fixed script of requests to a real vLLM 0.32 and saved every exchange
(with its `order`) and every KV-event message. Here a fresh simulated pod, configured like the recorded
one (its tokenizer, block size, cache blocks, context length, topic), gets the same requests in the
same order, so its cache goes through the same states: responses, errors, metrics and KV-event batches
are compared with the comparators of test_sim_fidelity.py. Block hashes are not compared (vLLM seeds
them per process); their chaining is.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
import zmq.asyncio
from test_sim_fidelity import (
    Reply,
    batch_summary,
    chained,
    check,
    chunk_kinds,
    compare_event_layouts,
    compare_frames,
    compare_json,
    compare_metrics,
    compare_stream,
    families,
    replay,
    sample_value,
    shape_diff,
    token_counts,
    value_diff,
)

from bench.sim.fleet import SimFleet

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "vllm"
# scenario of kv_events/ -> the recorded exchanges that caused it (scripts/capture_vllm.py)
SCENARIOS: dict[str, list[str]] = {
    "first_prompt": ["events_first_prompt"],
    "repeated_prompt": ["events_repeated_prompt"],
    "decode_filled": ["events_decode_filled"],
    "cache_salt": ["events_cache_salt"],
    "chat": ["events_chat"],
    "eviction": [f"events_eviction_{i}" for i in range(6)],
    "reset_prefix_cache": ["reset_prefix_cache"],
    "after_reset_prompt": ["events_after_reset"],
}
# Exchanges whose recording cannot apply to the simulator, and why.
NOT_COMPARABLE = {
    "completion_kv_transfer_params": "the recorded pod had no KV connector, so it ignored kv_transfer_params",
}


def records() -> list[dict[str, Any]]:
    """Every recorded exchange, in the order it was sent."""
    out = [json.loads(p.read_text()) for p in sorted((FIXTURES / "http").glob("*.json"))]
    return sorted(out, key=lambda r: r["order"])


def recorded_messages(scenario: str) -> list[list[bytes]]:
    return [list(m) for m in msgpack.unpackb((FIXTURES / "kv_events" / f"{scenario}.msgpack").read_bytes())]


def metrics_value(text: str, family: str, label: str) -> str:
    fam = families(text)[family]
    return fam.samples[0].labels[label]


def as_reply(record: dict[str, Any]) -> Reply:
    resp = record["response"]
    raw = bytes.fromhex(resp["body_hex"]) if "body_hex" in resp else resp["body"].encode()
    return Reply(resp["status"], {k: v for k, v in resp["headers"]}, raw)


@pytest.fixture
async def sim_pod() -> AsyncIterator[tuple[Any, dict[str, Any]]]:
    """A simulated pod configured like the recorded vLLM, with its KV events bound on OS-chosen ports."""
    meta = json.loads((FIXTURES / "meta.json").read_text())
    metrics_text = (FIXTURES / "metrics.txt").read_text()
    async with SimFleet(
        1,
        model=meta["model"],
        tokenizer=str(FIXTURES / "model"),
        block_size=meta["block_size"],
        num_gpu_blocks=int(metrics_value(metrics_text, "vllm:cache_config_info", "num_gpu_blocks")),
        max_model_len=meta["max_model_len"],
        max_num_seqs=meta["max_num_seqs"],
        prefill_tps=1e7,
        itl_ms=0.01,
        itl_ms_per_seq=0.0,
        kv_events_endpoint="tcp://127.0.0.1:*",
        kv_events_replay_endpoint="tcp://127.0.0.1:*",
        kv_events_topic=meta["topic"],
    ) as fleet:
        yield fleet.pods[0], fleet.ready_infos()[0]


async def send(http: aiohttp.ClientSession, url: str, request: dict[str, Any]) -> Reply:
    """The recorded request again: JSON bodies re-encoded, raw (string) bodies sent as they were."""
    body = request["body"]
    if isinstance(body, str):
        data: bytes | None = body.encode()
    else:
        data = json.dumps(body).encode() if body is not None else None
    async with http.request(request["method"], url + request["path"], data=data,
                            headers=request["headers"]) as resp:  # fmt: skip
        return Reply(resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read())


async def settle(pod: Any) -> None:
    """Wait until the simulated engine has nothing running or waiting, so its events are published."""
    async with asyncio.timeout(30):
        # the engine exposes its queues, not an idle event: poll them (a few ms per request)
        while pod.engine.running or pod.engine.waiting:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        await asyncio.sleep(0)


def compare_exchange(name: str, real: Reply, sim: Reply) -> list[str]:
    """One recorded exchange against the sim's answer, by the kind of answer vLLM gave."""
    ctype = real.headers.get("content-type", "")
    if name == "metrics":
        if real.status != sim.status:
            return [f"metrics: status {real.status} in vLLM, {sim.status} in sim"]
        out = []
        if ctype != sim.headers.get("content-type"):
            out.append(f"metrics: content-type {ctype!r} in vLLM, {sim.headers.get('content-type')!r} in sim")
        return out
    if ctype.startswith("text/event-stream"):
        return compare_stream(name, real, sim)
    if not ctype.startswith("application/json"):
        if (real.status, real.raw) != (sim.status, sim.raw):
            return [f"{name}: {real.status} {real.raw[:40]!r} in vLLM, {sim.status} {sim.raw[:40]!r} in sim"]
        return []
    if real.status != sim.status:
        return [f"{name}: status {real.status} in vLLM, {sim.status} in sim"]
    r_json, s_json = real.json, sim.json
    if isinstance(r_json, dict) and "error" in r_json:
        paths = ["error.type", "error.param", "error.code"]
        if r_json["error"]["type"] != "Bad Request":
            paths.append("error.message")
        return [f"{name}: {d}" for d in shape_diff(r_json, s_json) + value_diff(r_json, s_json, paths)]
    values = ["object", "model", "usage", "choices.0.finish_reason", "count", "tokens", "success"]
    return compare_json(name, real, sim, [v for v in values if _has(r_json, v)])


def _has(obj: Any, path: str) -> bool:
    for part in path.split("."):
        if isinstance(obj, list) and part.isdigit() and int(part) < len(obj):
            obj = obj[int(part)]
        elif isinstance(obj, dict) and part in obj:
            obj = obj[part]
        else:
            return False
    return True


async def test_recorded_script_replays_identically(sim_pod: tuple[Any, dict[str, Any]]) -> None:
    """Every recorded exchange and KV-event scenario, replayed in order, matches the recording."""
    pod, info = sim_pod
    diffs: list[str] = []
    seq_after: dict[str, int] = {}
    sim_metrics = ""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        for record in records():
            name = record["name"]
            sim = await send(http, info["url"], record["request"])
            await settle(pod)
            seq_after[name] = pod.publisher.seq
            if name == "metrics":
                sim_metrics = sim.raw.decode()
            if name in NOT_COMPARABLE:
                continue
            diffs += compare_exchange(name, as_reply(record), sim)

    # metrics: the same families and labels, and the same token counts after the same requests
    recorded = families((FIXTURES / "metrics.txt").read_text())
    simulated = families(sim_metrics)
    diffs += compare_metrics(recorded, simulated)
    for counter in ("vllm:prompt_tokens_total", "vllm:prefix_cache_queries_total",
                    "vllm:prefix_cache_hits_total"):  # fmt: skip
        r, s = sample_value(recorded, counter), sample_value(simulated, counter)
        if r != s:
            diffs.append(f"metrics: {counter} = {r:g} in vLLM, {s:g} in sim")

    # KV events: the batches each scenario published, fetched back through the replay socket
    ctx = zmq.asyncio.Context()
    try:
        replies = await replay(ctx, info["kv_events_replay"], 0)
    finally:
        ctx.destroy(linger=0)
    published = [r[1:] for r in replies[:-1]]
    for scenario, names in SCENARIOS.items():
        order = [r["name"] for r in records()]
        before = order[order.index(names[0]) - 1]
        sim_msgs = [m for m in published
                    if seq_after[before] <= int.from_bytes(m[1], "big") < seq_after[names[-1]]]  # fmt: skip
        real_msgs = recorded_messages(scenario)
        if scenario == "decode_filled":  # generated tokens differ (random weights vs sim text)
            if chained(real_msgs) != chained(sim_msgs):
                diffs.append(f"{scenario}: decode blocks chained in one only")
            real_msgs, sim_msgs = token_counts(real_msgs), token_counts(sim_msgs)
        if batch_summary(real_msgs) == batch_summary(sim_msgs):
            diffs += compare_frames(scenario, real_msgs, sim_msgs, real_msgs[0][0] if real_msgs else b"")
        else:
            summaries = f"{batch_summary(real_msgs)} in vLLM, {batch_summary(sim_msgs)} in sim"
            diffs.append(f"{scenario}: batches {summaries}")
            diffs += compare_event_layouts(scenario, real_msgs, sim_msgs)
    check(diffs)


def test_replay_end_marker_is_recorded_as_vllm_sends_it() -> None:
    """The recordings hold what the comparators assume: 4-frame replies and vLLM's end marker."""
    for scenario in ("replay_from_0", "replay_from_mid", "replay_past_end"):
        messages = recorded_messages(scenario)
        assert messages[-1] == [b"", b"", (-1).to_bytes(8, "big", signed=True), b""]
        assert all(len(m) == 4 and m[0] == b"" and m[1] == b"kv-events" for m in messages[:-1])
    assert len(recorded_messages("replay_past_end")) == 1


# ---- the comparators themselves: each catches what it is for ------------------------------------


def test_shape_diff_catches_missing_extra_and_retyped_fields() -> None:
    real = json.loads((FIXTURES / "http" / "completion.json").read_text())["response"]["json"]
    sim = json.loads(json.dumps(real))
    assert shape_diff(real, sim) == []
    del sim["usage"]["prompt_tokens_details"]["cached_tokens"]
    sim["choices"][0]["extra"] = 1
    sim["created"] = str(sim["created"])
    assert shape_diff(real, sim) == [
        "$.created: int in vLLM, str in sim",
        "$.choices[0].extra: extra in sim",
        "$.usage.prompt_tokens_details.cached_tokens: missing in sim",
    ]


def test_compare_frames_catches_layout_changes() -> None:
    real = recorded_messages("decode_filled")
    assert compare_frames("s", real, real, b"kv-events") == []
    batch = msgpack.unpackb(real[1][2], strict_map_key=False)
    event = batch[1][0]
    reordered = {k: event[k] for k in ["block_hashes", "type", *list(event)[2:]]}
    del reordered["lora_name"]
    payload = msgpack.packb([batch[0], [reordered], batch[2]])
    mutated = [real[0], [b"other-topic", real[1][1], payload], *real[2:]]
    diffs = compare_frames("s", real, mutated, b"kv-events")
    assert "s: message 1: topic b'other-topic' in sim, expected b'kv-events'" in diffs
    assert any("keys ['type', 'block_hashes'" in d and "['block_hashes', 'type'" in d for d in diffs)
    assert "s: message 1: batch $[1][0].lora_name: missing in sim" in diffs
    assert compare_frames("s", real, real[:2], b"kv-events")[0] == "s: 4 messages in vLLM, 2 in sim"


def test_batch_summary_and_check() -> None:
    assert batch_summary(recorded_messages("after_reset_prompt")) == "[C, S21]"
    assert batch_summary(recorded_messages("eviction")).startswith("[R x32, S32]")
    with pytest.raises(AssertionError, match="simulator differs"):
        check(["anything: a new difference"])


def test_compare_stream_catches_framing_and_chunk_changes() -> None:
    real = as_reply(json.loads((FIXTURES / "http" / "chat_stream_usage.json").read_text()))
    assert compare_stream("s", real, real) == []
    assert sorted(chunk_kinds(real.sse())) == ["done", "first", "last", "middle", "usage"]
    events = real.raw.decode().split("\n\n")
    no_done = Reply(200, real.headers, "\n\n".join([*events[:-2], ""]).encode())
    assert "s: done chunk only in vLLM" in compare_stream("s", real, no_done)
    last = json.loads(events[-4].removeprefix("data: "))
    del last["choices"][0]["stop_reason"]
    events[-4] = "data: " + json.dumps(last)
    assert compare_stream("s", real, Reply(200, real.headers, "\n\n".join(events).encode())) == [
        "s: last chunk: $.choices[0].stop_reason: missing in sim"
    ]

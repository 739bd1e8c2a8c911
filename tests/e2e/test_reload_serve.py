"""Live reload end to end: a real `kvgate serve --config F` process in front of simulated vLLM pods
(bench.sim), its config file rewritten, reloaded by SIGHUP or by the file poll alone.

Adding a pod sends it traffic; removing one sends it nothing new while its stream in flight ends
200 and its blocks leave the prefix index; a file edit applies without a signal; a bad config is
rejected (logged, counted) and the old one serves on; API keys rotate; and a steady load across
reloads that move pods and change policies sees no failed request.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from helpers import eventually
from prometheus_client.parser import text_string_to_metric_families

from bench.sim.fleet import SimFleet

MODEL = "m"
# Pods answer fast; a stream of STREAM_TOKENS tokens lasts about a second, time to reload under it.
FAST: dict[str, Any] = {"model": MODEL, "itl_ms": 1.0, "itl_ms_per_seq": 0.0, "prefill_tps": 1e7, "seed": 1}
STREAM_TOKENS = 120
pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


def config(urls: list[str], policy: str = "round_robin", **sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "pools": {MODEL: {"policy": {"name": policy}, "endpoints": [{"url": u} for u in urls]}},
        "health": {"interval": 5.0, "timeout": 1.0},
        "scrape": {"interval": 0},
        "logs": {"access": False},
        "reload": {"interval": 0},  # SIGHUP only, unless a test turns the poll on
    }
    data.update(sections)
    return data


class Serve:
    """`kvgate serve --config PATH` as a subprocess; its stderr (the gateway's log) in a file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.log = path.with_suffix(".log")
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""

    def write(self, data: dict[str, Any] | str) -> None:
        tmp = self.path.with_suffix(".tmp")  # written whole, then renamed: the poll never sees half
        tmp.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
        os.replace(tmp, self.path)

    async def start(self, data: dict[str, Any]) -> Serve:
        self.write(data)
        args = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.path), "--port", "0"]
        with self.log.open("wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                *args, stdout=asyncio.subprocess.PIPE, stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1"}
            )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        assert line.startswith(b"KVGATE_SERVE_READY "), (line, self.log.read_text())
        self.url = orjson.loads(line.split(b" ", 1)[1])["url"]
        return self

    async def reload(
        self, http: aiohttp.ClientSession, data: dict[str, Any] | str, result: str = "ok"
    ) -> None:
        """Write `data`, SIGHUP, and wait until the gateway counted one more reload with `result`."""
        before = await self.metric(http, "kvgate_config_reloads_total", result=result)
        self.write(data)
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

        async def counted() -> bool:
            return await self.metric(http, "kvgate_config_reloads_total", result=result) == before + 1

        await eventually(counted, within=10, what=f"a reload counted {result}")

    async def metric(self, http: aiohttp.ClientSession, name: str, **labels: str) -> float:
        async with http.get(f"{self.url}/metrics") as resp:
            text = await resp.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(self.proc.wait(), 15) == 0  # graceful exit


@pytest.fixture
async def fleet() -> AsyncIterator[SimFleet]:
    async with SimFleet(3, **FAST) as f:
        yield f


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Serve]:
    gw = Serve(tmp_path / "kvgate.yaml")
    yield gw
    await gw.stop()


async def complete(http: aiohttp.ClientSession, gw: Serve, prompt: str = "hello", key: str | None = None,
                   stream: bool = False, max_tokens: int = 2) -> tuple[int, str, bytes]:  # fmt: skip
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": stream}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with http.post(f"{gw.url}/v1/completions", json=body, headers=headers) as resp:
        return resp.status, resp.headers.get("x-kvgate-endpoint", ""), await resp.read()


async def served_by(http: aiohttp.ClientSession, gw: Serve, n: int) -> set[str]:
    urls = set()
    for i in range(n):
        status, url, _ = await complete(http, gw, f"request {i}")
        assert status == 200
        urls.add(url)
    return urls


async def test_sighup_adds_and_removes_pods_under_a_stream_and_a_file_edit_needs_no_signal(
    fleet, http, serve
):
    p0, p1, p2 = fleet.urls
    policy = "cache_aware"
    gw = await serve.start(config([p0, p1], policy))
    for i in range(6):  # blocks on both pods
        assert (await complete(http, gw, f"prefix {i} " + "shared words " * 30))[0] == 200

    await gw.reload(http, config([p0, p1, p2], policy))  # SIGHUP: a pod joins
    await eventually(lambda: _has(http, gw, p2), within=10, what="p2 to get traffic")

    prompt = "a long answer to " + "a long question " * 30  # blocks recorded on the pod it goes to
    body = {"model": MODEL, "prompt": prompt, "max_tokens": STREAM_TOKENS, "stream": True}
    async with http.post(f"{gw.url}/v1/completions", json=body) as resp:  # in flight across the reload
        assert resp.status == 200
        busy = resp.headers["x-kvgate-endpoint"]
        entries = await gw.metric(http, "kvgate_prefix_index_entries", model=MODEL)
        kept = [u for u in (p0, p1, p2) if u != busy]
        await gw.reload(http, config(kept, policy))  # SIGHUP: the pod streaming leaves
        assert await served_by(http, gw, 6) <= set(kept)
        streamed = await resp.read()
    assert streamed.endswith(b"data: [DONE]\n\n") and streamed.count(b"data: {") >= STREAM_TOKENS
    assert await gw.metric(http, "kvgate_prefix_index_entries", model=MODEL) < entries  # its blocks left
    assert await gw.metric(http, "kvgate_requests_total", model=MODEL, endpoint=busy, status="200") >= 1

    await gw.reload(http, config(kept, policy, reload={"interval": 0.1}))  # turn the file poll on
    ok = await gw.metric(http, "kvgate_config_reloads_total", result="ok")
    gw.write(config([busy], policy, reload={"interval": 0.1}))  # no signal from here on

    async def applied() -> bool:
        return await gw.metric(http, "kvgate_config_reloads_total", result="ok") == ok + 1

    await eventually(applied, within=10, what="the file edit to be applied")
    assert await served_by(http, gw, 3) == {busy}


async def _has(http: aiohttp.ClientSession, gw: Serve, url: str) -> bool:
    return url in await served_by(http, gw, 6)


async def test_a_bad_config_is_rejected_the_old_one_serves_and_api_keys_rotate(fleet, http, serve, tmp_path):
    p0, p1, _ = fleet.urls
    keys = tmp_path / "keys"
    keys.write_text("key-1\n")
    auth = {"api_keys_file": str(keys)}
    gw = await serve.start(config([p0], auth=auth))
    assert (await complete(http, gw, key="key-1"))[0] == 200
    assert (await complete(http, gw))[0] == 401

    await gw.reload(http, "pools: {m: [broken", result="rejected")  # YAML error
    bad_param = config([p1], auth=auth)
    bad_param["pools"][MODEL]["policy"] = {"name": "cache_aware", "params": {"tie_fraction": 2}}
    await gw.reload(http, bad_param, result="rejected")  # a bad policy parameter
    assert await gw.metric(http, "kvgate_config_last_reload_successful") == 0
    for _ in range(3):
        status, url, _ = await complete(http, gw, key="key-1")
        assert (status, url) == (200, p0)  # the old config serves on
    log = gw.log.read_text()
    assert "rejected, the running config keeps serving: ParserError" in log
    assert "pools.m.policy: policy 'cache_aware': tie_fraction must be in [0, 1)" in log

    keys.write_text("key-2\n")
    await gw.reload(http, config([p0], auth=auth))  # SIGHUP re-reads the keys file
    assert (await complete(http, gw, key="key-1"))[0] == 401
    assert (await complete(http, gw, key="key-2"))[0] == 200
    assert await gw.metric(http, "kvgate_config_last_reload_successful") == 1


@pytest.mark.timeout(120)
async def test_steady_load_across_reloads_that_move_pods_and_change_policies_fails_no_request(
    fleet, http, serve
):
    p0, p1, p2 = fleet.urls
    steps = [
        config([p0, p1, p2], "least_request"),
        config([p1, p2], "cache_aware"),
        config([p0, p2], "cache_aware", retries={"max_retries": 1}),
        config([p0], "session"),
        config([p0, p1, p2], "power_of_two"),
        config([p2, p1], "round_robin"),
    ]
    gw = await serve.start(config([p0, p1]))
    results: list[tuple[int, bool]] = []
    stop = asyncio.Event()

    async def client(worker: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            stream = i % 2 == 0
            status, _, body = await complete(http, gw, f"worker {worker} turn {i % 5} " + "words " * 20,
                                             stream=stream, max_tokens=20 if stream else 4)  # fmt: skip
            results.append((status, not stream or body.endswith(b"data: [DONE]\n\n")))

    workers = [asyncio.create_task(client(w)) for w in range(6)]
    try:
        for _ in range(2):
            for step in steps:
                await gw.reload(http, step)
                n = len(results)
                await eventually(lambda n=n: len(results) >= n + 6, within=10, what="requests after a reload")
    finally:
        stop.set()
        await asyncio.gather(*workers)
    assert len(results) > 50
    assert [r for r in results if r != (200, True)] == []
    for name in ("least_request", "cache_aware", "session", "power_of_two", "round_robin"):
        decisions = 0.0
        async with http.get(f"{gw.url}/metrics") as resp:
            text = await resp.text()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "kvgate_routing_decisions_total" and s.labels["policy"] == name:
                    decisions += s.value
        assert decisions > 0, name
    assert await gw.metric(http, "kvgate_config_reloads_total", result="rejected") == 0

"""Fleets: in-process pods that stop and restart, `kvgate sim` subprocesses that can be killed, the CLI."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import aiohttp
import orjson
import pytest
from sim_helpers import FAST, post

from bench.sim.fleet import READY_PREFIX, SimFleet, SimFleetProcess


async def test_in_process_fleet_distinct_pods_and_restart(http: aiohttp.ClientSession) -> None:
    async with SimFleet(3, **FAST) as fleet:
        assert len(set(fleet.urls)) == 3
        infos = fleet.ready_infos()
        assert len({i["engine_id"] for i in infos}) == 3
        assert all(i["model"] == "sim-model" and i["role"] == "both" for i in infos)
        body = {"prompt": " ".join(f"r{i}" for i in range(40)), "max_tokens": 1}
        for url in fleet.urls:
            assert (await post(http, url + "/v1/completions", body))[0] == 200
        pod = fleet.pods[1]
        url = pod.url
        await pod.stop()
        with pytest.raises(aiohttp.ClientConnectionError):
            await post(http, url + "/v1/completions", body)
        await pod.start()
        assert pod.url == url  # same port after a restart
        _, again = await post(http, url + "/v1/completions", body)
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # the cache died with it
        _, other = await post(http, fleet.urls[0] + "/v1/completions", body)
        assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 32


async def test_stop_cuts_streams_in_flight(http: aiohttp.ClientSession) -> None:
    async with SimFleet(1, **{**FAST, "itl_ms": 5.0}) as fleet:
        pod = fleet.pods[0]
        async with http.post(pod.url + "/v1/completions",
                             json={"prompt": "x", "max_tokens": 1000, "stream": True}) as resp:
            await resp.content.readline()
            await pod.stop()
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()


async def test_process_fleet_kill_and_restart(http: aiohttp.ClientSession) -> None:
    async with SimFleetProcess(2, **FAST, per_pod=[{"role": "prefill"}, {"role": "decode"}]) as fleet:
        infos = fleet.ready_infos()
        assert [i["role"] for i in infos] == ["prefill", "decode"]
        assert infos[0]["url"] != infos[1]["url"]
        for url in fleet.urls:
            async with http.get(url + "/health") as resp:
                assert resp.status == 200
        url = fleet.urls[0]
        await fleet.kill(0)
        assert not fleet.pods[0].alive
        with pytest.raises(aiohttp.ClientConnectionError):
            await post(http, url + "/v1/completions", {"prompt": "x", "max_tokens": 1})
        status, _ = await post(http, fleet.urls[1] + "/v1/completions", {"prompt": "x", "max_tokens": 1})
        assert status == 200
        await fleet.restart(0)
        assert fleet.urls[0] == url
        assert (await post(http, url + "/v1/completions", {"prompt": "x", "max_tokens": 1}))[0] == 200


async def test_process_pod_exits_with_its_launcher() -> None:
    async with SimFleetProcess(1, **FAST) as fleet:
        proc = fleet.pods[0].proc
        assert proc is not None and proc.stdin is not None
        proc.stdin.close()  # what the OS does when the launcher dies
        assert await asyncio.wait_for(proc.wait(), 10) == 0


async def test_cli_processes_mode(http: aiohttp.ClientSession) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.sim.cli", "--pods", "2", "--port-base", "0", "--processes",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        lines = [await asyncio.wait_for(proc.stdout.readline(), 30) for _ in range(2)]
        urls = [orjson.loads(line.decode().removeprefix(READY_PREFIX))["url"] for line in lines]
        assert len(set(urls)) == 2
        for url in urls:
            assert (await post(http, url + "/v1/completions", {"prompt": "x", "max_tokens": 1}))[0] == 200
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 15) == 0


async def test_cli_pods_print_ready_lines() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.sim.cli", "--pods", "2", "--port-base", "0", "--model", "m2",
        "--kv-events-endpoint", "tcp://127.0.0.1:*", stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        lines = [await asyncio.wait_for(proc.stdout.readline(), 20) for _ in range(2)]
        infos = [orjson.loads(line.decode().removeprefix(READY_PREFIX)) for line in lines]
        assert all(line.startswith(READY_PREFIX.encode()) for line in lines)
        assert len({i["url"] for i in infos}) == 2 and all(i["model"] == "m2" for i in infos)
        assert all(i["kv_events"].startswith("tcp://127.0.0.1:") for i in infos)
        assert infos[0]["topic"] == f"kv@{infos[0]['url'].removeprefix('http://')}@m2"
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0


def test_help_documents_defaults_and_origins() -> None:
    out = subprocess.run([sys.executable, "-m", "bench.sim.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for needle in ("15,928", "31000", "--prefill-tps", "--itl-ms-per-seq", "--kv-events-replay-endpoint",
                   "(default: 256)", "(default: 8192)", "(default: 32768)"):
        assert needle in out, needle


async def test_fault_injection(http: aiohttp.ClientSession) -> None:
    async with SimFleet(1, **{**FAST, "itl_ms": 5.0}) as fleet:
        url = fleet.urls[0]
        body = {"prompt": "x", "max_tokens": 20}
        assert (await post(http, url + "/kvgate_sim/fault", {"dead": True}))[1]["dead"] is True
        async with http.get(url + "/health") as resp:
            assert resp.status == 503
        status, err = await post(http, url + "/v1/completions", body)
        assert status == 500 and err["error"]["type"] == "InternalServerError"
        assert err["error"]["message"].startswith("EngineCore encountered an issue.")
        await post(http, url + "/kvgate_sim/fault", {"dead": False})
        # dying under a stream: the error event, then [DONE]
        async with http.post(url + "/v1/completions", json={**body, "max_tokens": 1000, "stream": True}) as r:
            await r.content.readline()
            await post(http, url + "/kvgate_sim/fault", {"dead": True})
            tail = (await r.read()).decode().strip().split("\n\n")
        assert tail[-1] == "data: [DONE]" and '"type":"InternalServerError"' in tail[-2]
        await post(http, url + "/kvgate_sim/fault", {"dead": False, "slowdown": 5.0})
        start = time.perf_counter()
        status, _ = await post(http, url + "/v1/completions", body)
        assert status == 200 and time.perf_counter() - start >= 0.9 * 20 * 0.025  # 20 steps of 25 ms
        status, err = await post(http, url + "/kvgate_sim/fault", {"slowdown": 0})
        assert status == 400 and err["error"]["param"] == "slowdown"

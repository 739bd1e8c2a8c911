"""`kvgate serve --workers N`: N processes on one port that share state through Redis, supervised.

Both workers take connections on the one port; a prefix routed by one is predicted cached by the other
(replica sync); any worker's /metrics shows every worker (a `worker` label); a killed worker is
restarted; SIGTERM stops them all with exit 0; without Redis configured N > 1 is refused in one line.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import aiohttp
import orjson
import pytest
from helpers import eventually
from redis_support import RedisServer
from serve_support import MODEL, metric_samples, text

from bench.sim.fleet import SimFleet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

FAST = {"model": MODEL, "prefill_tps": 1e6, "itl_ms": 1.0, "itl_ms_per_seq": 0.0}


def serve_argv(fleet: SimFleet, *extra: str) -> list[str]:
    argv = [sys.executable, "-m", "gateway.cli", "serve", "--port", "0", "--model", MODEL,
            "--policy", "cache_aware", "--log-level", "INFO", "--no-access-log"]  # fmt: skip
    for url in fleet.urls:
        argv += ["--backend", url]
    return [*argv, *extra]


async def fresh_connection_post(base: str, prompt: str) -> tuple[int, int]:
    """One request on a new connection (SO_REUSEPORT picks the worker per connection)."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http, \
            http.post(f"{base}/v1/completions", json=body) as resp:  # fmt: skip
        await resp.read()
        return resp.status, int(resp.headers.get("x-kvgate-cached-tokens", "0"))


def per_worker(samples: dict[tuple, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for labels, value in samples.items():
        worker = dict(labels)["worker"]
        out[worker] = out.get(worker, 0.0) + value
    return out


async def test_two_workers_share_one_port_and_their_state(redis_server: RedisServer) -> None:
    async with SimFleet(4, **FAST) as fleet:
        proc = await asyncio.create_subprocess_exec(
            *serve_argv(fleet, "--workers", "2", "--redis-url", redis_server.url),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        assert proc.stdout is not None and proc.stderr is not None
        stderr = bytearray()
        drain = asyncio.create_task(_collect(proc.stderr, stderr))
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 90)
            assert line.startswith(b"KVGATE_SERVE_READY "), line + bytes(stderr)
            ready = orjson.loads(line.split(b" ", 1)[1])
            base, pids = ready["url"], ready["pids"]
            assert ready["workers"] == 2 and len(set(pids)) == 2 and ready["models"] == [MODEL]
            async with aiohttp.ClientSession() as http:
                await eventually(lambda: _connected(http, base, 2), within=15.0, interval=0.05)
                prefix = text(5, 192)
                status, _ = await fresh_connection_post(base, prefix + " first")
                assert status == 200

                async def the_other_worker_applied_it() -> bool:
                    applied = await metric_samples(http, base, "kvgate_replica_sync_applied_total")
                    return sum(v for k, v in applied.items() if ("kind", "blocks") in k) >= 1

                await eventually(the_other_worker_applied_it, within=10.0, interval=0.01)
                before = per_worker(await metric_samples(http, base, "kvgate_prefix_cached_tokens_total"))
                answers = [await fresh_connection_post(base, prefix + f" q{i}") for i in range(30)]
                assert all(s == 200 for s, _ in answers)
                assert all(cached >= 192 for _, cached in answers)  # whichever worker took it knew
                after = per_worker(await metric_samples(http, base, "kvgate_prefix_cached_tokens_total"))
                # both workers served follow-ups and predicted the prefix cached: one port, shared state
                assert sorted(after) == ["0", "1"]
                assert all(after[w] > before.get(w, 0.0) for w in after), (before, after)

                # a worker killed is restarted; the port keeps answering meanwhile
                os.kill(pids[1], signal.SIGKILL)
                await eventually(lambda: b"restarted" in stderr, within=60.0, what="the worker's restart")
                await eventually(lambda: _connected(http, base, 2), within=15.0, interval=0.05)
                assert (await fresh_connection_post(base, text(6, 40)))[0] == 200
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(proc.wait(), 30)
            drain.cancel()
        assert code == 0, bytes(stderr).decode()[-2000:]
        assert not any(_alive(p) for p in pids)


async def _collect(stream: asyncio.StreamReader, into: bytearray) -> None:
    while chunk := await stream.read(4096):
        into += chunk


async def _connected(http: aiohttp.ClientSession, base: str, workers: int) -> bool:
    samples = await metric_samples(http, base, "kvgate_replica_sync_connected")
    return sum(samples.values()) == workers


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_more_than_one_worker_without_redis_is_refused_in_one_line() -> None:
    argv = [sys.executable, "-m", "gateway.cli", "serve", "--backend", "http://127.0.0.1:9", "--model", "m",
            "--workers", "2"]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kvgate serve: --workers 2 needs --redis-url"), lines[0]

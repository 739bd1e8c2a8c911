"""SIGTERM with requests queued in a `kvgate serve` process: the queue drains through the pods, or,
past admission.drain_timeout_s, every request still queued is answered 503. None is left unanswered."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml
from admission_support import SLOW
from helpers import eventually

from bench.sim.fleet import SimFleet

pytestmark = pytest.mark.timeout(90)


@asynccontextmanager
async def serve(
    tmp_path: Path, url: str, admission: dict, shutdown_s: float
) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    config = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "timeouts": {"shutdown": shutdown_s},
        "scrape": {"interval": 0},
        "admission": admission,
        "pools": {"m": {"endpoints": [{"url": url}], "policy": {"name": "least_request"}}},
    }
    path = tmp_path / "kvgate.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "serve",
        "--config",
        str(path),
        "--log-level",
        "WARNING",
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.startswith(b"KVGATE_SERVE_READY "), line
        yield orjson.loads(line.split(b" ", 1)[1])["url"], proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def queue_depth(http: aiohttp.ClientSession, url: str) -> float:
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("kvgate_admission_queue_depth{")
    )


async def send(http: aiohttp.ClientSession, url: str, i: int, max_tokens: int) -> tuple[int, str]:
    body = {"model": "m", "prompt": f"request {i}", "max_tokens": max_tokens}
    try:
        async with http.post(url + "/v1/completions", json=body) as resp:
            data = orjson.loads(await resp.read())
            return resp.status, (data.get("error") or {}).get("code") or ""
    except aiohttp.ClientError as exc:  # an unanswered request: what must never happen
        return -1, repr(exc)


@pytest.mark.parametrize("drain_s, shutdown_s, expect_503", [(20.0, 40.0, False), (0.4, 20.0, True)])
async def test_sigterm_drains_the_queue_or_answers_every_queued_request(
    tmp_path, drain_s, shutdown_s, expect_503
) -> None:
    admission = {"max_in_flight_per_pod": 1, "headroom_per_pod": 0, "drain_timeout_s": drain_s}
    max_tokens = 30  # ~0.3 s each, one at a time
    async with (
        SimFleet(1, **SLOW, max_num_seqs=1) as fleet,
        serve(tmp_path, fleet.urls[0], admission, shutdown_s) as (url, proc),
    ):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            tasks = [asyncio.ensure_future(send(http, url, i, max_tokens)) for i in range(8)]

            async def queued() -> bool:
                return await queue_depth(http, url) >= 6

            await eventually(queued, within=10, what="requests queued in the gateway")
            proc.send_signal(signal.SIGTERM)
            answers = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    statuses = [s for s, _ in answers]
    assert all(s in (200, 503) for s in statuses), answers  # every one answered
    if expect_503:
        assert statuses.count(503) >= 4, answers
        assert {code for s, code in answers if s == 503} == {"shutting_down"}
    else:
        assert statuses == [200] * 8, answers

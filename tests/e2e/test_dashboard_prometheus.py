"""Every PromQL query of the shipped Grafana dashboard, evaluated by a real Prometheus.

Prometheus (Debian's `prometheus`) scrapes a running gateway and its simulated pods while load runs
through every path the dashboard watches: cache-aware routing with KV events (one stream with gaps and
replays), a pod that fails (retries, upstream errors, ejections, scrape errors), a pool whose pods are
all gone (panic routing), a P/D pool, and requests the gateway refuses. Each query must parse and
return data: a misspelt metric, a wrong label or a panel for a signal that is never exported fails here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import zmq.asyncio
from aiohttp import web
from helpers import eventually, free_port, service_binary
from kv_publisher_fake import FakePublisher
from prometheus_client import CollectorRegistry
from redis_support import RedisServer

from bench.sim.fleet import SimFleet
from gateway.app import build_app
from gateway.config import config_from_mapping
from prefixindex.events import BlockStored

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "config" / "grafana" / "kvgate-dashboard.json"
FAST: dict[str, Any] = {"prefill_tps": 200_000.0, "itl_ms": 2.0, "itl_ms_per_seq": 0.0}
# Grafana's variables, as a dashboard user sees them with "All" selected
VARIABLES = {"$model": ".*", "${model}": ".*", "$__rate_interval": "1m", "$__interval": "15s"}

pytestmark = pytest.mark.timeout(150)


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            out.append((f"{panel['title']} [{target['refId']}]", expr))
    return out


def test_the_dashboard_has_the_panels_operators_need() -> None:
    titles = " | ".join(title for title, _ in dashboard_queries()).lower()
    for needed in ("panic", "p/d", "ttft model", "prediction error", "refused", "kv events", "cost",
                   "replica sync"):
        assert needed in titles, needed
    assert not [e for _, e in dashboard_queries() if re.search(r"\$\w", e)], "a variable left unset"


def prometheus_binary() -> str:
    return service_binary(shutil.which("prometheus"), "prometheus", "install Debian's prometheus package",
                          "apt-get install prometheus")


class FlakyPod:
    """A pod that passes its health check but answers every API call 503 and every scrape 500."""

    def __init__(self) -> None:
        self.app = web.Application()
        self.app.router.add_get("/health", self._ok)
        self.app.router.add_get("/metrics", self._broken)
        self.app.router.add_route("*", "/{tail:.*}", self._unavailable)
        self.runner = web.AppRunner(self.app, access_log=None)
        self.url = ""

    async def _ok(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _broken(self, request: web.Request) -> web.Response:
        return web.Response(status=500)

    async def _unavailable(self, request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "overloaded"}}, status=503)

    async def start(self) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"


async def publish_with_gaps(publisher: Any, stop: asyncio.Event) -> None:
    """KV events from the flaky pod's publisher, every third batch held back (a gap, then a replay)."""
    n = 0
    while not stop.is_set():
        event = BlockStored(
            block_hashes=[10_000 + n], parent_block_hash=None, token_ids=list(range(16)), block_size=16,
            lora_id=None,
        )  # fmt: skip
        await publisher.publish([event], drop=n % 3 == 1)
        n += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)


@contextlib.asynccontextmanager
async def prometheus(targets: list[str], tmp: Path) -> AsyncIterator[str]:
    port = free_port()
    config = tmp / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: kvgate\n"
        f"    static_configs: [{{targets: {json.dumps(targets)}}}]\n"
    )
    log = (tmp / "prometheus.log").open("wb")
    proc = subprocess.Popen(  # noqa: ASYNC220 (started once; the loop runs nothing else yet)
        [prometheus_binary(), f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


async def load(url: str, stop: asyncio.Event) -> None:
    """Streamed and plain requests to every pool, plus requests the gateway refuses, until `stop`."""
    prefix = " ".join(f"w{i}" for i in range(200))
    async with aiohttp.ClientSession() as s:
        n = 0
        while not stop.is_set():
            n += 1
            bodies = [
                ("/v1/completions", {"model": "m", "prompt": f"{prefix} q{n % 5}", "max_tokens": 3,
                                     "stream": n % 2 == 0}),
                ("/v1/completions", {"model": "pd", "prompt": f"{prefix} pd{n}", "max_tokens": 3}),
                ("/v1/completions", {"model": "gone", "prompt": "x", "max_tokens": 1}),
                ("/v1/completions", {"model": "rr", "prompt": "x", "max_tokens": 1}),
                ("/v1/completions", {"model": "no-such-model", "prompt": "x"}),
            ]  # fmt: skip
            for path, body in bodies:
                async with s.post(url + path, json=body) as r:
                    await r.read()
            async with s.post(url + "/v1/completions", data=b"{not json") as r:
                await r.read()


async def ready(session: aiohttp.ClientSession, prom: str) -> bool:
    try:
        async with session.get(f"{prom}/-/ready") as r:
            return r.status == 200
    except aiohttp.ClientConnectionError:
        return False


async def query(session: aiohttp.ClientSession, prom: str, expr: str) -> dict[str, Any]:
    async with session.get(f"{prom}/api/v1/query", params={"query": expr}) as r:
        return await r.json()


async def test_every_dashboard_query_returns_data_from_a_real_prometheus(tmp_path: Path) -> None:
    prometheus_binary()
    ctx = zmq.asyncio.Context()
    publisher = FakePublisher(ctx, "tcp://127.0.0.1:*")
    flaky, flaky_rr = FlakyPod(), FlakyPod()
    await flaky.start()
    await flaky_rr.start()
    gone = f"http://127.0.0.1:{free_port()}"  # nothing listens: refused, ejected at once
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    runner: web.AppRunner | None = None
    async with (
        RedisServer(tmp_path) as redis,  # the replica sync's panel
        SimFleet(2, model="m", kv_events_endpoint="tcp://127.0.0.1:*", **FAST) as fleet,
        SimFleet(2, model="pd", per_pod=[{"role": "prefill", "engine_id": "p0"},
                                         {"role": "decode", "engine_id": "d0"}], **FAST) as pd_fleet,
        SimFleet(1, model="rr", **FAST) as rr_fleet,
    ):  # fmt: skip
        try:
            infos = fleet.ready_infos()
            pods = zip(fleet.urls, infos, strict=True)
            endpoints = [{"url": u, "kv_events": i["kv_events"]} for u, i in pods]
            # the flaky pod's KV events come from the publisher that leaves gaps
            replay = publisher.replay_endpoint
            endpoints.append({"url": flaky.url, "kv_events": publisher.endpoint, "kv_events_replay": replay})
            cfg = config_from_mapping(
                {
                    "pools": {
                        "m": {"policy": {"name": "cache_aware", "params": {"index": "precise"}},
                              "endpoints": endpoints},
                        "pd": {"policy": {"name": "least_request"},
                               "endpoints": [{"url": pd_fleet.urls[0], "role": "prefill"},
                                             {"url": pd_fleet.urls[1], "role": "decode"}],
                               "pd": {"threshold_tokens": 16}},
                        "gone": {"endpoints": [{"url": gone}]},
                        # every other request lands on the flaky pod first: retried, counted, ejected
                        "rr": {"policy": {"name": "round_robin"},
                               "endpoints": [{"url": rr_fleet.urls[0]}, {"url": flaky_rr.url}]},
                    },
                    "health": {"interval": 0.5, "timeout": 0.4, "eject_after": 1, "panic_threshold": 0.4},
                    "scrape": {"interval": 0.5, "timeout": 0.4},
                    "replicas": {"redis_url": redis.url, "load_interval_s": 0.2, "load_ttl_s": 1.0},
                }
            )  # fmt: skip
            app = build_app(cfg, registry=CollectorRegistry())
            runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            gw = f"127.0.0.1:{runner.addresses[0][1]}"
            targets = [gw] + [u.removeprefix("http://") for u in fleet.urls + pd_fleet.urls + rr_fleet.urls]
            tasks.append(asyncio.create_task(load(f"http://{gw}", stop)))
            tasks.append(asyncio.create_task(publish_with_gaps(publisher, stop)))
            async with prometheus(targets, tmp_path) as prom, aiohttp.ClientSession() as s:
                await eventually(lambda: ready(s, prom), within=30, what="Prometheus to be ready")
                queries = dashboard_queries()
                for title, expr in queries:  # every query parses (an error answer says why)
                    answer = await query(s, prom, expr)
                    assert answer["status"] == "success", (title, expr, answer)
                missing: list[str] = []

                async def all_have_data() -> bool:
                    missing.clear()
                    for title, expr in queries:
                        answer = await query(s, prom, expr)
                        if answer["status"] != "success" or not answer["data"]["result"]:
                            missing.append(f"{title}: {expr}")
                    return not missing

                try:
                    await eventually(all_have_data, within=90, interval=1.0, what="data for every query")
                except AssertionError:
                    pytest.fail("dashboard queries with no data:\n" + "\n".join(missing))
                assert not tasks[0].done(), tasks[0]  # the load ran throughout
        finally:
            stop.set()
            for task in tasks:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(task, 10)
            if runner is not None:
                await runner.cleanup()
            await flaky.runner.cleanup()
            await flaky_rr.runner.cleanup()
            await publisher.close()
            ctx.term()

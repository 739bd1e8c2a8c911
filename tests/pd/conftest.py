"""Fixtures for the P/D tests (the world they build is described in pd_harness.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pd_harness import MODEL, SIM_OPTIONS, PDWorld, PodSpec, endpoint_spec
from pd_recorder import Recorder

from bench.sim.fleet import SimFleet
from gateway.app import build_app
from gateway.config import GatewayConfig, Health, PDSpec, PolicySpec, PoolSpec, Scrape


@pytest.fixture
async def pd_world() -> AsyncIterator[Callable[..., Awaitable[PDWorld]]]:
    fleets: list[SimFleet] = []
    recorders: list[Recorder] = []
    runners: list[web.AppRunner] = []

    async def make(
        specs: Sequence[PodSpec],
        *,
        pd: PDSpec | None = None,
        policy: str = "least_request",
        policy_params: dict[str, Any] | None = None,
        kv_events: bool = False,
        in_gateway: Sequence[int] | None = None,
        retries: int = 2,
        **sim: Any,
    ) -> PDWorld:
        """Start the pods of `specs`; the gateway's pool holds those in `in_gateway` (default: all)."""
        per_pod = [{"role": s.role, "engine_id": f"engine-{i}-{s.version}"} for i, s in enumerate(specs)]
        if kv_events:  # every pod binds its own OS-chosen port
            sim = {"kv_events_endpoint": "tcp://127.0.0.1:*", **sim}
        fleet = SimFleet(len(specs), per_pod=per_pod, **{**SIM_OPTIONS, **sim})
        await fleet.start()
        fleets.append(fleet)
        recs = [Recorder(url, version=s.version) for url, s in zip(fleet.urls, specs, strict=True)]
        for rec in recs:
            await rec.start()
        recorders.extend(recs)
        world = PDWorld(list(specs), fleet, recs)
        infos = fleet.ready_infos()
        chosen = range(len(specs)) if in_gateway is None else in_gateway
        config = GatewayConfig(
            pools=[
                PoolSpec(
                    model=MODEL,
                    endpoints=[endpoint_spec(recs[i], specs[i], infos[i]["kv_events"]) for i in chosen],
                    policy=PolicySpec(policy, {"seed": 7, **(policy_params or {})}),
                    pd=pd,
                )
            ],
            health=Health(interval=0.2, timeout=0.2, eject_after=3),
            scrape=Scrape(interval=0),
        )
        config.retries.max_retries = retries
        world.app = build_app(config, registry=world.registry)
        runner = web.AppRunner(world.app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        world.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        return world

    yield make
    for runner in runners:
        await runner.cleanup()
    for rec in recorders:
        await rec.stop()
    for fleet in fleets:
        await fleet.stop()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session



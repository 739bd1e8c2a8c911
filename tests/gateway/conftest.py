"""Fixtures for the gateway tests: fake pods and an in-process gateway on 127.0.0.1, OS-chosen ports."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web
from gateway_fakes import FakePod
from prometheus_client import CollectorRegistry

from gateway.app import build_app
from gateway.config import GatewayConfig
from gateway.runner import app_runner


@dataclass
class RunningGateway:
    url: str
    app: web.Application
    registry: CollectorRegistry


@pytest.fixture
async def fake_pods() -> AsyncIterator[Callable[[int], Awaitable[list[FakePod]]]]:
    pods: list[FakePod] = []

    async def make(n: int) -> list[FakePod]:
        new = [FakePod(name=f"pod{len(pods) + i}") for i in range(n)]
        for pod in new:
            await pod.start()
        pods.extend(new)
        return new

    yield make
    for pod in pods:
        await pod.stop()


@pytest.fixture
async def start_gateway() -> AsyncIterator[Callable[..., Awaitable[RunningGateway]]]:
    runners: list[web.AppRunner] = []

    async def start(
        config: GatewayConfig, prepare: Callable[[web.Application], None] | None = None
    ) -> RunningGateway:
        """Build and serve the gateway; `prepare(app)` runs before startup (e.g. to wrap a policy)."""
        registry = CollectorRegistry()
        app = build_app(config, registry=registry)
        if prepare is not None:
            prepare(app)
        runner = app_runner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return RunningGateway(f"http://127.0.0.1:{runner.addresses[0][1]}", app, registry)

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session

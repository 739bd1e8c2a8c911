"""Fixtures for the simulator tests: a fast one-pod fleet, an HTTP client, a KV-event subscriber."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from sim_helpers import FAST, Subscriber

from bench.sim.fleet import SimFleet
from bench.sim.pod import SimPod


@pytest.fixture
async def pod() -> AsyncIterator[SimPod]:
    async with SimFleet(1, **FAST) as fleet:
        yield fleet.pods[0]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


@pytest.fixture
def subscriber() -> Iterator[Subscriber]:
    sub = Subscriber()
    yield sub
    sub.close()

"""Drive a workload against one OpenAI base URL: open loop (on schedule) or closed loop (N users).

The load generator must not be the bottleneck, so it measures itself: the CPU time this process spent
per request, and how late each request started against its schedule (arrival lag).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import aiohttp

from bench.loadgen.client import RequestResult, send
from bench.loadgen.stats import Dist
from bench.workloads.arrivals import Arrival, ClosedLoop, start_times
from bench.workloads.base import Session, Workload

Progress = Callable[[RequestResult], None]
T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to completion on uvloop (the loop the gateway uses too), or asyncio's where absent."""
    try:
        import uvloop
    except ImportError:  # uvloop is not available on every platform
        return asyncio.run(coro)
    return uvloop.run(coro)


@dataclass(slots=True, frozen=True)
class Overhead:
    """The load generator's own cost during a run: CPU seconds of this process, per request, as a
    share of one core, and the lag of requests behind their scheduled start."""

    cpu_s: float
    cpu_ms_per_request: float
    cpu_share: float
    lag: Dist

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class RunOutcome:
    results: list[RequestResult]
    duration_s: float
    overhead: Overhead


async def run_workload(
    base_url: str, model: str, workload: Workload, arrival: Arrival, *,
    progress: Progress | None = None, request_timeout_s: float = 300.0,
) -> RunOutcome:
    """Run every session of `workload` against `base_url`; returns the results in completion order.

    The run's duration spans from the first send to the last completion.
    """
    results: list[RequestResult] = []
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
    cpu0 = time.process_time()
    t0 = time.perf_counter()

    async with aiohttp.ClientSession(connector=connector) as http:

        async def run_session(session: Session, scheduled: float) -> None:
            for i, req in enumerate(session.requests):
                result = await send(http, base_url, model, req, RequestResult(req.tag, scheduled), t0,
                                    request_timeout_s)
                results.append(result)
                if progress is not None:
                    progress(result)
                think = session.think_after(i)
                scheduled = time.perf_counter() - t0 + think
                if think > 0 and i + 1 < len(session.requests):
                    await asyncio.sleep(think)

        if isinstance(arrival, ClosedLoop):
            pending = deque(workload.sessions)

            async def user() -> None:
                while pending:
                    await run_session(pending.popleft(), time.perf_counter() - t0)

            await asyncio.gather(*(user() for _ in range(arrival.users)))
        else:
            tasks = []
            for session, at in zip(workload.sessions, start_times(workload, arrival), strict=True):
                delay = t0 + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(run_session(session, at)))
            await asyncio.gather(*tasks)

    duration = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    n = max(len(results), 1)
    lags = [max(0.0, r.started - r.scheduled) for r in results]
    overhead = Overhead(cpu, 1000.0 * cpu / n, cpu / max(duration, 1e-9), Dist.of(lags))
    return RunOutcome(results, duration, overhead)

"""Background rounds on a fixed period, shared by the health checker and the load scraper."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

log = logging.getLogger("kvgate.periodic")

Round = Callable[[], Awaitable[None]]


async def every(interval: float, round_: Round) -> None:
    """Run `round_` every `interval` seconds, the first time `interval` from now. The period is
    measured from each round's start, so a slow round delays the next one instead of piling rounds up.
    Runs until cancelled."""
    loop = asyncio.get_running_loop()
    next_round = loop.time() + interval
    while True:
        await asyncio.sleep(max(0.0, next_round - loop.time()))
        next_round = loop.time() + interval
        await round_()


@contextlib.asynccontextmanager
async def rounds(name: str, interval: float, round_: Round) -> AsyncIterator[None]:
    """One round now (so serving starts from fresh state), then `every(interval, round_)` in a
    background task named `name`, cancelled when the block exits; a crash of that task is logged."""
    await round_()
    task = asyncio.create_task(every(interval, round_), name=name)
    task.add_done_callback(_log_crash)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s crashed", task.get_name(), exc_info=task.exception())

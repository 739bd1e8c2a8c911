"""Background rounds on a fixed period, shared by the health checker and the load scraper."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


async def every(interval: float, round_: Callable[[], Awaitable[None]]) -> None:
    """Run `round_` every `interval` seconds, the first time `interval` from now (startup runs one
    itself). The period is measured from each round's start, so a slow round delays the next one
    instead of piling rounds up. Runs until cancelled."""
    loop = asyncio.get_running_loop()
    next_round = loop.time() + interval
    while True:
        await asyncio.sleep(max(0.0, next_round - loop.time()))
        next_round = loop.time() + interval
        await round_()

"""Helpers shared by every test package (tests/support is on sys.path: pyproject's `pythonpath`).

Tests wait for a condition, never sleep and then assert: `await eventually(lambda: pod.healthy,
within=2.0, what="the pod to turn healthy")`.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
from collections.abc import Awaitable, Callable

import pytest

POLL_INTERVAL_S = 0.01


async def eventually(
    predicate: Callable[[], bool | Awaitable[bool]],
    *,
    within: float = 10.0,
    what: str = "the condition",
    interval: float = POLL_INTERVAL_S,
) -> None:
    """Poll `predicate` (plain or async) every `interval` seconds until it returns true; raise
    AssertionError naming `what` when `within` seconds pass first. Checked once more at the deadline,
    so a condition that holds then passes even if the loop was slow to get there."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {within:g} s waiting for {what}")
        await asyncio.sleep(min(interval, max(0.0, deadline - loop.time())))


def free_port() -> int:
    """A TCP port on 127.0.0.1 the OS says is free now (for a process that cannot take port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_binary(found: str | None, name: str, ci_hint: str, local_hint: str) -> str:
    """The path of a service a test starts (Prometheus, Redis, Envoy): missing, the test fails in CI
    (`.ci/run` installs it, so its absence is a bug) and is skipped elsewhere, saying how to install it."""
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing in CI: {ci_hint}")
        pytest.skip(f"{name} not installed ({local_hint})")
    return found

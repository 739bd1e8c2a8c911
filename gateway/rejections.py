"""Requests the gateway refuses (malformed targets, bodies, encodings, limits, keys; HTTP the server
cannot even parse) are counted, not logged one by one: `kvgate_rejected_requests_total{reason}`, and
one summary line per `logs.rejected_interval` naming the counts by reason. A burst of bad traffic
thus costs one log line per interval and no traceback.

`ProtocolLog` is the logger aiohttp's server is given (Application handler_args): the errors aiohttp
raises itself while parsing a request (HttpProcessingError: bad request line, headers, chunk framing;
it answers those 400 before any handler runs) are counted as `protocol` instead of logged with their
traceback. Everything else it logs goes to `aiohttp.server` unchanged.
"""

from __future__ import annotations

import collections
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger("kvgate.rejections")


class Rejections:
    """Counts refused requests by reason; `flush` logs what was counted since the previous flush."""

    def __init__(self, registry: CollectorRegistry, clock: Callable[[], float] = time.monotonic) -> None:
        self._counter = Counter(
            "kvgate_rejected_requests",
            "Client requests the gateway refused itself (4xx), by reason ('protocol': unparseable HTTP).",
            ["reason"],
            registry=registry,
        )
        self._children: dict[str, Any] = {}
        self._pending: collections.Counter[str] = collections.Counter()
        self._clock = clock
        self._since = clock()

    def count(self, reason: str) -> None:
        child = self._children.get(reason)
        if child is None:
            child = self._children[reason] = self._counter.labels(reason)
        child.inc()
        self._pending[reason] += 1

    def flush(self) -> None:
        now = self._clock()
        if self._pending:
            total = sum(self._pending.values())
            reasons = ", ".join(f"{r}={n}" for r, n in sorted(self._pending.items()))
            log.warning("refused %d request(s) in the last %.0f s: %s", total, now - self._since, reasons)
            self._pending.clear()
        self._since = now

    async def flush_round(self) -> None:
        self.flush()


class ProtocolLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server logger: its parse errors are counted (reason `protocol`), not logged."""

    def __init__(self, rejections: Rejections) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})
        self.rejections = rejections

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if exc is True:
            exc = sys.exc_info()[1]
        if isinstance(exc, HttpProcessingError):
            self.rejections.count("protocol")
            return
        super().log(level, msg, *args, **kwargs)


REJECTIONS = web.AppKey("kvgate_rejections", Rejections)

"""Per-tenant rate limits: token buckets holding one minute's allowance, refilled continuously.

A request is admitted when every bucket holds what it costs (1 request; its estimated tokens), and
then takes it; otherwise it is refused with the seconds until the buckets would hold enough
(`Retry-After`). A request costing more than a whole minute's allowance is checked against a full
bucket, so it can pass once the bucket is full rather than never.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(slots=True)
class Bucket:
    per_minute: float
    level: float
    updated: float

    @classmethod
    def full(cls, per_minute: float, now: float) -> Bucket:
        return cls(per_minute, per_minute, now)

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.per_minute, self.level + (now - self.updated) * self.per_minute / 60.0)
        self.updated = now

    def wait_for(self, amount: float) -> float:
        """Seconds until the bucket holds `amount` (capped at its size); 0.0 when it does now."""
        need = min(amount, self.per_minute) - self.level
        if need <= 0:
            return 0.0
        return need * 60.0 / self.per_minute if self.per_minute > 0 else math.inf


@dataclass(slots=True)
class RateLimit:
    """The buckets of one tenant (None: no such limit)."""

    requests: Bucket | None
    tokens: Bucket | None

    @classmethod
    def of(cls, requests_per_minute: float | None, tokens_per_minute: float | None,
           now: float) -> RateLimit | None:
        if requests_per_minute is None and tokens_per_minute is None:
            return None
        req = Bucket.full(requests_per_minute, now) if requests_per_minute is not None else None
        tok = Bucket.full(tokens_per_minute, now) if tokens_per_minute is not None else None
        return cls(req, tok)

    def take(self, tokens: float, now: float) -> tuple[str, float] | None:
        """Take one request and `tokens` when both fit; else (which limit: "requests"/"tokens",
        seconds to wait) and nothing is taken."""
        for kind, bucket, amount in (("requests", self.requests, 1.0), ("tokens", self.tokens, tokens)):
            if bucket is not None:
                bucket.refill(now)
                wait = bucket.wait_for(amount)
                if wait > 0:
                    return kind, wait
        if self.requests is not None:
            self.requests.level -= 1.0
        if self.tokens is not None:
            self.tokens.level -= min(tokens, self.tokens.per_minute)
        return None

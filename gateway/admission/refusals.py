"""The OpenAI-shaped answers of admission control (gateway.errors.GatewayError, so the middleware
answers and counts them like every other refusal)."""

from __future__ import annotations

import math

from gateway.errors import GatewayError


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(min(seconds, 3600.0))))}


def forbidden(message: str) -> GatewayError:
    return GatewayError(403, message, type="permission_error", code="model_not_allowed", param="model",
                        reason="tenant_forbidden")


def rate_limited(tenant: str, kind: str, wait_s: float) -> GatewayError:
    return GatewayError(
        429, f"Rate limit reached for tenant `{tenant}` ({kind} per minute). Retry later.",
        type=kind, code="rate_limit_exceeded", reason="rate_limited", headers=_retry_after(wait_s),
    )


def queue_full(tenant: str, what: str, wait_s: float) -> GatewayError:
    return GatewayError(
        429, f"The admission queue is full ({what}) for tenant `{tenant}`. Retry later.",
        type="requests", code="queue_full", reason="queue_full", headers=_retry_after(wait_s),
    )


def queue_timeout(waited_s: float) -> GatewayError:
    return GatewayError(
        503,
        f"The request waited {waited_s:.3g} s in the gateway's admission queue, its deadline, "
        "without capacity freeing up. Retry later.",
        type="service_unavailable_error", code="queue_timeout", headers=_retry_after(1.0),
    )


def shutting_down() -> GatewayError:
    return GatewayError(
        503, "The gateway is shutting down; the request was not sent to any pod. Retry.",
        type="service_unavailable_error", code="shutting_down", headers=_retry_after(1.0),
    )


def bad_queue_timeout(value: str) -> GatewayError:
    return GatewayError(400, f"x-kvgate-queue-timeout must be a number of seconds >= 0, got {value[:40]!r}.",
                        code="invalid_value", param="x-kvgate-queue-timeout", reason="invalid_header")

"""Optional API keys: clients present `Authorization: Bearer KEY`; keys come from a file and/or an env var."""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.config import Auth
from gateway.errors import unauthorized
from gateway.target import TARGET_KEY

# Liveness, readiness and metrics stay open so that orchestrators and Prometheus need no key.
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})


def load_api_keys(auth: Auth) -> tuple[bytes, ...]:
    """The configured keys (empty: authentication is off). A configured but missing file raises OSError."""
    keys: list[str] = []
    if auth.api_keys_file:
        with open(auth.api_keys_file, encoding="utf-8") as f:
            keys += [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    if auth.api_keys_env:
        keys += [k.strip() for k in os.environ.get(auth.api_keys_env, "").split(",") if k.strip()]
    return tuple(k.encode() for k in keys)


def key_matches(presented: bytes, keys: tuple[bytes, ...]) -> bool:
    """Constant-time in the key's content: every configured key is compared, with no early exit."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(presented, key)
    return found


def auth_middleware(
    current_keys: Callable[[], tuple[bytes, ...]],
) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Checks each request against `current_keys()` (read per request, so a config reload rotates
    keys at once); no keys: every request passes."""

    @web.middleware
    async def check_api_key(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        keys = current_keys()
        target = request.get(TARGET_KEY)  # resolved by the outer middleware; decoded and checked
        if keys and (target is None or target.path not in OPEN_PATHS):
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not key_matches(token.strip().encode(), keys):
                raise unauthorized()
        return await handler(request)

    return check_api_key

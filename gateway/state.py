"""Typed application state shared by the gateway's handlers and background tasks (aiohttp AppKeys)."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from aiohttp import web

from gateway.config import GatewayConfig
from gateway.health import HealthTracker
from gateway.metrics import GatewayMetrics
from gateway.pools import Pools
from gateway.proxy import Proxy


@dataclass(slots=True)
class GatewayState:
    """Built once at startup (build_app); the proxy and session are added by their cleanup_ctx entry."""

    config: GatewayConfig
    pools: Pools
    metrics: GatewayMetrics
    health: HealthTracker
    api_keys: tuple[bytes, ...]
    started: int  # unix time, reported as `created` by /v1/models


STATE = web.AppKey("kvgate_state", GatewayState)
SESSION = web.AppKey("kvgate_session", aiohttp.ClientSession)
PROXY = web.AppKey("kvgate_proxy", Proxy)

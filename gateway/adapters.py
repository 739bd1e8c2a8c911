"""Learned LoRA adapters: what each pool's pods list in `GET /v1/models`.

vLLM lists a LoRA module as a model card whose `parent` is the base model's served name (`root`: the
adapter's path). Every `interval` (rarely: the list changes only when an operator loads or unloads an
adapter) the poller asks each healthy pod and gives a pool the union of the adapters its answering
pods list with the pool's model as parent (gateway.pools.Pools.learn_adapters); a round in which no
pod of a pool answered changes nothing for it. Each request counts in
`kvgate_probes_total{kind="models"}`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import orjson

from gateway.metrics import GatewayMetrics
from gateway.pools import Pool, Pools
from router.endpoint import Endpoint

log = logging.getLogger("kvgate.adapters")

MODELS_PATH = "/v1/models"
POLL_INTERVAL_S = 30.0  # adapters change by operator action: a rare, cheap probe suffices


def adapters_listed(payload: Any, base_model: str) -> set[str] | None:
    """The adapter ids of a /v1/models answer whose parent is `base_model`; None when it is not
    the OpenAI list shape."""
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        return None
    names = set()
    for card in data:
        if not isinstance(card, dict):
            continue
        name, parent = card.get("id"), card.get("parent")
        if isinstance(name, str) and name and name != base_model and parent == base_model:
            names.add(name)
    return names


class AdapterPoller:
    """One round (`poll_all`) asks every healthy pod of every pool for its models."""

    def __init__(
        self, session: aiohttp.ClientSession, pools: Pools, metrics: GatewayMetrics, *, timeout: float
    ) -> None:
        self.session = session
        self.pools = pools
        self.metrics = metrics
        self.timeout = aiohttp.ClientTimeout(total=timeout)

    async def poll_all(self) -> None:
        await asyncio.gather(*(self.poll(pool) for pool in self.pools))

    async def poll(self, pool: Pool) -> None:
        answers = await asyncio.gather(
            *(self._listed(ep, pool.model) for ep in pool.endpoints if ep.healthy)
        )
        found = [names for names in answers if names is not None]
        if found:
            self.pools.learn_adapters(pool, set().union(*found))

    async def _listed(self, ep: Endpoint, base_model: str) -> set[str] | None:
        self.metrics.probes(ep.url, "models").inc()
        try:
            async with self.session.get(ep.url + MODELS_PATH, timeout=self.timeout) as resp:
                if resp.status != 200:
                    return None
                payload = orjson.loads(await resp.read())
        except (TimeoutError, aiohttp.ClientError, orjson.JSONDecodeError) as exc:
            log.debug("GET %s%s failed: %s", ep.url, MODELS_PATH, exc)
            return None
        return adapters_listed(payload, base_model)

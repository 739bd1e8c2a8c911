"""LoRA adapters in the gateway: the `adapters` config key, routing by adapter name, adapters learned
from the pods' /v1/models, and the gateway's own /v1/models listing them."""

from __future__ import annotations

import argparse
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway import errors
from gateway.adapters import AdapterPoller, adapters_listed
from gateway.config import config_from_mapping
from gateway.handlers import select_pool
from gateway.pools import build_pools
from gateway.serve_cli import add_arguments, config_from_args
from gateway.state import SESSION, STATE


def two_pools(alpha: dict[str, Any] | None = None, beta: dict[str, Any] | None = None) -> Any:
    return config_from_mapping({
        "pools": {
            "alpha": {"endpoints": [{"url": "http://127.0.0.1:1"}], **(alpha or {})},
            "beta": {"endpoints": [{"url": "http://127.0.0.1:2"}], **(beta or {})},
        }
    })


def test_adapters_route_to_their_pool() -> None:
    pools = build_pools(two_pools({"adapters": ["a1", "a2"]}), CollectorRegistry())
    alpha, beta = pools.by_model["alpha"], pools.by_model["beta"]
    assert select_pool(pools, {"model": "a1"}) is alpha and select_pool(pools, {"model": "a2"}) is alpha
    assert select_pool(pools, {"model": "beta"}) is beta
    with pytest.raises(errors.GatewayError) as exc:
        select_pool(pools, {"model": "a3"})
    assert exc.value.status == 404
    assert list(pools.adapters()) == [("a1", alpha), ("a2", alpha)]


@pytest.mark.parametrize(
    ("alpha", "beta", "message"),
    [
        ({"adapters": ["beta"]}, {}, "'beta' is the model of a pool"),
        ({"adapters": ["alpha"]}, {}, "'alpha' is the model of a pool"),
        ({"adapters": ["a1"]}, {"adapters": ["a1"]}, "'a1' is already an adapter of pool 'alpha'"),
        ({"adapters": ["a1", "a1"]}, {}, "'a1' is already an adapter"),
        ({"adapters": [""]}, {}, "must not be empty"),
        ({"adapters": "a1"}, {}, "pools.alpha.adapters: expected a list"),
        ({"adapters": [1]}, {}, r"adapters\[0\]: expected str"),
    ],
)
def test_clashing_or_malformed_adapters_are_config_errors(alpha: Any, beta: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        two_pools(alpha, beta)


def test_learned_adapters_follow_the_pods_and_never_steal_a_name() -> None:
    pools = build_pools(two_pools({"adapters": ["a1"]}), CollectorRegistry())
    alpha, beta = pools.by_model["alpha"], pools.by_model["beta"]
    pools.learn_adapters(beta, {"b1", "a1", "alpha", "beta"})  # a1, alpha: other pools'; beta: its own
    assert pools.get("b1") is beta and pools.get("a1") is alpha and pools.get("alpha") is alpha
    assert beta.learned_adapters == {"b1"}
    pools.learn_adapters(alpha, {"a1", "b1"})  # b1 is beta's now
    assert pools.get("b1") is beta and alpha.learned_adapters == {"a1"}
    pools.learn_adapters(beta, set())  # unloaded on the pods: the name routes nowhere
    assert pools.get("b1") is None
    assert pools.get("a1") is alpha  # configured adapters stay
    assert [name for name, _ in pools.adapters()] == ["a1"]


def test_adapters_listed_reads_vllms_cards() -> None:
    payload = {"object": "list", "data": [
        {"id": "base", "root": "/models/base", "parent": None},
        {"id": "a1", "root": "/loras/a1", "parent": "base"},
        {"id": "x", "root": "/loras/x", "parent": "other"},
        {"id": 3, "parent": "base"}, "junk",
    ]}
    assert adapters_listed(payload, "base") == {"a1"}
    assert adapters_listed({"data": None}, "base") is None and adapters_listed([], "base") is None


def test_serve_flag_adds_adapters_to_the_quick_pool() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, environ={})
    flags = ["--backend", "http://p:8000", "--model", "m", "--adapter", "a1", "--adapter", "a2"]
    args = parser.parse_args(flags)
    assert config_from_args(args).pools[0].adapters == ["a1", "a2"]
    env_parser = argparse.ArgumentParser()
    add_arguments(env_parser, environ={"KVGATE_ADAPTER": "a1 a2"})
    args = env_parser.parse_args(["--backend", "http://p:8000", "--model", "m"])
    assert config_from_args(args).pools[0].adapters == ["a1", "a2"]


class ModelsPod:
    """A pod answering /health and /v1/models with `cards` (scripted), counting the listings."""

    def __init__(self, cards: list[dict[str, Any]]) -> None:
        self.cards = cards
        self.listed = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def models(self, request: web.Request) -> web.Response:
        self.listed += 1
        return web.json_response({"object": "list", "data": self.cards})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


async def test_gateway_learns_adapters_at_startup_and_lists_them(start_gateway, client) -> None:
    pod = ModelsPod([{"id": "m", "parent": None}, {"id": "a2", "root": "/l/a2", "parent": "m"}])
    await pod.start()
    try:
        config = config_from_mapping({
            "pools": {"m": {"endpoints": [{"url": pod.url}], "adapters": ["a1"]}},
            "scrape": {"interval": 0},
        })
        gw = await start_gateway(config)
        assert pod.listed == 1  # one round before serving
        assert gw.registry.get_sample_value(
            "kvgate_probes_total", {"endpoint": pod.url, "kind": "models"}
        ) == 1.0
        async with client.get(gw.url + "/v1/models") as r:
            data = (await r.json())["data"]
        assert [(m["id"], m.get("parent")) for m in data] == [("m", None), ("a1", "m"), ("a2", "m")]
        assert "parent" not in data[0]  # base models keep their shape
        assert data[2]["root"] == "a2" and data[2]["object"] == "model"
    finally:
        await pod.stop()


async def test_a_round_without_answers_keeps_the_learned_adapters(start_gateway) -> None:
    pod = ModelsPod([{"id": "a2", "parent": "m"}])
    await pod.start()
    config = config_from_mapping({
        "pools": {"m": {"endpoints": [{"url": pod.url}]}}, "scrape": {"interval": 0},
    })
    gw = await start_gateway(config)
    state = gw.app[STATE]
    pools, pool = state.pools, state.pools.by_model["m"]
    assert pools.get("a2") is pool
    poller = AdapterPoller(gw.app[SESSION], pools, state.metrics, timeout=0.2)
    pod.cards = [{"id": "a3", "parent": "m"}]  # a2 unloaded, a3 loaded
    await poller.poll_all()
    assert pools.get("a2") is None and pools.get("a3") is pool
    await pod.stop()
    await poller.poll_all()  # the pod is asked (still healthy to the gateway) and does not answer
    assert pools.get("a3") is pool
    pool.endpoints[0].healthy = False
    listed = pod.listed
    await poller.poll_all()  # an unhealthy pod is not asked
    assert pod.listed == listed and pools.get("a3") is pool

"""Never eject a whole pool: panic routing (Envoy's panic threshold) and timeouts as weaker evidence.

Pool.candidates and HealthTracker are checked directly (table-driven); the rest runs a real gateway in
front of fake pods on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from aiohttp import web
from gateway_fakes import FakePod, pool_config
from helpers import eventually
from prometheus_client import CollectorRegistry

from gateway.health import CheckResult, HealthTracker
from gateway.metrics import GatewayMetrics
from gateway.pools import Pool
from gateway.state import STATE
from router.endpoint import Endpoint
from router.policies.round_robin import RoundRobinPolicy

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
INTERVAL = 0.2  # pool_config's health interval and timeout


def _pool(healthy: list[bool], roles: list[str] | None = None) -> Pool:
    roles = roles or ["both"] * len(healthy)
    eps = [
        Endpoint(url=f"http://p{i}", model="m", role=role, healthy=ok)  # type: ignore[arg-type]
        for i, (ok, role) in enumerate(zip(healthy, roles, strict=True))
    ]
    return Pool("m", "round_robin", RoundRobinPolicy(seed=1), eps)


@pytest.mark.parametrize(
    ("healthy", "threshold", "expect", "panic"),
    [
        ([True, True, False, False], 0.0, [0, 1], False),
        ([False, False, False, False], 0.0, [0, 1, 2, 3], True),  # default: only when none is healthy
        ([True, False, False, False], 0.0, [0], False),
        ([True, True, False, False], 0.5, [0, 1], False),  # share 0.5 is not below 0.5
        ([True, False, False, False], 0.5, [0, 1, 2, 3], True),  # share 0.25 < 0.5
        ([True, True, True, True], 1.0, [0, 1, 2, 3], False),
        ([True, True, True, False], 1.0, [0, 1, 2, 3], True),
    ],
)
def test_candidates_panic_threshold(healthy, threshold, expect, panic):
    pool = _pool(healthy)
    candidates, in_panic = pool.candidates([], threshold)
    assert [pool.endpoints.index(ep) for ep in candidates] == expect
    assert in_panic is panic


def test_panic_ignores_prefill_pods_and_keeps_excluding_tried_ones():
    pool = _pool([True, False, False, False], roles=["prefill", "both", "decode", "both"])
    candidates, panic = pool.candidates([pool.endpoints[1]])
    assert panic  # the prefill pod's health does not count: none of the three others is healthy
    assert candidates == [pool.endpoints[2], pool.endpoints[3]]
    assert pool.candidates(list(pool.endpoints))[0] == []


def _tracker(eject_after_timeouts: int = 2) -> tuple[HealthTracker, Endpoint, CollectorRegistry]:
    registry = CollectorRegistry()
    ep = Endpoint(url="http://p0", model="m")
    metrics = GatewayMetrics(registry, lambda: [ep])
    tracker = HealthTracker(metrics, 3, eject_after_timeouts=eject_after_timeouts)
    return tracker, ep, registry


OK, FAILED, TIMEOUT = CheckResult.OK, CheckResult.FAILED, CheckResult.TIMEOUT


@pytest.mark.parametrize(
    ("results", "after", "healthy"),
    [
        ([FAILED], 2, False),  # refused / non-2xx: ejected at once
        ([TIMEOUT], 2, True),  # one slow answer is not enough
        ([TIMEOUT, TIMEOUT], 2, False),
        ([TIMEOUT, OK, TIMEOUT], 2, True),  # not consecutive
        ([TIMEOUT, FAILED], 2, False),
        ([TIMEOUT], 1, False),  # eject_after_timeouts 1: the old rule
        ([TIMEOUT, TIMEOUT], 3, True),
        ([FAILED, OK], 2, True),  # one good check re-admits
        ([TIMEOUT, TIMEOUT, TIMEOUT, OK], 2, True),
    ],
)
def test_tracker_ejects_on_failure_at_once_and_on_consecutive_timeouts(results, after, healthy):
    tracker, ep, _ = _tracker(after)
    for result in results:
        tracker.check_result(ep, result)
    assert ep.healthy is healthy


def test_tracker_counts_one_ejection_and_restarts_the_timeout_count_after_readmission():
    tracker, ep, registry = _tracker(2)
    for result in (TIMEOUT, TIMEOUT, TIMEOUT, OK, TIMEOUT):
        tracker.check_result(ep, result)
    assert ep.healthy
    labels = {"endpoint": ep.url, "cause": "active"}
    assert registry.get_sample_value("kvgate_ejections_total", labels) == 1.0


@dataclass
class SlowHealthPod(FakePod):
    """A fake pod whose /health answers after `health_delay` seconds for its next `slow_checks` checks."""

    health_delay: float = 0.0
    slow_checks: int = 0
    health_calls: int = 0

    async def health(self, request: web.Request) -> web.Response:
        self.health_calls += 1
        if self.slow_checks > 0:
            self.slow_checks -= 1
            await asyncio.sleep(self.health_delay)
        return await super().health(request)


async def _slow_pods(n: int) -> list[SlowHealthPod]:
    pods = [SlowHealthPod(name=f"slow{i}") for i in range(n)]
    for pod in pods:
        await pod.start()
    return pods


async def _post(client, gw_url: str) -> tuple[int, dict, str]:
    async with client.post(gw_url + "/v1/chat/completions", json=CHAT) as r:
        return r.status, await r.json(), r.headers.get("x-kvgate-endpoint", "")


async def _metric(client, gw_url: str, line: str) -> float:
    async with client.get(gw_url + "/metrics") as r:
        text = await r.text()
    return float(text.split(line + " ", 1)[1].split("\n", 1)[0]) if line + " " in text else 0.0


async def test_whole_fleet_ejected_for_slow_health_still_serves_over_all_pods(start_gateway, client):
    pods = await _slow_pods(3)
    try:
        gw = await start_gateway(pool_config([p.url for p in pods]))
        for pod in pods:  # CPU starvation: every health answer is slower than the timeout
            pod.health_delay, pod.slow_checks = 1.0, 10**6
        endpoints = gw.app[STATE].pools.get("m").endpoints
        await eventually(lambda: not any(ep.healthy for ep in endpoints), within=10 * INTERVAL)
        served = []
        for _ in range(6):
            status, _, endpoint = await _post(client, gw.url)
            assert status == 200
            served.append(endpoint)
        assert set(served) == {p.url for p in pods}  # round robin over all of them, not a 503
        assert await _metric(client, gw.url, 'kvgate_panic_routing_total{model="m"}') == 6.0
    finally:
        for pod in pods:
            await pod.stop()


async def test_below_panic_threshold_routes_over_all_pods(fake_pods, start_gateway, client):
    pods = await fake_pods(4)
    gw = await start_gateway(pool_config([p.url for p in pods], health={"panic_threshold": 0.5}))
    endpoints = gw.app[STATE].pools.get("m").endpoints
    pods[3].healthy = pods[2].healthy = False  # 2 of 4 healthy: share 0.5, not below the threshold
    await eventually(lambda: not endpoints[2].healthy and not endpoints[3].healthy, within=10 * INTERVAL)
    served = {(await _post(client, gw.url))[2] for _ in range(8)}
    assert served == {pods[0].url, pods[1].url}
    assert await _metric(client, gw.url, 'kvgate_panic_routing_total{model="m"}') == 0.0
    pods[1].healthy = False  # 1 of 4: share 0.25 < 0.5, panic
    await eventually(lambda: not endpoints[1].healthy, within=10 * INTERVAL)
    served = {(await _post(client, gw.url))[2] for _ in range(8)}
    assert served == {p.url for p in pods}
    assert await _metric(client, gw.url, 'kvgate_panic_routing_total{model="m"}') == 8.0


async def test_panic_keeps_retrying_and_a_dead_fleet_ends_in_502_fast(fake_pods, start_gateway, client):
    pods = await fake_pods(3)
    gw = await start_gateway(pool_config([p.url for p in pods], retries={"max_retries": 2}))
    endpoints = gw.app[STATE].pools.get("m").endpoints
    await pods[0].stop()
    await pods[1].stop()
    pods[2].healthy = False  # answers requests, fails its health checks: every pod is ejected
    await eventually(lambda: not any(ep.healthy for ep in endpoints), within=10 * INTERVAL)
    for _ in range(3):  # the dead pods refuse, the retry reaches the live one
        status, _, endpoint = await _post(client, gw.url)
        assert (status, endpoint) == (200, pods[2].url)
    await pods[2].stop()
    for _ in range(2):
        status, body, _ = await asyncio.wait_for(_post(client, gw.url), timeout=10)  # no hang
        assert status == 502
        assert body["error"]["code"] == "upstream_failed" and "3 attempt(s)" in body["error"]["message"]


async def test_one_slow_health_answer_does_not_eject_but_a_hung_pod_is_ejected(start_gateway, client):
    slow, other = await _slow_pods(2)
    try:
        gw = await start_gateway(pool_config([slow.url, other.url]))
        endpoint = gw.app[STATE].pools.get("m").endpoints[0]
        line = f'kvgate_ejections_total{{cause="active",endpoint="{slow.url}"}}'
        slow.health_delay, slow.slow_checks = 3 * INTERVAL, 1
        calls = slow.health_calls
        await eventually(lambda: slow.health_calls >= calls + 4, within=20 * INTERVAL)
        assert slow.slow_checks == 0 and endpoint.healthy  # the slow check happened, and was forgiven
        assert await _metric(client, gw.url, line) == 0.0
        slow.slow_checks = 10**6  # hung: every check times out
        await eventually(lambda: not endpoint.healthy, within=10 * INTERVAL)
        assert await _metric(client, gw.url, line) == 1.0
        served = {(await _post(client, gw.url))[2] for _ in range(4)}
        assert served == {other.url}
    finally:
        for pod in (slow, other):
            await pod.stop()


@pytest.mark.parametrize(
    "health",
    [
        {"panic_threshold": -0.1},
        {"panic_threshold": 1.5},
        {"panic_threshold": "x"},
        {"eject_after_timeouts": 0},
    ],
)
def test_config_rejects_bad_panic_threshold_and_timeout_count(health):
    with pytest.raises(ValueError, match="health"):
        pool_config(["http://127.0.0.1:1"], health=health)


def test_config_defaults_panic_only_when_none_healthy_and_two_timeouts():
    health = pool_config(["http://127.0.0.1:1"]).health
    assert (health.panic_threshold, health.eject_after_timeouts) == (0.0, 2)

"""Active health checks, passive ejection, re-admission, and load scraping."""

from __future__ import annotations

from gateway_fakes import pool_config
from helpers import eventually

from gateway.state import STATE

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
INTERVAL = 0.2


async def _send(client, url: str, n: int) -> list[str]:
    served = []
    for _ in range(n):
        async with client.post(url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
            served.append(r.headers["x-kvgate-endpoint"])
    return served


async def test_failing_health_check_ejects_within_three_intervals_and_recovery_readmits(
    fake_pods, start_gateway, client
):
    sick, well = await fake_pods(2)
    gw = await start_gateway(pool_config([sick.url, well.url], health={"interval": INTERVAL}))
    assert set(await _send(client, gw.url, 4)) == {sick.url, well.url}
    sick.healthy = False
    endpoint = gw.app[STATE].pools.get("m").endpoints[0]
    # it answered traffic just now, so its next probe may wait one interval (its traffic was the check)
    await eventually(lambda: not endpoint.healthy, within=3 * INTERVAL, what="the sick pod's ejection")
    before = len(sick.seen)
    assert set(await _send(client, gw.url, 6)) == {well.url}
    assert len(sick.seen) == before
    async with client.get(gw.url + "/metrics") as r:
        text = await r.text()
    assert f'kvgate_ejections_total{{cause="active",endpoint="{sick.url}"}} 1.0' in text
    assert f'kvgate_endpoint_healthy{{endpoint="{sick.url}",model="m"}} 0.0' in text
    sick.healthy = True
    await eventually(lambda: endpoint.healthy, within=4 * INTERVAL)
    assert sick.url in set(await _send(client, gw.url, 6))


async def test_consecutive_failed_attempts_eject_passively(fake_pods, start_gateway, client):
    flaky, good = await fake_pods(2)
    flaky.status = 503  # /health still says OK: only the attempts reveal the problem
    config = pool_config(
        [flaky.url, good.url], health={"interval": 30, "eject_after": 2}, retries={"max_retries": 1}
    )
    gw = await start_gateway(config)
    served = await _send(client, gw.url, 10)
    assert set(served) == {good.url}  # every failure was retried on the good pod
    assert len(flaky.seen) == 2  # then it was ejected and got nothing more
    endpoint = gw.app[STATE].pools.get("m").endpoints[0]
    assert not endpoint.healthy


async def test_stopped_pod_gets_nothing_after_two_intervals_then_returns(fake_pods, start_gateway, client):
    a, b, c = await fake_pods(3)
    gw = await start_gateway(pool_config([a.url, b.url, c.url], health={"interval": INTERVAL}))
    endpoint = gw.app[STATE].pools.get("m").endpoints[0]
    await a.stop()
    await eventually(lambda: not endpoint.healthy, within=2 * INTERVAL, what="the stopped pod's ejection")
    assert a.url not in set(await _send(client, gw.url, 9))
    await a.restart()
    await eventually(lambda: endpoint.healthy, within=4 * INTERVAL)
    assert a.url in set(await _send(client, gw.url, 9))


async def test_scraper_writes_pod_load_into_endpoints(fake_pods, start_gateway):
    (pod,) = await fake_pods(1)
    gw = await start_gateway(pool_config([pod.url]))
    endpoint = gw.app[STATE].pools.get("m").endpoints[0]
    await eventually(lambda: endpoint.last_scrape > 0)
    assert (endpoint.waiting, endpoint.kv_usage) == (2, 0.5)
    assert (endpoint.block_size, endpoint.num_gpu_blocks) == (32, 128)


async def test_scrape_errors_are_counted(fake_pods, start_gateway, client):
    a, b = await fake_pods(2)
    gw = await start_gateway(pool_config([a.url, b.url], health={"interval": 30}))
    await b.stop()

    async def errors() -> float:
        async with client.get(gw.url + "/metrics") as r:
            text = await r.text()
        line = f'kvgate_scrape_errors_total{{endpoint="{b.url}"}} '
        return float(text.split(line, 1)[1].split("\n", 1)[0]) if line in text else 0.0

    first = await errors()

    async def counted() -> bool:
        return await errors() > first

    await eventually(counted, within=0.35, what="another scrape error")

"""The gateway's /metrics: the kvgate_ families the issue lists, and `promtool check metrics` clean."""

from __future__ import annotations

import asyncio
import os
import shutil

import pytest
from gateway_fakes import pool_config

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


async def _metrics_after_traffic(fake_pods, start_gateway, client) -> str:
    good, bad = await fake_pods(2)
    bad.status = 503
    gw = await start_gateway(pool_config([good.url, bad.url], retries={"max_retries": 1}))
    for stream in (False, True, False, True):
        async with client.post(gw.url + "/v1/chat/completions", json={**CHAT, "stream": stream}) as r:
            assert r.status == 200
            await r.read()
    async with client.post(gw.url + "/v1/chat/completions", json={**CHAT, "model": "nope"}) as r:
        assert r.status == 404
    async with client.get(gw.url + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return await r.text()


async def test_metric_families_present(fake_pods, start_gateway, client):
    text = await _metrics_after_traffic(fake_pods, start_gateway, client)
    for family in (
        "kvgate_requests_total",
        "kvgate_time_to_first_token_seconds_bucket",
        "kvgate_request_duration_seconds_bucket",
        "kvgate_endpoint_in_flight",
        "kvgate_retries_total",
        "kvgate_upstream_errors_total",
        "kvgate_routing_decisions_total",
        "kvgate_ejections_total",
        "kvgate_scrape_errors_total",
    ):
        assert family in text, family
    assert 'kvgate_requests_total{endpoint="' in text and 'status="200"' in text
    assert 'kvgate_time_to_first_token_seconds_count{model="m"} 4.0' in text
    assert 'kvgate_upstream_errors_total{endpoint="' in text and 'kind="status_503"' in text
    assert 'kvgate_routing_decisions_total{policy="round_robin",reason="round_robin"}' in text
    assert 'model="nope"' not in text  # unknown models do not create label values


async def test_promtool_check_metrics(fake_pods, start_gateway, client):
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing in CI: install Debian's prometheus package")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    text = await _metrics_after_traffic(fake_pods, start_gateway, client)
    proc = await asyncio.create_subprocess_exec(
        promtool, "check", "metrics",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate(text.encode())
    assert proc.returncode == 0, out.decode()
    assert out.decode().strip() == "", out.decode()  # no lint warnings either

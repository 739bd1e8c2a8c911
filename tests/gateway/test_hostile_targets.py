"""Issue 10, what a client may reach: nothing escapes the gateway's routes (traversal, encoded slashes,
absolute-form, CONNECT), the pod is sent the checked route and never the client's raw target, and a
request the gateway refuses or cannot build never counts against a pod."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from gateway_fakes import pool_config
from hostile_support import assert_openai_error, build_request, pod_path_allowed, pod_paths, send_raw

from bench.sim.fleet import SimFleet
from gateway.errors import GatewayError
from gateway.state import PROXY, STATE
from gateway.target import resolve_target

FAST = {"model": "m", "itl_ms": 1.0, "itl_ms_per_seq": 0.0, "prefill_tps": 1e7, "seed": 1}
COMPLETION = b'{"model": "m", "prompt": "hello", "max_tokens": 2}'
JSON = [("Content-Type", "application/json")]

# Targets the issue found reaching pod routes outside /v1, and their relatives.
TRAVERSALS = [
    ("POST", "/v1/%2e%2e/kvgate_sim/fault"),
    ("POST", "/v1/%2E%2E/reset_prefix_cache"),
    ("POST", "/v1/../admin"),
    ("GET", "/v1/%2e%2e/metrics"),
    ("GET", "/v1/./../metrics"),
    ("POST", "/v1/.%2e/kvgate_sim/fault"),
    ("POST", "/v1/%2e/completions"),
    ("POST", "/v1/a%2f..%2f..%2fkvgate_sim/fault"),
    ("POST", "/v1/a%2F%2E%2E%2Fkvgate_sim%2Ffault"),
    ("POST", "/v1/..%5ckvgate_sim%5cfault"),
    ("POST", "/v1\\..\\kvgate_sim\\fault"),
    ("POST", "/v1//../kvgate_sim/fault"),
    ("POST", "/v1/completions/.."),
    ("GET", "/v1/%2e%2e%2fmetrics"),
    ("GET", "/v1/%00/../metrics"),
    ("GET", "/v1/x#/../../metrics"),
]
NOT_ORIGIN_FORM = [
    ("POST", "http://x/v1/completions"),
    ("POST", "http://127.0.0.1:1/v1/completions"),
    ("GET", "https://evil.example/v1/models"),
    ("GET", "http://x"),
    ("OPTIONS", "*"),
    ("CONNECT", "x:443"),
    ("CONNECT", "/v1/completions"),
]


@pytest.fixture
async def sim_gateway(start_gateway) -> AsyncIterator[tuple[SimFleet, object]]:
    async with SimFleet(2, **FAST) as fleet:
        yield fleet, await start_gateway(pool_config(fleet.urls, health={"eject_after": 2}))


@pytest.mark.parametrize(
    ("target", "path", "encoded", "query"),
    [
        ("/v1/completions", "/v1/completions", "/v1/completions", ""),
        ("/v1/%63ompletions", "/v1/completions", "/v1/completions", ""),
        ("/v1/chat/completions?x=1", "/v1/chat/completions", "/v1/chat/completions", "x=1"),
        ("/v1/a%20b", "/v1/a b", "/v1/a%20b", ""),
        ("/v1/caf%C3%A9", "/v1/café", "/v1/caf%C3%A9", ""),
        ("/v1/x?q=%22a%22&b=<c>", "/v1/x", "/v1/x", "q=%22a%22&b=%3Cc%3E"),
        ("/v1/x?", "/v1/x", "/v1/x", ""),
        ("/v1/x?a=%2e%2e/../b", "/v1/x", "/v1/x", "a=%2e%2e/../b"),  # a query is data, not a path
        ("/tokenize", "/tokenize", "/tokenize", ""),
    ],
)
def test_accepted_targets_are_decoded_and_re_encoded_canonically(target, path, encoded, query):
    method = "POST"
    resolved = resolve_target(method, target)
    assert (resolved.kind, resolved.path, resolved.encoded, resolved.query) == ("proxy", path, encoded, query)
    expected = "http://pod:8000" + encoded + (f"?{query}" if query else "")
    assert str(resolved.upstream_url("http://pod:8000")) == expected


@pytest.mark.parametrize(
    ("method", "target", "kind"),
    [
        ("GET", "/health", "health"),
        ("HEAD", "/ready", "ready"),
        ("GET", "/metrics", "metrics"),
        ("GET", "/v1/models", "models"),
        ("POST", "/v1/models", "proxy"),  # not the gateway's to answer: passed on, as before
        ("DELETE", "/v1/models/m", "proxy"),
    ],
)
def test_gateway_routes(method, target, kind):
    assert resolve_target(method, target).kind == kind


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [
        *[(m, t, 400) for m, t in TRAVERSALS],
        *[(m, t, 400) for m, t in NOT_ORIGIN_FORM],
        ("POST", "/v1/%zz", 400),  # invalid escape
        ("POST", "/v1/%e9", 400),  # not UTF-8
        ("POST", "/v1/x?a=%g1", 400),
        ("POST", "/v1/", 400),  # empty segment
        ("POST", "/v1", 404),
        ("POST", "/V1/completions", 404),
        ("POST", "/admin", 404),
        ("POST", "/kvgate_sim/fault", 404),
        ("POST", "/reset_prefix_cache", 404),
        ("POST", "/v1/load_lora_adapter", 404),  # vLLM's admin routes: an operator's, not a client's
        ("POST", "/v1/%75nload_lora_adapter", 404),
        ("GET", "/tokenize", 405),
        ("POST", "/health", 405),
        ("TRACE", "/v1/completions", 405),
        ("FOO", "/v1/completions", 405),
    ],
)
def test_refused_targets(method, target, status):
    with pytest.raises(GatewayError) as info:
        resolve_target(method, target)
    assert info.value.status == status


async def test_traversal_never_reaches_a_pod_route(sim_gateway):
    fleet, gw = sim_gateway
    for method, target in TRAVERSALS:
        body = b'{"dead": true}' if "fault" in target else b""
        resp = await send_raw(gw.url, build_request(method, target, JSON, body))
        assert resp.from_gateway, target
        assert_openai_error(resp, 400)
    async with aiohttp.ClientSession() as session:
        for url in fleet.urls:
            paths = await pod_paths(session, url)
            assert all(pod_path_allowed(t) or t == "/kvgate_sim/paths" for _m, t, _n in paths), paths
            async with session.get(url + "/health") as r:
                assert r.status == 200  # the fault switch was never reached: the engine lives
    assert not any(pod.dead for pod in fleet.pods)


async def test_pod_gets_the_canonical_route_and_query(sim_gateway):
    fleet, gw = sim_gateway
    resp = await send_raw(gw.url, build_request("POST", '/v1/%63ompletions?a="b"&c=%41', JSON, COMPLETION))
    assert resp.status == 200 and not resp.from_gateway
    async with aiohttp.ClientSession() as session:
        seen = [t for url in fleet.urls for _m, t, _n in await pod_paths(session, url)]
    assert "/v1/completions?a=%22b%22&c=%41" in seen


async def test_absolute_form_and_connect_get_400_and_never_eject_a_pod(sim_gateway):
    _fleet, gw = sim_gateway
    for _ in range(5):  # the issue: three of these ejected both healthy pods
        for method, target in NOT_ORIGIN_FORM:
            resp = await send_raw(gw.url, build_request(method, target, JSON, COMPLETION))
            assert_openai_error(resp, 400)
    endpoints = list(gw.app[STATE].pools.endpoints())
    assert all(ep.healthy and ep.consecutive_failures == 0 for ep in endpoints)
    async with aiohttp.ClientSession() as session, session.get(gw.url + "/metrics") as r:
        text = await r.text()
    assert "kvgate_ejections_total{" not in text and "kvgate_upstream_errors_total{" not in text
    assert 'kvgate_rejected_requests_total{reason="bad_target"} 35.0' in text
    resp = await send_raw(gw.url, build_request("POST", "/v1/completions", JSON, COMPLETION))
    assert resp.status == 200


async def test_a_request_the_gateway_cannot_build_is_400_and_charges_no_pod(sim_gateway, monkeypatch):
    _fleet, gw = sim_gateway
    session = gw.app[PROXY].session

    async def unbuildable(*args, **kwargs):
        raise aiohttp.InvalidURL("http://pod/\x00")  # what aiohttp raises before sending anything

    monkeypatch.setattr(session, "request", unbuildable)
    for _ in range(6):  # eject_after is 2
        resp = await send_raw(gw.url, build_request("POST", "/v1/completions", JSON, COMPLETION))
        error = assert_openai_error(resp, 400)
        assert "cannot be forwarded" in error["message"]
    endpoints = list(gw.app[STATE].pools.endpoints())
    assert all(ep.healthy and ep.consecutive_failures == 0 for ep in endpoints)

"""Routing of the API surface: pools by model, /v1/models, pass-through paths, roles, and the
per-attempt seam a prefill/decode flow wraps."""

from __future__ import annotations

import orjson

from gateway.config import config_from_mapping
from gateway.proxy import ProxyCall, UpstreamReply
from gateway.state import PROXY
from router.policy import Decision


def two_pools(a: str, b: str, prefill_only: str | None = None) -> object:
    pool_b = [{"url": b}] + ([{"url": prefill_only, "role": "prefill"}] if prefill_only else [])
    return config_from_mapping(
        {
            "pools": {
                "alpha": {"endpoints": [{"url": a}]},
                "beta": {"policy": {"name": "round_robin"}, "endpoints": pool_b},
            },
            "health": {"interval": 0.5, "timeout": 0.2},
        }
    )


async def test_models_is_the_union_of_pools_and_requests_go_to_their_pool(fake_pods, start_gateway, client):
    a, b = await fake_pods(2)
    gw = await start_gateway(two_pools(a.url, b.url))
    async with client.get(gw.url + "/v1/models") as r:
        listing = await r.json()
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["alpha", "beta"]
    assert all(m["object"] == "model" for m in listing["data"])
    for model, pod in (("alpha", a), ("beta", b), ("alpha", a)):
        async with client.post(gw.url + "/v1/completions", json={"model": model, "prompt": "x"}) as r:
            assert r.status == 200 and r.headers["x-kvgate-endpoint"] == pod.url
    async with client.post(gw.url + "/v1/completions", json={"prompt": "x"}) as r:
        assert r.status == 400  # several pools: the model must be named
        assert (await r.json())["error"]["param"] == "model"


async def test_other_v1_paths_pass_through_with_query(fake_pods, start_gateway, client):
    a, b = await fake_pods(2)
    gw = await start_gateway(two_pools(a.url, b.url))
    async with client.post(gw.url + "/v1/embeddings?x=1", json={"model": "beta", "input": "hello"}) as r:
        assert r.status == 200 and r.headers["x-kvgate-endpoint"] == b.url
    assert b.seen[-1]["path"] == "/v1/embeddings"
    assert b.seen[-1]["body"] == {"model": "beta", "input": "hello"}


async def test_prefill_only_pods_never_get_whole_requests(fake_pods, start_gateway, client):
    a, b, p = await fake_pods(3)
    gw = await start_gateway(two_pools(a.url, b.url, prefill_only=p.url))
    for _ in range(6):
        async with client.post(gw.url + "/v1/completions", json={"model": "beta", "prompt": "x"}) as r:
            assert r.headers["x-kvgate-endpoint"] == b.url
    assert p.seen == []


async def test_attempt_seam_can_be_wrapped_and_edited_body_is_reserialised(fake_pods, start_gateway, client):
    """What a P/D flow does: wrap Proxy.attempt, edit the body, delegate; bookkeeping stays the proxy's."""
    (pod,) = await fake_pods(1)
    calls: list[str] = []

    async def install(app) -> None:  # after the cleanup_ctx entries, so the proxy exists
        proxy = app[PROXY]
        inner = proxy.attempt

        async def wrapped(call: ProxyCall, decision: Decision) -> UpstreamReply:
            calls.append(decision.endpoint.url)
            assert call.body is not None
            call.body["kv_transfer_params"] = {"do_remote_prefill": True}
            call.body_changed = True
            return await inner(call, decision)

        proxy.attempt = wrapped

    config = config_from_mapping({"pools": {"m": {"endpoints": [{"url": pod.url}]}}})
    gw = await start_gateway(config, lambda app: app.on_startup.append(install))
    raw = b'{"model": "m",   "prompt": "x"}'
    async with client.post(gw.url + "/v1/completions", data=raw) as r:
        assert r.status == 200
    assert calls == [pod.url]
    edited = {"model": "m", "prompt": "x", "kv_transfer_params": {"do_remote_prefill": True}}
    assert pod.seen[-1]["raw"] == orjson.dumps(edited)

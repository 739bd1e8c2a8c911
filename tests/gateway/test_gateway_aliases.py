"""Model aliases (`aliases: {alias: served name}`): a request naming an alias routes to the pool serving
the name and the pod is sent that name; /v1/models lists the aliases; bad aliases fail at startup."""

from __future__ import annotations

import aiohttp
import pytest
from gateway_fakes import pool_config


async def test_an_alias_routes_to_its_pool_and_the_pod_gets_the_served_name(fake_pods, start_gateway):
    (pod,) = await fake_pods(1)
    gw = await start_gateway(pool_config([pod.url], aliases={"llama": "m"}))
    async with aiohttp.ClientSession() as s:
        for model in ("llama", "m"):
            async with s.post(f"{gw.url}/v1/completions", json={"model": model, "prompt": "hi"}) as r:
                assert r.status == 200, await r.text()
        async with s.post(f"{gw.url}/v1/completions", json={"model": "llama2", "prompt": "hi"}) as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "model_not_found"
        async with s.get(f"{gw.url}/v1/models") as r:
            cards = {c["id"]: c for c in (await r.json())["data"]}
    assert [seen["body"]["model"] for seen in pod.seen] == ["m", "m"]
    assert b'"llama"' not in pod.seen[0]["raw"]  # the body was re-encoded with the served name
    assert cards["llama"]["root"] == "m" and "m" in cards


async def test_a_request_without_an_alias_is_forwarded_byte_for_byte(fake_pods, start_gateway):
    (pod,) = await fake_pods(1)
    gw = await start_gateway(pool_config([pod.url], aliases={"llama": "m"}))
    raw = b'{"model":  "m", "prompt": "hi"}'  # odd spacing survives: no re-encoding
    async with aiohttp.ClientSession() as s:
        headers = {"Content-Type": "application/json"}
        async with s.post(f"{gw.url}/v1/completions", data=raw, headers=headers) as r:
            assert r.status == 200
    assert pod.seen[0]["raw"] == raw


@pytest.mark.parametrize(
    ("aliases", "message"),
    [
        ({"m": "m"}, "aliases.m: already the name of a pool's model or adapter"),
        ({"llama": "nope"}, "aliases.llama: 'nope' is no pool's model or adapter"),
        ({"": "m"}, "aliases: an alias must not be empty"),
    ],
)
def test_a_bad_alias_fails_at_startup_naming_it(aliases, message):
    with pytest.raises(ValueError, match=message):
        pool_config(["http://127.0.0.1:1"], aliases=aliases)

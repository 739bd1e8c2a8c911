"""P/D configuration: the pool's `pd:` section, endpoint roles and versions, and the quick-start flags."""

from __future__ import annotations

import argparse
import asyncio
import sys

import aiohttp
import orjson
import pytest
from pd_harness import MODEL, SIM_OPTIONS, long_prompt
from prometheus_client import CollectorRegistry

from bench.sim.fleet import SimFleet
from gateway.config import config_from_mapping
from gateway.pools import build_pools
from gateway.serve_cli import add_arguments, config_from_args, parse_backend

POOL = {
    "policy": {"name": "least_request"},
    "endpoints": [
        {"url": "http://p:8000", "role": "prefill", "version": "v1"},
        {"url": "http://d:8000", "role": "decode", "version": "v2"},
    ],
}


def pools_of(pool: dict) -> list:
    return list(build_pools(config_from_mapping({"pools": {"m": pool}}), CollectorRegistry()))


def test_pd_section_reaches_the_pool_router() -> None:
    pd = {"threshold_tokens": 1000, "prefill_timeout_s": 2, "compatibility": {"v2": ["v1"]}}
    (pool,) = pools_of({**POOL, "pd": pd})
    assert pool.pd is not None
    assert (pool.pd.threshold_tokens, pool.pd.prefill_timeout_s) == (1000, 2.0)
    prefill, decode = pool.endpoints
    assert (prefill.role, prefill.version, decode.role, decode.version) == ("prefill", "v1", "decode", "v2")
    assert pool.pd.compatibility.compatible(prefill, decode)


def test_prefill_pods_enable_pd_with_defaults_and_plain_pools_stay_plain() -> None:
    (pool,) = pools_of(POOL)
    assert pool.pd is not None and pool.pd.threshold_tokens == 256
    assert not pool.pd.compatibility.compatible(*pool.endpoints)  # v1 -> v2 is not declared
    (plain,) = pools_of({"endpoints": [{"url": "http://a:1"}, {"url": "http://b:1", "role": "decode"}]})
    assert plain.pd is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pd": {"threshold_tokens": -1}}, "threshold_tokens"),
        ({"pd": {"prefill_timeout_s": 0}}, "prefill_timeout_s"),
        ({"pd": {"compatibility": {"v2": [1.1]}}}, "quote"),
        ({"pd": {"compatibility": {"v2": "v1"}}}, "list"),
        ({"pd": {"treshold_tokens": 5}}, "unknown keys"),
        ({"pd": {}, "endpoints": [{"url": "http://d:1", "role": "decode"}]}, "no endpoint with role prefill"),
        ({"endpoints": [{"url": "http://p:1", "role": "prefill"}]}, "prefill-only"),
        ({"endpoints": [{"url": "http://p:1", "role": "prefil"}]}, "not one of"),
    ],
)
def test_bad_pd_config_is_rejected(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config_from_mapping({"pools": {"m": {**POOL, **change}}})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("http://a:1", ("http://a:1", "both", "")),
        ("http://a:1#role=prefill", ("http://a:1", "prefill", "")),
        ("http://a:1#role=decode,version=v2", ("http://a:1", "decode", "v2")),
        ("http://a:1#version=2026.11, role=prefill", ("http://a:1", "prefill", "2026.11")),
    ],
)
def test_backend_suffix(value: str, expected: tuple[str, str, str]) -> None:
    assert parse_backend(value) == expected


@pytest.mark.parametrize("value", ["http://a:1#role=gpu", "http://a:1#weight=2", "http://a:1#prefill"])
def test_bad_backend_suffix(value: str) -> None:
    with pytest.raises(ValueError, match="--backend"):
        parse_backend(value)


def test_quick_start_flags_build_a_pd_pool() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([
        "--model", "m", "--backend", "http://p:1#role=prefill,version=v1",
        "--backend", "http://d:1/#role=decode,version=v2", "--pd-threshold-tokens", "64",
        "--pd-prefill-timeout", "1.5", "--pd-compatible", "v2=v1,v0",
    ])  # fmt: skip
    (spec,) = config_from_args(args).pools
    assert [(e.url, e.role, e.version) for e in spec.endpoints] == [
        ("http://p:1", "prefill", "v1"), ("http://d:1", "decode", "v2"),
    ]  # fmt: skip
    assert spec.pd is not None
    assert (spec.pd.threshold_tokens, spec.pd.prefill_timeout_s) == (64, 1.5)
    assert spec.pd.compatibility == {"v2": ["v1", "v0"]}


async def test_kvgate_serve_process_runs_the_flow_from_flags() -> None:
    """`kvgate serve` as a real process, P/D from the `#role=,version=` suffix, in front of sim pods."""
    per_pod = [{"role": "prefill"}, {"role": "decode"}]
    async with SimFleet(2, per_pod=per_pod, **SIM_OPTIONS) as fleet:
        prefill, decode = fleet.urls
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "serve", "--port", "0", "--model", MODEL,
            "--backend", f"{prefill}#role=prefill,version=v1",
            "--backend", f"{decode}#role=decode,version=v1",
            "--pd-threshold-tokens", "32", "--scrape-interval", "0", "--log-level", "WARNING",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line.startswith(b"KVGATE_SERVE_READY "), line
            url = orjson.loads(line.split(b" ", 1)[1])["url"]
            body = {"model": MODEL, "prompt": long_prompt(100), "max_tokens": 2}
            async with aiohttp.ClientSession() as http, http.post(url + "/v1/completions", json=body) as r:
                assert r.status == 200
                assert r.headers["x-kvgate-prefill-endpoint"] == prefill
                assert r.headers["x-kvgate-endpoint"] == decode
                await r.read()
                async with http.get(url + "/metrics") as m:
                    text = await m.text()
            assert f'kvgate_pd_decisions_total{{model="{MODEL}",outcome="disaggregated"}} 1.0' in text
        finally:
            proc.terminate()
            await proc.wait()

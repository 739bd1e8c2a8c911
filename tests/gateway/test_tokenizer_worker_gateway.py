"""The gateway tokenizes in its worker: cache-aware routing with a real HF tokenizer through the
worker routes as inline tokenizing does, reuses a chat's earlier turns, and counts it in /metrics."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from gateway_fakes import pool_config
from prometheus_client import CollectorRegistry

from gateway.pools import build_pool
from gateway.serve_cli import add_arguments, config_from_args

pytestmark = pytest.mark.timeout(60)

MODEL = Path(__file__).resolve().parents[1] / "fixtures" / "vllm" / "model"


def _config(urls: list[str], workers: int) -> Any:
    config = pool_config(urls, policy="cache_aware")
    pool = config.pools[0]
    pool.tokenizer = str(MODEL)
    pool.policy.params = {"tokenizer_workers": workers}
    return config


@pytest.mark.parametrize("workers", [0, 1])
async def test_a_growing_chat_goes_back_to_its_pod_with_its_history_cached(
    fake_pods: Any, start_gateway: Any, workers: int
) -> None:
    pods = await fake_pods(3)
    gw = await start_gateway(_config([p.url for p in pods], workers))
    messages = [{"role": "system", "content": "You answer questions about caches. " * 20}]
    served, cached = [], []
    async with aiohttp.ClientSession() as client:
        for turn in range(4):
            messages.append({"role": "user", "content": f"question {turn}: why is the sky blue?"})
            body = {"model": "m", "messages": messages, "stream": turn % 2 == 0}
            async with client.post(gw.url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
                await r.read()
                served.append(r.headers["x-kvgate-endpoint"])
                cached.append(int(r.headers["x-kvgate-cached-tokens"]))
            messages.append({"role": "assistant", "content": f"answer {turn}"})
        async with client.get(gw.url + "/metrics") as r:
            metrics = await r.text()
    assert len(set(served)) == 1 and cached[0] == 0 and all(c > 200 for c in cached[1:])
    assert 'kvgate_tokenizer_reuse_total{model="m",outcome="hit"} 3.0' in metrics
    batches = 'kvgate_tokenizer_batch_texts_count{model="m"} 4.0'
    assert (batches in metrics) == (workers == 1)


def test_the_tokenizer_workers_flag_reaches_the_prefix_cache() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, environ={})
    argv = ["--backend", "http://a:1", "--model", "m", "--policy", "cache_aware", "--tokenizer-workers", "0"]
    pool = build_pool(config_from_args(parser.parse_args(argv)).pools[0], CollectorRegistry(), seed=1)
    assert pool.prefix_cache is not None and pool.prefix_cache.encoder.worker is None
    assert pool.prefix_cache.config.tokenizer_workers == 0
    default = build_pool(config_from_args(parser.parse_args(argv[:-2])).pools[0], CollectorRegistry(), seed=1)
    assert default.prefix_cache is not None and default.prefix_cache.config.tokenizer_workers == 1

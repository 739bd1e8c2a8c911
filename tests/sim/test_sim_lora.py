"""LoRA adapters on the simulator (`--lora-modules`): listed, served, hashed apart, named in KV events."""

from __future__ import annotations

import argparse

import aiohttp
import pytest
from sim_helpers import FAST, Subscriber, post

from bench.sim.cli import add_arguments, config_from_args
from bench.sim.config import LoraAdapter, SimConfig
from bench.sim.fleet import SimFleet, config_to_args

BS = 16
PROMPT = " ".join(f"w{i}" for i in range(40))  # 2 full blocks and some


def cached(body: dict) -> int:
    return body["usage"]["prompt_tokens_details"]["cached_tokens"]


async def test_models_lists_adapters_in_vllms_shape(http: aiohttp.ClientSession) -> None:
    async with SimFleet(1, **FAST, lora_modules=["a1", "a2=/adapters/a2"]) as fleet:
        async with http.get(fleet.urls[0] + "/v1/models") as resp:
            data = (await resp.json())["data"]
    base, a1, a2 = data
    assert base["id"] == "sim-model" and base["parent"] is None and base["max_model_len"] == 32768
    assert (a1["id"], a1["root"], a1["parent"], a1["max_model_len"]) == ("a1", "a1", "sim-model", None)
    assert (a2["id"], a2["root"], a2["parent"]) == ("a2", "/adapters/a2", "sim-model")
    assert a1.keys() == base.keys()


async def test_adapter_served_unknown_model_404(http: aiohttp.ClientSession) -> None:
    async with SimFleet(1, **FAST, lora_modules=["a1"]) as fleet:
        url = fleet.urls[0] + "/v1/completions"
        status, body = await post(http, url, {"model": "a1", "prompt": PROMPT, "max_tokens": 1})
        assert status == 200 and body["model"] == "a1"
        status, body = await post(http, url, {"model": "a3", "prompt": PROMPT, "max_tokens": 1})
        assert status == 404 and body["error"]["param"] == "model"
        status, _ = await post(http, fleet.urls[0] + "/tokenize", {"model": "a1", "prompt": "x"})
        assert status == 200


async def test_adapter_blocks_never_hit_the_base_models(http: aiohttp.ClientSession) -> None:
    async with SimFleet(1, **FAST, lora_modules=["a1", "a2"]) as fleet:
        url = fleet.urls[0] + "/v1/completions"
        _, first = await post(http, url, {"model": "a1", "prompt": PROMPT, "max_tokens": 1})
        _, base = await post(http, url, {"model": "sim-model", "prompt": PROMPT, "max_tokens": 1})
        _, other = await post(http, url, {"model": "a2", "prompt": PROMPT, "max_tokens": 1})
        _, again = await post(http, url, {"model": "a1", "prompt": PROMPT, "max_tokens": 1})
    assert cached(first) == 0 and cached(base) == 0 and cached(other) == 0
    assert cached(again) == 2 * BS


async def test_stored_events_carry_the_adapter(http: aiohttp.ClientSession, subscriber: Subscriber) -> None:
    async with SimFleet(
        1, **FAST, lora_modules=["a1", "a2"], kv_events_endpoint=subscriber.endpoint, kv_events_topic="kv"
    ) as fleet:
        url = fleet.urls[0] + "/v1/completions"
        await subscriber.drain(0.2)  # let the PUB socket connect
        await post(http, url, {"model": "a2", "prompt": PROMPT, "max_tokens": 1, "cache_salt": "s"})
        _, _, (_, (lora,), _) = await subscriber.recv()
        await post(http, url, {"model": "sim-model", "prompt": PROMPT, "max_tokens": 1})
        _, _, (_, (plain,), _) = await subscriber.recv()
    assert lora["lora_name"] == "a2" and lora["lora_id"] == 2
    assert lora["extra_keys"] == [["a2", "s"], ["a2"]]  # the name in every block, the salt in the first
    assert plain["lora_name"] is None and plain["lora_id"] is None and plain["extra_keys"] == [None, None]
    assert plain["token_ids"] == lora["token_ids"]
    assert not set(plain["block_hashes"]) & set(lora["block_hashes"])


def test_cli_flag_and_launcher_round_trip() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(["--lora-modules", "a1", "a2=/p"]))
    assert config.adapters() == {"a1": LoraAdapter("a1", 1, "a1"), "a2": LoraAdapter("a2", 2, "/p")}
    assert config_to_args(config) == ["--lora-modules", "a1", "a2=/p"]
    assert config_from_args(parser.parse_args([])).lora_modules == []


@pytest.mark.parametrize("modules", [["sim-model"], ["a1", "a1=/x"], ["=/x"]])
def test_bad_adapter_names_refused(modules: list[str]) -> None:
    with pytest.raises(ValueError, match="lora_modules"):
        SimConfig(lora_modules=modules).validate()

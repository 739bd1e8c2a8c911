"""Bad input never breaks a pod: every body gets 200 or an OpenAI-shaped 4xx, never a 500 or a hang."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sim_helpers import FAST

from bench.sim.fleet import SimFleet
from bench.sim.pod import SimPod

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 40), st.floats(allow_nan=False, width=32),
                    st.text(max_size=12))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8,
)
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "stream", "stream_options",
          "cache_salt", "kv_transfer_params", "temperature", "n", "add_generation_prompt"]
bodies = st.dictionaries(st.sampled_from(FIELDS), values, max_size=6)


def check_reply(status: int, text: str) -> None:
    assert status < 500, text
    if status >= 400:
        error = json.loads(text)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == status


@pytest.fixture
async def short_pod() -> AsyncIterator[SimPod]:
    # a 64-token context keeps every accepted request short, whatever its max_tokens
    async with SimFleet(1, **FAST, max_model_len=64) as fleet:
        yield fleet.pods[0]


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, chat=st.booleans())
async def test_random_bodies(
    short_pod: SimPod, http: aiohttp.ClientSession, body: dict[str, Any], chat: bool
) -> None:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    async with http.post(short_pod.url + path, json=body) as resp:
        check_reply(resp.status, await resp.text())


async def test_raw_garbage(pod: SimPod, http: aiohttp.ClientSession) -> None:
    garbage = (b"", b"{", b"[]", b"null", b"\xff\xfe", b'{"prompt": "x", "max_tokens": 1e400}', b"1" * 10000)
    for raw in garbage:
        for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
            async with http.post(pod.url + path, data=raw, headers={"Content-Type": "application/json"}) as r:
                check_reply(r.status, await r.text())

"""Real vLLM 0.32 KV events (recorded by scripts/capture_vllm.py) feed the index under the gateway's
own keys: the recorded request, tokenized here as the gateway would, matches every block vLLM stored."""

from __future__ import annotations

import json
import pathlib

import msgspec
import pytest

from prefixindex.events import BlockRemoved, BlockStored, decode_batch, hash_int
from prefixindex.hashing import block_keys
from prefixindex.index import BlockIndex
from prefixindex.precise import PodEventTracker
from prefixindex.prompt import extract_prompt
from prefixindex.tokenizer import HFTokenizer

VLLM = pathlib.Path(__file__).parents[1] / "fixtures" / "vllm"


HTTP_NAMES = {"after_reset_prompt": "after_reset", "eviction": "eviction_0"}


def recorded(name: str) -> tuple[dict, list[tuple[int, bytes]]]:
    """The recorded request (events_<name>.json) and the KV-event messages it caused."""
    events = VLLM / "kv_events" / f"{name}.msgpack"
    http = VLLM / "http" / f"events_{HTTP_NAMES.get(name, name)}.json"
    if not events.exists() or not http.exists():
        pytest.skip(f"no recording {name} under {VLLM}")
    frames = msgspec.msgpack.decode(events.read_bytes())
    request = json.loads(http.read_text())["request"]
    return request, [(int.from_bytes(seq, "big"), payload) for _topic, seq, payload in frames]


@pytest.fixture(scope="module")
def tokenizer() -> HFTokenizer:
    if not (VLLM / "model" / "tokenizer.json").exists():
        pytest.skip("no recorded tokenizer")
    return HFTokenizer(str(VLLM / "model"))


def learn(messages: list[tuple[int, bytes]], bs: int = 32) -> tuple[BlockIndex, PodEventTracker, int]:
    index = BlockIndex()
    index.add_pod("vllm")
    tracker = PodEventTracker(index, "vllm", "tiny", lambda size: size == bs)
    stored = 0
    for _seq, payload in messages:
        batch = decode_batch(payload)
        stored += sum(len(e.block_hashes) for e in batch.events if isinstance(e, BlockStored))
        tracker.apply(batch)
    return index, tracker, stored


@pytest.mark.parametrize("name", ["first_prompt", "cache_salt", "chat", "after_reset_prompt"])
def test_request_keys_match_every_block_vllm_stored(name: str, tokenizer: HFTokenizer) -> None:
    request, messages = recorded(name)
    index, tracker, stored = learn(messages)
    prompt = extract_prompt(request["body"], request["path"], tokenizer, "tiny")
    keys = block_keys(prompt.tokens, 32, prompt.root)
    assert stored > 0 and len(keys) >= stored
    assert index.match(keys) == {"vllm": stored}
    assert tracker.counts["skipped_orphan"] == 0
    if request["body"].get("cache_salt"):  # the same prompt without its salt matches nothing
        unsalted = extract_prompt({**request["body"], "cache_salt": None}, request["path"], tokenizer, "tiny")
        assert index.match(block_keys(unsalted.tokens, 32, unsalted.root)) == {}


def test_decode_filled_blocks_chain_onto_the_prompt(tokenizer: HFTokenizer) -> None:
    _request, messages = recorded("decode_filled")
    index, tracker, stored = learn(messages)
    assert stored > 1 and index.held("vllm") == stored == len(tracker)
    assert tracker.counts["skipped_orphan"] == 0


def test_evictions_leave_exactly_the_blocks_still_cached() -> None:
    _request, messages = recorded("eviction")
    index, tracker, _stored = learn(messages)
    alive: set[int] = set()
    for _seq, payload in messages:
        for ev in decode_batch(payload).events:
            if isinstance(ev, BlockStored):
                alive.update(hash_int(h) for h in ev.block_hashes)
            elif isinstance(ev, BlockRemoved):
                alive.difference_update(hash_int(h) for h in ev.block_hashes)
    assert tracker.counts["BlockRemoved"] > 0 and tracker.counts["skipped_orphan"] == 0
    assert {h for h in alive if tracker.own_key(h) is not None} == alive
    assert index.held("vllm") == len(tracker) == len(alive)

"""KV-event payloads: both encodings, unknown keys and types, hashes as ints or bytes, real vLLM frames."""

from __future__ import annotations

import pathlib

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from prefixindex.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    DecodeError,
    decode_batch,
    encode_batch,
    encode_batch_positional,
    hash_int,
)

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "vllm" / "kv_events"

hash_st = st.one_of(st.integers(0, 2**64 - 1), st.binary(min_size=32, max_size=32))
stored_st = st.builds(
    BlockStored,
    block_hashes=st.lists(hash_st, min_size=1, max_size=4),
    parent_block_hash=st.one_of(st.none(), hash_st),
    token_ids=st.lists(st.integers(0, 2**31), max_size=16),
    block_size=st.integers(1, 64),
    lora_id=st.one_of(st.none(), st.integers(0, 10)),
    medium=st.sampled_from([None, "GPU", "CPU"]),
    lora_name=st.one_of(st.none(), st.text(max_size=5)),
)
removed_st = st.builds(
    BlockRemoved, block_hashes=st.lists(hash_st, max_size=4), medium=st.sampled_from([None, "GPU"])
)
event_st = st.one_of(stored_st, removed_st, st.just(AllBlocksCleared()))


@given(st.lists(event_st, max_size=6), st.floats(0, 1e10))
def test_map_encoding_round_trips(events, ts: float) -> None:
    batch = decode_batch(encode_batch(events, ts))
    assert batch.events == events and batch.ts == ts and batch.unknown == 0


@given(st.lists(event_st, max_size=6))
def test_positional_encoding_round_trips(events) -> None:
    expect = [
        BlockStored(e.block_hashes, e.parent_block_hash, e.token_ids, e.block_size, e.lora_id, e.medium,
                    e.lora_name) if isinstance(e, BlockStored) else e
        for e in events
    ]
    assert decode_batch(encode_batch_positional(events)).events == expect


def test_unknown_keys_trailing_fields_and_types_are_ignored() -> None:
    payload = msgspec.msgpack.encode([
        1.5,
        [
            {"type": "BlockRemoved", "block_hashes": [1], "medium": "GPU", "locality": "LOCAL", "x": [1]},
            {"type": "SomethingNew", "a": 1},
            ["BlockRemoved", [2], "GPU", "extra", 7],
            ["AlsoNew", 3],
            {"type": "AllBlocksCleared", "why": "reset"},
        ],
        0,
    ])
    batch = decode_batch(payload)
    assert batch.events == [BlockRemoved([1], "GPU"), BlockRemoved([2], "GPU"), AllBlocksCleared()]
    assert batch.unknown == 2


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x01",
        msgspec.msgpack.encode({"ts": 1}),
        msgspec.msgpack.encode([1.0, [{"type": "BlockRemoved"}]]),
        msgspec.msgpack.encode([1.0, [{"type": "BlockRemoved", "block_hashes": "nope"}]]),
    ],
)
def test_malformed_payloads_raise_decode_error(payload: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_batch(payload)


def test_hashes_normalise_to_low_64_bits() -> None:
    assert hash_int(5) == 5
    assert hash_int(b"\xff" * 24 + (7).to_bytes(8, "big")) == 7


@pytest.mark.parametrize("name", ["first_prompt", "cache_salt", "chat", "decode_filled", "eviction"])
def test_recorded_vllm_frames_decode(name: str) -> None:
    path = FIXTURES / f"{name}.msgpack"
    if not path.exists():
        pytest.skip(f"no recorded vLLM frames at {path}")
    messages = msgspec.msgpack.decode(path.read_bytes())
    assert messages
    kinds = set()
    for topic, seq, payload in messages:
        assert topic == b"kv-events" and len(seq) == 8
        batch = decode_batch(payload)
        assert batch.unknown == 0 and batch.events
        for ev in batch.events:
            kinds.add(type(ev).__name__)
            if isinstance(ev, BlockStored):
                assert len(ev.token_ids) == len(ev.block_hashes) * ev.block_size
                assert ev.medium == "GPU" and ev.group_idx == 0
    if name == "eviction":
        assert {"BlockStored", "BlockRemoved"} <= kinds

"""vLLM's KV-cache event wire format, declared from the documented structs and decoded with msgspec.

A ZMQ message is `[topic, seq (8 bytes big-endian), payload]`; the payload is msgpack
`[ts, events, data_parallel_rank]`. Each event is either a map tagged by `"type"` (vLLM >= mid-2026:
`{"type": "BlockStored", "block_hashes": ..., ...}`) or a positional array led by its type name (older
vLLM: `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
lora_name]`). Both decode to the same structs; unknown keys, trailing fields and unknown event types are
ignored. Block hashes arrive as uint64 or as raw digest bytes; both become ints (the low 64 bits).
"""

from __future__ import annotations

from typing import Any

import msgspec

ExternalHash = int | bytes

_U64 = (1 << 64) - 1


class BlockStored(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    """A run of consecutive full blocks was cached: `token_ids` are all their tokens, in order;
    `parent_block_hash` is the engine hash of the block before the run (None at a prompt's start)."""

    block_hashes: list[ExternalHash]
    parent_block_hash: ExternalHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None


class BlockRemoved(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    """Blocks were evicted (one event per hash on vLLM)."""

    block_hashes: list[ExternalHash]
    medium: str | None = None
    group_idx: int | None = None


class AllBlocksCleared(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    """The pod's prefix cache was reset."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class _ArrayStored(msgspec.Struct, array_like=True, tag="BlockStored", gc=False):
    block_hashes: list[ExternalHash]
    parent_block_hash: ExternalHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None


class _ArrayRemoved(msgspec.Struct, array_like=True, tag="BlockRemoved", gc=False):
    block_hashes: list[ExternalHash]
    medium: str | None = None


class _ArrayCleared(msgspec.Struct, array_like=True, tag="AllBlocksCleared", gc=False):
    pass


class _Batch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: int | None = None


class EventBatch(msgspec.Struct, gc=False):
    """One decoded payload. `unknown` counts events of types this decoder does not know."""

    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None
    unknown: int = 0


class DecodeError(ValueError):
    """The payload is not a KV-event batch."""


_batch_decoder = msgspec.msgpack.Decoder(_Batch)
_map_decoder = msgspec.msgpack.Decoder(KVEvent)
_array_decoder = msgspec.msgpack.Decoder(_ArrayStored | _ArrayRemoved | _ArrayCleared)


def hash_int(h: ExternalHash) -> int:
    """An engine block hash as an int: uint64 as is, digest bytes as their low 64 bits."""
    if isinstance(h, bytes):
        return int.from_bytes(h, "big") & _U64
    return h & _U64


def _is_array(raw: bytes) -> bool:
    first = raw[0] if raw else 0
    return 0x90 <= first <= 0x9F or first in (0xDC, 0xDD)


def decode_event(raw: bytes) -> KVEvent | None:
    """One event in either encoding; None for an event type this decoder does not know."""
    try:
        if _is_array(raw):
            ev = _array_decoder.decode(raw)
            if isinstance(ev, _ArrayStored):
                return BlockStored(
                    ev.block_hashes, ev.parent_block_hash, ev.token_ids, ev.block_size,
                    ev.lora_id, ev.medium, ev.lora_name,
                )
            if isinstance(ev, _ArrayRemoved):
                return BlockRemoved(ev.block_hashes, ev.medium)
            return AllBlocksCleared()
        return _map_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        if msg.startswith("Invalid value") and ("`$.type`" in msg or "`$[0]`" in msg):
            return None  # an event type we do not know: ignore it
        raise DecodeError(f"malformed KV event: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise DecodeError(f"malformed KV event: {exc}") from exc


def decode_batch(payload: bytes) -> EventBatch:
    """Decode a payload `[ts, events, dp_rank]`. Raises DecodeError when it is not one."""
    try:
        batch = _batch_decoder.decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise DecodeError(f"malformed KV event batch: {exc}") from exc
    events: list[KVEvent] = []
    unknown = 0
    for raw in batch.events:
        ev = decode_event(bytes(raw))
        if ev is None:
            unknown += 1
        else:
            events.append(ev)
    return EventBatch(batch.ts, events, batch.data_parallel_rank, unknown)


def event_type(ev: KVEvent) -> str:
    return type(ev).__name__


def encode_batch(events: list[KVEvent], ts: float = 0.0, dp_rank: int | None = 0) -> bytes:
    """The map-tagged payload of `events` (vLLM's current encoding); for tests and tools."""
    return msgspec.msgpack.encode([ts, events, dp_rank])


def encode_batch_positional(events: list[KVEvent], ts: float = 0.0, dp_rank: int | None = 0) -> bytes:
    """The positional (array) payload of `events`, as older vLLM sends it; for tests and tools."""
    out: list[list[Any]] = []
    for ev in events:
        if isinstance(ev, BlockStored):
            out.append([
                "BlockStored", ev.block_hashes, ev.parent_block_hash, ev.token_ids, ev.block_size,
                ev.lora_id, ev.medium, ev.lora_name,
            ])
        elif isinstance(ev, BlockRemoved):
            out.append(["BlockRemoved", ev.block_hashes, ev.medium])
        else:
            out.append(["AllBlocksCleared"])
    return msgspec.msgpack.encode([ts, out, dp_rank])

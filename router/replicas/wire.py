"""The binary messages replicas exchange through Redis: what was routed where, and per-pod load.

Every message is one stream entry (field `m`), little-endian:

    header   b"KV" | version u8 (1) | kind u8 | replica id u64
    kind 1   blocks, records of: op u8 (1 routed, 2 forgot) | block_size u16 | model | pod | n u32 | n x u64
    kind 2   load, records of:   model | pod | prefilling u32 | decoding u32 | prefill_tokens u64

`model` and `pod` (the endpoint URL) are u16-length-prefixed UTF-8. A pod is named by (model, URL),
which every replica reads from the same config or the same discovery. A load message is one replica's
whole summary: a pod it does not list has nothing of its in flight. Block keys travel as the raw u64
array (8 bytes a block): a blocks message of a tick's routing is a few KB, packed once per tick.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

MAGIC: Final = b"KV"
VERSION: Final = 1
KIND_BLOCKS: Final = 1
KIND_LOAD: Final = 2
OP_ROUTED: Final = 1
OP_FORGOTTEN: Final = 2

_HEADER = struct.Struct("<2sBBQ")
_BLOCKS = struct.Struct("<BH")
_LEN = struct.Struct("<H")
_COUNT = struct.Struct("<I")
_LOAD = struct.Struct("<IIQ")
_BIG_ENDIAN = sys.byteorder == "big"


class WireError(ValueError):
    """A message that is not one of these (another version, truncated, garbage)."""


@dataclass(slots=True, frozen=True)
class BlockRecord:
    op: int  # OP_ROUTED or OP_FORGOTTEN
    block_size: int
    model: str
    pod: str
    keys: Sequence[int]


@dataclass(slots=True, frozen=True)
class LoadRecord:
    model: str
    pod: str
    prefilling: int  # requests sent there, first byte not yet seen
    decoding: int  # requests past their first byte, not yet finished
    prefill_tokens: int  # uncached prompt tokens of the prefilling ones


def _text(out: bytearray, s: str) -> None:
    raw = s.encode()
    if len(raw) > 0xFFFF:
        raise ValueError("name longer than 65535 bytes")
    out += _LEN.pack(len(raw))
    out += raw


def encode_blocks(replica: int, records: Iterable[BlockRecord]) -> bytes:
    out = bytearray(_HEADER.pack(MAGIC, VERSION, KIND_BLOCKS, replica))
    for r in records:
        out += _BLOCKS.pack(r.op, r.block_size)
        _text(out, r.model)
        _text(out, r.pod)
        keys = array("Q", r.keys)
        if _BIG_ENDIAN:
            keys.byteswap()
        out += _COUNT.pack(len(keys))
        out += keys.tobytes()
    return bytes(out)


def encode_load(replica: int, records: Iterable[LoadRecord]) -> bytes:
    out = bytearray(_HEADER.pack(MAGIC, VERSION, KIND_LOAD, replica))
    for r in records:
        _text(out, r.model)
        _text(out, r.pod)
        out += _LOAD.pack(r.prefilling, r.decoding, r.prefill_tokens)
    return bytes(out)


def header(data: bytes) -> tuple[int, int]:
    """(kind, replica id) of a message; WireError when it is not one."""
    if len(data) < _HEADER.size:
        raise WireError("short message")
    magic, version, kind, replica = _HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION or kind not in (KIND_BLOCKS, KIND_LOAD):
        raise WireError(f"not a kvgate replica message (magic {magic!r}, version {version}, kind {kind})")
    return kind, replica


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = _HEADER.size

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if end > len(self.data):
            raise WireError("truncated message")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def unpack(self, fmt: struct.Struct) -> tuple[int, ...]:
        return fmt.unpack(self.take(fmt.size))

    def text(self) -> str:
        (n,) = self.unpack(_LEN)
        try:
            return str(self.take(n), "utf-8")
        except UnicodeDecodeError as exc:
            raise WireError("bad name") from exc

    def more(self) -> bool:
        return self.pos < len(self.data)


def decode_blocks(data: bytes) -> Iterator[BlockRecord]:
    """The records of a blocks message (header already checked by `header`)."""
    r = _Reader(data)
    while r.more():
        op, block_size = r.unpack(_BLOCKS)
        model, pod = r.text(), r.text()
        (n,) = r.unpack(_COUNT)
        keys = array("Q")
        keys.frombytes(r.take(8 * n))
        if _BIG_ENDIAN:
            keys.byteswap()
        yield BlockRecord(op, block_size, model, pod, keys)


def decode_load(data: bytes) -> Iterator[LoadRecord]:
    """The records of a load message (header already checked by `header`)."""
    r = _Reader(data)
    while r.more():
        model, pod = r.text(), r.text()
        yield LoadRecord(model, pod, *r.unpack(_LOAD))

"""The replica messages: what is encoded decodes to the same records, and anything else is refused."""

from __future__ import annotations

import pytest

from router.replicas import wire


def test_blocks_round_trip_compactly() -> None:
    keys = [1, 2**64 - 1, 12345678901234567]
    records = [wire.BlockRecord(wire.OP_ROUTED, 16, "m", "http://10.0.0.1:8000", keys),
               wire.BlockRecord(wire.OP_FORGOTTEN, 32, "módel", "http://p:1", [])]
    data = wire.encode_blocks(7, records)
    assert wire.header(data) == (wire.KIND_BLOCKS, 7)
    out = list(wire.decode_blocks(data))
    assert [(r.op, r.block_size, r.model, r.pod, list(r.keys)) for r in out] == [
        (wire.OP_ROUTED, 16, "m", "http://10.0.0.1:8000", keys),
        (wire.OP_FORGOTTEN, 32, "módel", "http://p:1", []),
    ]
    # header 12 bytes, per record 3 + 2 names + 4 + 8 per key: 8 bytes a block, nothing else per block
    assert len(data) == 12 + (3 + 2 + 1 + 2 + 20 + 4 + 24) + (3 + 2 + 6 + 2 + 10 + 4)


def test_load_round_trips() -> None:
    rec = wire.LoadRecord("m", "http://p:1", 3, 4, 2**40)
    data = wire.encode_load(2**64 - 1, [rec])
    assert wire.header(data) == (wire.KIND_LOAD, 2**64 - 1)
    assert list(wire.decode_load(data)) == [rec]
    assert list(wire.decode_load(wire.encode_load(1, []))) == []


@pytest.mark.parametrize("data", [b"", b"KV", b"XX\x01\x01" + bytes(8), b"KV\x02\x01" + bytes(8),
                                  b"KV\x01\x09" + bytes(8)])
def test_a_foreign_header_is_refused(data: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.header(data)


def test_a_truncated_message_is_refused() -> None:
    data = wire.encode_blocks(1, [wire.BlockRecord(wire.OP_ROUTED, 16, "m", "p", [1, 2, 3])])
    with pytest.raises(wire.WireError):
        list(wire.decode_blocks(data[:-1]))
    bad_name = wire.encode_load(1, [wire.LoadRecord("m", "p", 0, 0, 0)])
    with pytest.raises(wire.WireError):
        list(wire.decode_load(bad_name[:12] + b"\x01\x00\xff" + bad_name[15:]))

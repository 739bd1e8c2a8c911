"""Precise mode: a pod's KV events become index entries under the gateway's own keys."""

from __future__ import annotations

from prefixindex.events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch
from prefixindex.hashing import block_keys, root_key
from prefixindex.index import BlockIndex
from prefixindex.precise import PodEventTracker, salt_of

BS = 4


def tracker(index: BlockIndex, pod: str = "p", bs: int = BS) -> PodEventTracker:
    index.add_pod(pod)
    return PodEventTracker(index, pod, "m", lambda size: size == bs)


def batch(*events) -> EventBatch:
    return EventBatch(0.0, list(events))


def test_stored_runs_chain_from_their_parent_and_match_request_keys() -> None:
    index = BlockIndex()
    t = tracker(index)
    tokens = list(range(100, 124))  # 6 blocks
    t.apply(batch(BlockStored([11, 12], None, tokens[:8], BS, medium="GPU")))
    t.apply(batch(BlockStored([13, 14, 15], 12, tokens[8:20], BS, medium="GPU")))
    keys = block_keys(tokens, BS, root_key("m"))
    assert index.match(keys) == {"p": 5}
    assert t.own_key(14) == keys[3]
    t.apply(batch(BlockRemoved([13], "GPU")))
    assert index.match(keys) == {"p": 2}
    assert index.keys_of("p") == {keys[0], keys[1], keys[3], keys[4]}


def test_unknown_parent_is_skipped_and_clear_forgets_everything() -> None:
    index = BlockIndex()
    t = tracker(index)
    t.apply(batch(BlockStored([21], 999, [1, 2, 3, 4], BS)))
    assert len(index) == 0 and t.counts["skipped_orphan"] == 1
    t.apply(batch(BlockStored([1, 2], None, list(range(8)), BS), AllBlocksCleared()))
    assert len(index) == 0 and len(t) == 0


def test_salt_lora_medium_and_block_size() -> None:
    index = BlockIndex()
    t = tracker(index)
    tokens = list(range(8))
    t.apply(batch(BlockStored([1, 2], None, tokens, BS, extra_keys=[["tenant"], None])))
    t.apply(batch(BlockStored([3], None, tokens[:4], BS, lora_name="ad", extra_keys=[["ad", "t2"]])))
    t.apply(batch(BlockStored([4], None, tokens[:4], BS, medium="CPU")))
    t.apply(batch(BlockStored([5], None, tokens[:8], 8)))
    assert index.match(block_keys(tokens, BS, root_key("m", cache_salt="tenant"))) == {"p": 2}
    assert index.match(block_keys(tokens, BS, root_key("m", lora="ad", cache_salt="t2"))) == {"p": 1}
    assert index.match(block_keys(tokens, BS, root_key("m"))) == {}
    assert t.counts["skipped_medium"] == 1 and t.counts["skipped_block_size"] == 1
    assert salt_of(BlockStored([1], None, [], 1, lora_name="x", extra_keys=[["x", ["mm", 0], "s"]])) == "s"


def test_bytes_hashes_work_like_ints() -> None:
    index = BlockIndex()
    t = tracker(index)
    h1, h2 = b"\x01" * 32, b"\x02" * 32
    t.apply(batch(BlockStored([h1], None, [1, 2, 3, 4], BS), BlockStored([h2], h1, [5, 6, 7, 8], BS)))
    assert index.held("p") == 2
    t.apply(batch(BlockRemoved([h1, h2])))
    assert index.held("p") == 0


def test_a_block_cached_twice_leaves_with_its_last_copy() -> None:
    index = BlockIndex()
    t = tracker(index)
    tokens = list(range(8))
    t.apply(batch(BlockStored([1, 2], None, tokens, BS)))
    t.apply(batch(BlockStored([1, 2], None, tokens, BS)))  # a concurrent sequence computed them too
    t.apply(batch(BlockRemoved([2])))
    assert index.held("p") == 2
    t.apply(batch(BlockRemoved([2]), BlockRemoved([1])))
    assert index.held("p") == 1 and t.own_key(1) is not None
    t.apply(batch(BlockRemoved([1])))
    assert index.held("p") == 0 and len(t) == 0


def test_events_settle_pending_routing_guesses() -> None:
    """What routing guessed (pending) leaves once the pod's events confirm or evict it, so a pod that
    evicted a prefix stops attracting it; a guess no event has settled yet still counts."""
    index, pending = BlockIndex(), BlockIndex()
    index.add_pod("p")
    pending.add_pod("p", 64)
    t = PodEventTracker(index, "p", "m", lambda size: size == BS, pending=pending)
    tokens = list(range(16))
    keys = block_keys(tokens, BS, root_key("m"))
    pending.insert("p", keys)  # routed a 4-block prompt here; prefill not done yet
    other = block_keys(list(range(50, 58)), BS, root_key("m"))
    pending.insert("p", other)  # another prompt routed here, not prefilled yet
    t.apply(batch(BlockStored([1, 2, 3, 4], None, tokens, BS)))
    assert pending.match(keys) == {} and index.match(keys) == {"p": 4}
    t.apply(batch(BlockRemoved([3, 4], "GPU")))
    assert index.match(keys) == {"p": 2} and pending.match(keys) == {}
    assert pending.match(other) == {"p": 2}

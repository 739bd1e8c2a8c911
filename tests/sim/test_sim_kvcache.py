"""The block pool on its own: hashing, hits, reference counts, eviction order, events."""

from __future__ import annotations

import pytest

from bench.sim.events import AllBlocksCleared, BlockRemoved, BlockStored
from bench.sim.kvcache import BlockPool, KVCacheManager, SeqKV

BS = 4


def seq_with(pool: BlockPool, tokens: list[int], salt: str | None = None) -> SeqKV:
    seq = SeqKV(salt)
    pool.update_hashes(seq, tokens)
    return seq


def run(pool: BlockPool, tokens: list[int], salt: str | None = None) -> SeqKV:
    """Allocate and cache `tokens` as one prefill, reusing the longest hit."""
    mgr = KVCacheManager(pool)
    seq = seq_with(pool, tokens, salt)
    hits = pool.longest_hit(seq, len(tokens))
    num_hit = len(hits) * BS
    assert mgr.allocate_slots(seq, tokens, num_hit, len(tokens) - num_hit, hits)
    return seq


def test_hashes_chain_and_depend_on_seed_and_salt() -> None:
    a, b = BlockPool(10, BS), BlockPool(10, BS)
    tokens = list(range(12))
    sa, sb = seq_with(a, tokens), seq_with(b, tokens)
    assert sa.hashes == sb.hashes and len(sa.hashes) == 3  # vLLM's default seed is shared
    assert seq_with(a, [0, 1, 2, 3, 9, 9, 9, 9]).hashes[0] == sa.hashes[0]
    assert seq_with(a, [9, 1, 2, 3, 4, 5, 6, 7]).hashes[1] != sa.hashes[1]  # the parent changed
    assert seq_with(a, tokens, salt="t").hashes[0] != sa.hashes[0]
    r1, r2 = BlockPool(10, BS, hash_seed="random"), BlockPool(10, BS, hash_seed="random")
    assert seq_with(r1, tokens).hashes != seq_with(r2, tokens).hashes
    assert seq_with(BlockPool(10, BS, hash_seed="s"), tokens).hashes == seq_with(
        BlockPool(10, BS, hash_seed="s"), tokens).hashes


def test_hit_is_full_blocks_short_of_the_last_token() -> None:
    pool = BlockPool(20, BS)
    mgr = KVCacheManager(pool)
    first = run(pool, list(range(8)))
    mgr.free(first)
    assert len(pool.longest_hit(seq_with(pool, list(range(8))), 8)) == 1  # 7 tokens: one full block
    assert len(pool.longest_hit(seq_with(pool, list(range(9))), 9)) == 2
    assert pool.longest_hit(seq_with(pool, [7, *range(1, 9)]), 9) == []


def test_events_store_runs_and_removals() -> None:
    pool = BlockPool(5, BS)  # 4 usable blocks
    mgr = KVCacheManager(pool)
    a = run(pool, list(range(8)))
    (stored,) = pool.take_events()
    assert isinstance(stored, BlockStored) and len(stored.block_hashes) == 2
    assert stored.parent_block_hash is None and stored.token_ids == list(range(8))
    mgr.free(a)
    b = run(pool, [100 + i for i in range(12)])  # needs 3 blocks: 2 free, then evicts a's tail first
    events = pool.take_events()
    assert [type(e) for e in events] == [BlockRemoved, BlockStored]
    assert events[0].block_hashes == [stored.block_hashes[1]]
    assert pool.usage == 0.75
    assert pool.cached_hashes() == {stored.block_hashes[0], *events[1].block_hashes}
    mgr.free(b)
    assert pool.usage == 0.0
    assert pool.reset() and pool.take_events() == [AllBlocksCleared()]


def test_referenced_blocks_are_never_evicted() -> None:
    pool = BlockPool(5, BS)
    mgr = KVCacheManager(pool)
    held = run(pool, list(range(8)))
    other = seq_with(pool, [50 + i for i in range(12)])
    assert not mgr.allocate_slots(other, list(range(12)), 0, 12)  # 3 needed, 2 free
    assert other.blocks == [] and pool.num_free_blocks == 2
    shared = seq_with(pool, [*range(8), 70])
    hits = pool.longest_hit(shared, 9)
    assert hits == held.blocks  # a hit on blocks another sequence holds
    assert mgr.allocate_slots(shared, [*range(8), 70], 8, 1, hits)
    assert all(b.ref_cnt == 2 for b in held.blocks)
    assert not pool.reset()  # blocks in use


def test_unhashed_blocks_are_reused_first() -> None:
    pool = BlockPool(5, BS)
    mgr = KVCacheManager(pool)
    a = run(pool, list(range(6)))  # one full (cached) block and one partial block
    cached, partial = a.blocks
    mgr.free(a)
    b = seq_with(pool, [9, 9])
    assert mgr.allocate_slots(b, [9, 9], 0, 2)
    assert b.blocks == [partial]  # LIFO reuse of the partial block; the cached one stays
    assert pool.cached_block(a.hashes[0]) is cached


def test_take_too_many_blocks_raises() -> None:
    pool = BlockPool(3, BS)
    with pytest.raises(RuntimeError):
        pool.take_new_blocks(3)

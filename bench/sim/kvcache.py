"""The simulated KV cache: a block pool with vLLM V1's prefix-caching semantics.

- Block hashes chain over (parent hash, token tuple, extra keys): SHA-256 of a msgpack encoding,
  the first block's parent being a seeded NONE_HASH (vLLM: from PYTHONHASHSEED, else a fixed seed
  for sha256, so pods agree; `hash_seed="random"` gives each pod its own). Events carry
  the low 64 bits of the digest read big-endian, as vLLM's `maybe_convert_block_hash`. A LoRA
  request's adapter (name, path) is an extra key of every block, as in vLLM, and its BlockStored
  carries `lora_id` and `lora_name`.
- Only full blocks are hashed and hit; a lookup stops one token short of the prompt, as vLLM
  recomputes the last prompt token to get logits.
- Blocks referenced by a sequence are never evicted; freed cached blocks go to the tail of an LRU
  free queue (a sequence's blocks in reverse order, so its tail goes first) and keep their hash
  until the pool hands them out again, which evicts them; freed blocks without a hash go to the
  head, to be reused first.
- Block 0 is vLLM's reserved null block: `num_gpu_blocks - 1` blocks are usable.
- The pool queues its own events when it caches, evicts or clears; the engine takes them once per
  step, so evictions share a batch with the store that caused them.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import msgpack

from bench.sim.config import LoraAdapter
from bench.sim.events import FULL_ATTENTION, MEDIUM_GPU, AllBlocksCleared, BlockRemoved, BlockStored, Event

BlockHash = bytes
_MASK64 = (1 << 64) - 1
# vLLM 0.32 derives NONE_HASH from this fixed seed for sha256 when PYTHONHASHSEED is unset.
DEFAULT_HASH_SEED = "vllm-none-hash"


def external_hash(block_hash: BlockHash) -> int:
    """The uint64 a KV event carries for a block hash (vLLM: big-endian int & 2**64-1)."""
    return int.from_bytes(block_hash, "big") & _MASK64


class KVBlock:
    """One physical block. `block_hash` is set while the block is in the prefix cache."""

    __slots__ = ("block_hash", "block_id", "ref_cnt")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None


class SeqKV:
    """A sequence's view of the cache: its blocks, the hashes of its full blocks, how many are cached."""

    __slots__ = ("blocks", "cache_salt", "hashes", "lora", "num_cached_blocks")

    def __init__(self, cache_salt: str | None = None, lora: LoraAdapter | None = None) -> None:
        self.blocks: list[KVBlock] = []
        self.hashes: list[BlockHash] = []
        self.num_cached_blocks = 0
        self.cache_salt = cache_salt or None
        self.lora = lora  # a LoRA request's adapter: every block's hash includes it


class BlockPool:
    """Physical blocks, the hash -> block map and the LRU free queue.

    `enable_caching=False` turns off lookups, caching and events (vLLM --no-enable-prefix-caching).
    """

    def __init__(
        self,
        num_gpu_blocks: int,
        block_size: int,
        *,
        hash_seed: str | None = None,
        enable_caching: bool = True,
    ) -> None:
        if num_gpu_blocks < 2:
            raise ValueError("num_gpu_blocks must be at least 2")
        self.num_gpu_blocks = num_gpu_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        if hash_seed is None:
            seed = DEFAULT_HASH_SEED
        elif hash_seed == "random":
            seed = os.urandom(32).hex()
        else:
            seed = hash_seed
        self.none_hash: BlockHash = hashlib.sha256(seed.encode()).digest()
        blocks = [KVBlock(i) for i in range(num_gpu_blocks)]
        # Block 0 is the null block vLLM reserves for padding; it is never free.
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in blocks[1:])
        # A hash may map to several blocks when two sequences computed the same block concurrently.
        self._cached: dict[BlockHash, dict[int, KVBlock]] = {}
        self.events: list[Event] = []
        self.evictions = 0

    # -- hashing -------------------------------------------------------------------------------------
    def hash_block(
        self, parent: BlockHash | None, tokens: Sequence[int], extra_keys: tuple | None
    ) -> BlockHash:
        payload = msgpack.packb((parent or self.none_hash, tuple(tokens), extra_keys))
        return hashlib.sha256(payload).digest()

    def update_hashes(self, seq: SeqKV, token_ids: Sequence[int]) -> None:
        """Hash the full blocks of `token_ids` that `seq` has not hashed yet."""
        bs = self.block_size
        hashes = seq.hashes
        for i in range(len(hashes), len(token_ids) // bs):
            parent = hashes[i - 1] if i else None
            hashes.append(self.hash_block(parent, token_ids[i * bs : (i + 1) * bs], _extra_keys(seq, i)))

    # -- queries -------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """vllm:kv_cache_usage_perc: the fraction of usable blocks referenced by sequences."""
        return 1.0 - len(self._free) / (self.num_gpu_blocks - 1)

    def cached_hashes(self) -> set[int]:
        """The uint64 hashes (as KV events carry them) of every block now in the prefix cache."""
        return {external_hash(h) for h in self._cached}

    def cached_block(self, block_hash: BlockHash) -> KVBlock | None:
        entry = self._cached.get(block_hash)
        return next(iter(entry.values())) if entry else None

    def longest_hit(self, seq: SeqKV, num_tokens: int) -> list[KVBlock]:
        """Cached blocks for the longest prefix of `seq`, at most `num_tokens - 1` tokens (full blocks)."""
        if not self.enable_caching:
            return []
        hits: list[KVBlock] = []
        for block_hash in seq.hashes[: (num_tokens - 1) // self.block_size]:
            block = self.cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    # -- allocation ----------------------------------------------------------------------------------
    def can_allocate(self, num_new: int, hits: Iterable[KVBlock] = ()) -> bool:
        """Whether `num_new` blocks can be handed out after touching `hits` (free hits stop being free)."""
        free_hits = sum(1 for b in hits if b.ref_cnt == 0)
        return num_new <= len(self._free) - free_hits

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Reference blocks reused from the cache, taking free ones off the free queue."""
        free = self._free
        for block in blocks:
            if block.ref_cnt == 0:
                del free[block.block_id]
            block.ref_cnt += 1

    def take_new_blocks(self, n: int) -> list[KVBlock]:
        """Hand out `n` blocks from the head of the free queue, evicting their cached hashes."""
        if n > len(self._free):
            raise RuntimeError(f"cannot take {n} blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def _evict(self, block: KVBlock) -> None:
        block_hash = block.block_hash
        assert block_hash is not None
        entry = self._cached.get(block_hash)
        if entry is not None and entry.pop(block.block_id, None) is not None:
            if not entry:
                del self._cached[block_hash]
            self.evictions += 1
            self.events.append(
                BlockRemoved(block_hashes=[external_hash(block_hash)], medium=MEDIUM_GPU, group_idx=0)
            )
        block.block_hash = None

    def free_blocks(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference from each block (given in eviction order) and queue the unreferenced ones.

        As vLLM: cached blocks join the tail (LRU: they are evicted last), blocks without a hash go
        to the head in the given order (reused first, nothing is lost by reusing them).
        """
        free = self._free
        reuse_first = []
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is None or not self.enable_caching:
                    reuse_first.append(block)
                else:
                    free[block.block_id] = block
        for block in reversed(reuse_first):
            free[block.block_id] = block
            free.move_to_end(block.block_id, last=False)

    # -- caching -------------------------------------------------------------------------------------
    def cache_full_blocks(self, seq: SeqKV, num_full_blocks: int, token_ids: Sequence[int]) -> None:
        """Register `seq`'s blocks up to `num_full_blocks` in the prefix cache, as ONE BlockStored."""
        start = seq.num_cached_blocks
        if not self.enable_caching or num_full_blocks <= start:
            return
        new_hashes = []
        for i in range(start, num_full_blocks):
            block, block_hash = seq.blocks[i], seq.hashes[i]
            if block.block_hash is None:
                block.block_hash = block_hash
                self._cached.setdefault(block_hash, {})[block.block_id] = block
            new_hashes.append(external_hash(block_hash))
        bs = self.block_size
        self.events.append(
            BlockStored(
                block_hashes=new_hashes,
                parent_block_hash=external_hash(seq.hashes[start - 1]) if start else None,
                token_ids=list(token_ids[start * bs : num_full_blocks * bs]),
                block_size=bs,
                lora_id=seq.lora.lora_id if seq.lora else None,
                medium=MEDIUM_GPU,
                lora_name=seq.lora.name if seq.lora else None,
                extra_keys=[_event_extra_keys(seq, i) for i in range(start, num_full_blocks)],
                group_idx=0,
                kv_cache_spec_kind=FULL_ATTENTION,
            )
        )
        seq.num_cached_blocks = num_full_blocks

    def reset(self) -> bool:
        """Clear the prefix cache (POST /reset_prefix_cache). Fails, as vLLM does, while blocks are in use."""
        if len(self._free) != self.num_gpu_blocks - 1:
            return False
        for entry in self._cached.values():
            for block in entry.values():
                block.block_hash = None
        self._cached.clear()
        if self.enable_caching:
            self.events.append(AllBlocksCleared())
        return True

    def take_events(self) -> list[Event]:
        events, self.events = self.events, []
        return events


class KVCacheManager:
    """Sequence-level operations on the pool, mirroring vLLM's KVCacheManager."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.block_size = pool.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_slots(
        self,
        seq: SeqKV,
        token_ids: Sequence[int],
        num_computed: int,
        num_new: int,
        hits: Sequence[KVBlock] = (),
        *,
        delay_cache: bool = False,
    ) -> bool:
        """Give `seq` blocks for `num_computed + num_new` tokens (hits included in `num_computed`).

        Returns False, changing nothing, when the free blocks do not suffice. Then caches the blocks
        that will be full once this step computed its tokens, unless `delay_cache` (a P/D transfer
        caches them when it lands).
        """
        pool = self.pool
        n_new = self.blocks_needed(num_computed + num_new) - len(seq.blocks) - len(hits)
        if not pool.can_allocate(max(n_new, 0), hits):
            return False
        if hits:
            pool.touch(hits)
            seq.blocks.extend(hits)
            seq.num_cached_blocks = len(seq.blocks)
        if n_new > 0:
            seq.blocks.extend(pool.take_new_blocks(n_new))
        if not delay_cache:
            self.cache(seq, token_ids, num_computed + num_new)
        return True

    def cache(self, seq: SeqKV, token_ids: Sequence[int], num_tokens: int) -> None:
        num_full = min(num_tokens, len(token_ids)) // self.block_size
        self.pool.cache_full_blocks(seq, min(num_full, len(seq.hashes)), token_ids)

    def free(self, seq: SeqKV) -> None:
        """Release a finished or preempted sequence's blocks (tail first, so the tail is evicted first)."""
        self.pool.free_blocks(reversed(seq.blocks))
        seq.blocks = []
        seq.num_cached_blocks = 0


def _extra_keys(seq: SeqKV, block_index: int) -> tuple | None:
    # vLLM tags each extra key with its source; the LoRA (name and path) enters every block, so an
    # adapter's blocks never match the base model's, cache_salt only the first.
    keys: list[tuple] = []
    if seq.lora is not None:
        keys.append(("lora", seq.lora.name, seq.lora.path))
    if block_index == 0 and seq.cache_salt:
        keys.append(("cache_salt", seq.cache_salt))
    return tuple(keys) or None


def _event_extra_keys(seq: SeqKV, block_index: int) -> tuple | None:
    # Events carry the untagged values (vLLM's to_event_extra_keys): the LoRA name, then the salt.
    keys: list[str] = []
    if seq.lora is not None:
        keys.append(seq.lora.name)
    if block_index == 0 and seq.cache_salt:
        keys.append(seq.cache_salt)
    return tuple(keys) or None

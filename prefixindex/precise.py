"""Precise mode: translate one pod's KV events into the index under the gateway's own block keys.

vLLM names blocks with its own hashes, which the gateway does not reproduce. A BlockStored carries
the run's tokens and the engine hash of the block before the run, so the gateway recomputes its own
keys (chained from its key for that parent, or from the root at a prompt's start, the root taking the
event's LoRA name and the `cache_salt` found in the first block's `extra_keys`) and remembers, per
pod, engine hash -> own key, to chain later runs and to apply BlockRemoved. Two sequences computing
the same block at once leave two physical copies under one hash, and vLLM sends BlockRemoved per copy:
copies are counted, and a block leaves the index with its last copy.

LoRA: a run stored with `lora_name` X gets the keys of a request whose `model` is adapter X on this
pool (prefixindex.prompt roots both at `root_key(model, X, salt)`); a run with only a `lora_id`
(vLLM before `lora_name`) cannot be named so, and is skipped (`skipped_lora_unnamed`).

`pending` (optional) holds the blocks routing sent to this pod before any event confirmed them. An
event settles them: a stored block is now known for sure, a removed one is gone, so both leave
`pending`, which otherwise would keep claiming blocks the pod has long evicted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable
from typing import Any

from prefixindex.events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch, hash_int
from prefixindex.hashing import block_keys, root_key
from prefixindex.index import BlockIndex

_GPU_MEDIA = (None, "GPU", "gpu")


def salt_of(event: BlockStored) -> str | None:
    """The `cache_salt` of a run that starts a prompt: the first string of its first block's extra
    keys after the LoRA name (vLLM publishes, per block, LoRA name, (mm id, offset) pairs, salt, ...)."""
    if not event.extra_keys:
        return None
    first: Any = event.extra_keys[0]
    if not isinstance(first, list | tuple):
        return None
    items = list(first)
    if event.lora_name is not None and items and items[0] == event.lora_name:
        items = items[1:]
    return next((x for x in items if isinstance(x, str)), None)


class PodEventTracker:
    """Applies one pod's event batches to `index`. `accept_block_size(bs)` says whether the index
    keys blocks of `bs` tokens (the policy may adopt the first size it sees)."""

    def __init__(
        self,
        index: BlockIndex,
        pod: Hashable,
        model: str,
        accept_block_size: Callable[[int], bool],
        pending: BlockIndex | None = None,
    ) -> None:
        self.index = index
        self.pending = pending
        self.pod = pod
        self.model = model
        self._accept = accept_block_size
        self._engine: dict[int, int] = {}  # engine hash -> own key
        self._copies: dict[int, int] = {}  # engine hash -> physical copies beyond the first (rare)
        self.counts: Counter[str] = Counter()  # events applied, by type; plus skip reasons

    def __len__(self) -> int:
        return len(self._engine)

    def keys(self) -> list[int]:
        """The own keys of every block this pod holds according to its events."""
        return list(self._engine.values())

    def own_key(self, engine_hash: int | bytes) -> int | None:
        return self._engine.get(hash_int(engine_hash))

    def apply(self, batch: EventBatch) -> None:
        """Apply a batch's events in order."""
        for ev in batch.events:
            if isinstance(ev, BlockStored):
                self._stored(ev)
            elif isinstance(ev, BlockRemoved):
                self._removed(ev)
            elif isinstance(ev, AllBlocksCleared):
                self.clear()
                self.counts["AllBlocksCleared"] += 1

    def clear(self) -> None:
        """Forget everything this pod held (cache reset, lost events, pod gone)."""
        self.index.clear_pod(self.pod, self.keys())
        self._engine.clear()
        self._copies.clear()

    def _stored(self, ev: BlockStored) -> None:
        self.counts["BlockStored"] += 1
        if ev.medium not in _GPU_MEDIA or ev.group_idx not in (None, 0):
            self.counts["skipped_medium"] += 1
            return
        if not self._accept(ev.block_size):
            self.counts["skipped_block_size"] += 1
            return
        if ev.lora_name is None and ev.lora_id is not None:
            # an adapter's blocks (vLLM before lora_name): the id alone cannot name the request's
            # key root, and the base model's root would claim blocks that hold no base-model KV
            self.counts["skipped_lora_unnamed"] += 1
            return
        if ev.parent_block_hash is None:
            parent = root_key(self.model, ev.lora_name, salt_of(ev))
        else:
            found = self._engine.get(hash_int(ev.parent_block_hash))
            if found is None:  # its parent was never seen (evicted or missed): cannot name the run
                self.counts["skipped_orphan"] += 1
                return
            parent = found
        keys = block_keys(ev.token_ids, ev.block_size, parent, max_blocks=len(ev.block_hashes))
        engine = self._engine
        copies = self._copies
        for h, k in zip(ev.block_hashes, keys, strict=False):
            hi = hash_int(h)
            if hi in engine:
                copies[hi] = copies.get(hi, 0) + 1
            else:
                engine[hi] = k
        self.index.insert(self.pod, keys)
        if self.pending is not None:
            self.pending.discard(self.pod, keys)

    def _removed(self, ev: BlockRemoved) -> None:
        self.counts["BlockRemoved"] += 1
        if ev.medium not in _GPU_MEDIA or ev.group_idx not in (None, 0):
            self.counts["skipped_medium"] += 1
            return
        engine = self._engine
        copies = self._copies
        gone = []
        for h in ev.block_hashes:
            hi = hash_int(h)
            extra = copies.get(hi)
            if extra:  # another copy of the block is still cached
                if extra == 1:
                    del copies[hi]
                else:
                    copies[hi] = extra - 1
                continue
            k = engine.pop(hi, None)
            if k is not None:
                gone.append(k)
        if gone:
            self.index.discard(self.pod, gone)
            if self.pending is not None:
                self.pending.discard(self.pod, gone)

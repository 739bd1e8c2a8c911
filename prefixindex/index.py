"""The prefix index: block key -> the pods holding that block, in about 80 bytes per block.

Chained keys make the index a trie without pointers: a block's key names its whole prefix path, so
"pod p holds the first m blocks of this prompt" is "p holds key_0 .. key_{m-1}". One dict maps each
key to one small int packing, per pod slot s, bit 2s "s holds the block" and bit 2s+1 "s touched it
since its clock hand last passed". Packed values are interned (8 pods: at most 65,536 distinct ints,
shared by all entries), so an entry costs a dict slot plus its 60-bit key.

Pods with a capacity (approximate mode) keep their blocks in a CLOCK ring (an `array('Q')` of keys,
8 bytes per block): inserting into a full pod sweeps the hand, clearing touched bits, and evicts the
first untouched block, which approximates the pod's own LRU in O(1) amortised. Pods without capacity
(precise mode) learn removals from the pod's KV events instead.

Not thread-safe: owned by one event loop. Pods are any hashable objects (the router uses Endpoints).
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Hashable, Iterable, Sequence

_INTERN_LIMIT = 1 << 17
_KEY_BYTES = 32  # sys.getsizeof of a 60-bit int


class _Slot:
    """One pod's bookkeeping: its bit position, how many blocks it holds, its ring if bounded."""

    __slots__ = ("capacity", "fill", "hand", "held", "held_bit", "index", "pod", "ring")

    def __init__(self, pod: Hashable, index: int, capacity: int | None) -> None:
        self.pod = pod
        self.index = index
        self.held_bit = 1 << (2 * index)  # read on every match: a plain attribute, not a property
        self.held = 0
        self.capacity = capacity
        self.ring: array | None = array("Q", bytes(8 * capacity)) if capacity else None
        self.fill = 0
        self.hand = 0


class BlockIndex:
    """Block key -> pods holding it, with a longest-prefix match. See the module docstring."""

    def __init__(self) -> None:
        self._map: dict[int, int] = {}
        self._intern: dict[int, int] = {}
        self._slots: list[_Slot | None] = []
        self._by_pod: dict[Hashable, _Slot] = {}
        self._entries = 0  # (block, pod) pairs

    # ---- pods ---------------------------------------------------------------------------------

    def add_pod(self, pod: Hashable, capacity: int | None = None) -> None:
        """Start tracking `pod`; with `capacity` (blocks) it forgets least-recently-used blocks.

        Re-adding a known pod only updates its capacity.
        """
        if capacity is not None and capacity <= 0:
            raise ValueError("capacity must be a positive number of blocks")
        slot = self._by_pod.get(pod)
        if slot is not None:
            self.set_capacity(pod, capacity)
            return
        try:
            index = self._slots.index(None)
        except ValueError:
            index = len(self._slots)
            self._slots.append(None)
        slot = _Slot(pod, index, capacity)
        self._slots[index] = slot
        self._by_pod[pod] = slot

    def remove_pod(self, pod: Hashable, keys: Iterable[int] | None = None) -> None:
        """Forget `pod` and every block it held (`keys`: its blocks, if the caller knows them)."""
        slot = self._by_pod.get(pod)
        if slot is None:
            return
        self.clear_pod(pod, keys)
        del self._by_pod[pod]
        self._slots[slot.index] = None

    def clear_pod(self, pod: Hashable, keys: Iterable[int] | None = None) -> None:
        """Forget every block `pod` holds. O(its blocks) with a ring or `keys`, else O(index)."""
        slot = self._by_pod[pod]
        if slot.held:
            if slot.ring is not None:
                keys = slot.ring[: slot.fill]
            elif keys is None:
                keys = [k for k, v in self._map.items() if v & slot.held_bit]
            self._drop(slot, keys)
        if slot.ring is not None:
            slot.ring = array("Q", bytes(8 * len(slot.ring)))
        slot.fill = slot.hand = 0

    def set_capacity(self, pod: Hashable, capacity: int | None) -> None:
        """Change `pod`'s capacity in blocks, evicting its oldest blocks if it shrinks below `held`."""
        slot = self._by_pod[pod]
        if capacity == slot.capacity:
            return
        if capacity is not None and capacity <= 0:
            raise ValueError("capacity must be a positive number of blocks")
        held = slot.held_bit
        get = self._map.get
        live: list[int] = []
        if slot.ring is not None:  # oldest first: from the hand round the ring
            order = list(slot.ring[slot.hand : slot.fill]) + list(slot.ring[: slot.hand])
            live = [k for k in order if get(k, 0) & held]
        elif capacity is not None and slot.held:
            live = [k for k, v in self._map.items() if v & held]
        if capacity is not None and len(live) > capacity:
            self._drop(slot, live[: len(live) - capacity])
            live = live[len(live) - capacity :]
        slot.capacity = capacity
        if capacity is None:
            slot.ring = None
            slot.fill = slot.hand = 0
            return
        ring = array("Q", live)
        ring.extend(array("Q", bytes(8 * (capacity - len(live)))))
        slot.ring = ring
        slot.fill = len(live)
        slot.hand = 0

    def pods(self) -> list[Hashable]:
        return list(self._by_pod)

    def capacity(self, pod: Hashable) -> int | None:
        return self._by_pod[pod].capacity

    def held(self, pod: Hashable) -> int:
        """How many blocks `pod` holds according to the index."""
        slot = self._by_pod.get(pod)
        return slot.held if slot is not None else 0

    def __contains__(self, pod: Hashable) -> bool:
        return pod in self._by_pod

    # ---- lookups ------------------------------------------------------------------------------

    def match(self, keys: Sequence[int], pods: Iterable[Hashable] | None = None) -> dict[Hashable, int]:
        """Per pod (of `pods`, default all), how many leading blocks of `keys` it holds; pods holding
        none are left out. O(matched prefix): stops at the first block no remaining pod holds.
        """
        by_pod = self._by_pod
        if pods is None:
            slots = list(by_pod.values())
        else:
            slots = [s for s in (by_pod.get(p) for p in pods) if s is not None]
        running = 0
        for s in slots:
            running |= s.held_bit
        if not running or not keys:
            return {}
        get = self._map.get
        stops: dict[int, int] = {}
        n = 0
        for k in keys:
            v = get(k, 0) & running
            if v != running:
                dropped = running & ~v
                if n:
                    while dropped:
                        low = dropped & -dropped
                        stops[low] = n
                        dropped ^= low
                running = v
                if not running:
                    break
            n += 1
        while running:
            low = running & -running
            stops[low] = n
            running ^= low
        return {s.pod: stops[s.held_bit] for s in slots if s.held_bit in stops}

    def holders(self, key: int) -> list[Hashable]:
        """The pods holding the block `key`."""
        v = self._map.get(key, 0)
        return [s.pod for s in self._slots if s is not None and v & s.held_bit]

    def keys_of(self, pod: Hashable) -> set[int]:
        """Every block key `pod` holds (O(index); for tests and tools)."""
        held = self._by_pod[pod].held_bit
        return {k for k, v in self._map.items() if v & held}

    # ---- updates ------------------------------------------------------------------------------

    def insert(self, pod: Hashable, keys: Iterable[int]) -> int:
        """Record that `pod` holds the blocks `keys` (touching those it already holds); a bounded
        pod evicts its least-recently-used blocks to make room. Returns how many were new.
        """
        slot = self._by_pod[pod]
        m = self._map
        get = m.get
        intern = self._interned
        held = slot.held_bit
        ref = held << 1
        ring = slot.ring
        added = 0
        for k in keys:
            v = get(k, 0)
            if v & held:
                if ring is not None and not v & ref:
                    m[k] = intern(v | ref)
                continue
            if ring is not None:
                if slot.fill < len(ring):
                    pos = slot.fill
                    slot.fill += 1
                else:
                    pos = self._evict(slot)
                    v = get(k, 0)  # the victim may share this key's entry with another pod
                ring[pos] = k
            m[k] = intern(v | held)
            slot.held += 1
            added += 1
        self._entries += added
        return added

    def discard(self, pod: Hashable, keys: Iterable[int]) -> int:
        """Record that `pod` no longer holds the blocks `keys`. Returns how many it held."""
        slot = self._by_pod.get(pod)
        if slot is None:
            return 0
        return self._drop(slot, keys)

    def _drop(self, slot: _Slot, keys: Iterable[int]) -> int:
        m = self._map
        get = m.get
        intern = self._interned
        bits = slot.held_bit * 3  # held and touched
        held = slot.held_bit
        dropped = 0
        for k in keys:
            v = get(k, 0)
            if not v & held:
                continue
            rest = v & ~bits
            if rest:
                m[k] = intern(rest)
            else:
                del m[k]
            dropped += 1
        slot.held -= dropped
        self._entries -= dropped
        return dropped

    def _evict(self, slot: _Slot) -> int:
        """Advance `slot`'s clock hand to a free ring position, evicting one block if needed."""
        ring = slot.ring
        assert ring is not None
        m = self._map
        get = m.get
        held = slot.held_bit
        ref = held << 1
        size = len(ring)
        while True:
            pos = slot.hand
            slot.hand = pos + 1 if pos + 1 < size else 0
            k = ring[pos]
            v = get(k, 0)
            if not v & held:  # stale: discarded since it was placed here
                return pos
            if v & ref:  # second chance
                m[k] = self._interned(v & ~ref)
                continue
            rest = v & ~held
            if rest:
                m[k] = self._interned(rest)
            else:
                del m[k]
            slot.held -= 1
            self._entries -= 1
            return pos

    def _interned(self, v: int) -> int:
        if v < 257:
            return v
        got = self._intern.get(v)
        if got is not None:
            return got
        if len(self._intern) < _INTERN_LIMIT:
            self._intern[v] = v
        return v

    # ---- size ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Distinct blocks indexed."""
        return len(self._map)

    @property
    def entries(self) -> int:
        """(block, pod) pairs indexed."""
        return self._entries

    def nbytes(self) -> int:
        """Estimated memory held: the dict, its keys, the rings and the interned values. O(pods)."""
        rings = sum(s.ring.buffer_info()[1] * 8 for s in self._by_pod.values() if s.ring is not None)
        interned = sys.getsizeof(self._intern) + 36 * len(self._intern)
        return sys.getsizeof(self._map) + _KEY_BYTES * len(self._map) + rings + interned

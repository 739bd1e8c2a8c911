"""The admission queue of one pool: priority bands, and within a band weighted fair queuing per tenant.

Fairness is a virtual token counter (VTC, Sheng et al., "Fairness in Serving Large Language Models"):
each flow (tenant) has a counter of the cost it was dispatched, divided by its weight; the next request
comes from the backlogged flow with the lowest counter. A flow that becomes backlogged again has its
counter lifted to the lowest counter of the flows already waiting, so idling banks no credit. The cost
is an estimate in tokens (uncached prompt tokens + expected output tokens), so a tenant sending huge
prompts gets proportionally fewer requests through, not more work.

Bands: the band with the highest effective priority goes first, where a band's effective priority is
its priority plus `waited / aging_s` of its oldest request (the aging guard: a low band waiting long
enough outranks a busy high band, so nothing starves). `order="fifo"` ignores tenants and bands: the
oldest request goes first (the baseline the benchmark compares with).

Cache affinity within a flow: `pop` may be given a `prefer` score (the controller's: prompt tokens the
entry has cached on a pod with a free slot). The flow is chosen as above, so tenants' shares do not
change; within it, the best-scoring of its first `window` entries goes (earliest on a tie), so a freed
slot takes the request whose prefix that pod holds instead of sending the flow's oldest request to a
cold prefill while its prefix's holder is busy. An entry is passed over at most `window` times: then it
goes first, whatever the scores.

Deadlines: an entry whose deadline has come (`now >= deadline`) is expired, never dispatched.
Pure data structure: no I/O, no asyncio; the clock is the caller's `now`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import count
from typing import Any, Literal

Order = Literal["fair", "fifo"]


@dataclass(slots=True, eq=False)
class Entry:
    """One queued request. `waiter` is the caller's (an asyncio future in the controller)."""

    flow: str  # the tenant's name
    priority: int
    cost: float  # estimated tokens
    nbytes: int  # request body bytes held while queued
    enqueued: float
    deadline: float  # absolute, same clock as `enqueued` (inf: none)
    waiter: Any = None
    route: Any = None  # the caller's routing state, for its `prefer` score
    seq: int = 0
    queued: bool = False
    passed: int = 0  # times a later entry of its flow went first (bounded by `pop`'s window)


@dataclass(slots=True, eq=False)
class Flow:
    name: str
    weight: float
    priority: int
    counter: float = 0.0  # dispatched cost / weight (VTC)
    entries: deque[Entry] = field(default_factory=deque)
    nbytes: int = 0


class FairQueue:
    """Queued requests of one pool; see the module docstring for the order."""

    def __init__(self, *, order: Order = "fair", aging_s: float = 0.0) -> None:
        self.order = order
        self.aging_s = aging_s
        self.flows: dict[str, Flow] = {}
        self._bands: dict[int, dict[str, Flow]] = {}  # priority -> backlogged flows
        self._seq = count()
        self.length = 0
        self.nbytes = 0

    def __len__(self) -> int:
        return self.length

    def flow(self, name: str, weight: float = 1.0, priority: int = 0) -> Flow:
        f = self.flows.get(name)
        if f is None:
            f = self.flows[name] = Flow(name, weight, priority)
        return f

    def charge(self, name: str, cost: float) -> None:
        """A request of flow `name` was dispatched without queueing: count its cost all the same."""
        f = self.flows[name]
        if not f.entries:
            self._lift(f)
        f.counter += cost / f.weight

    def push(self, entry: Entry) -> None:
        f = self.flows[entry.flow]
        if not f.entries:
            self._lift(f)
            self._bands.setdefault(f.priority, {})[f.name] = f
        entry.seq = next(self._seq)
        entry.queued = True
        f.entries.append(entry)
        f.nbytes += entry.nbytes
        self.length += 1
        self.nbytes += entry.nbytes

    def remove(self, entry: Entry) -> bool:
        """Take `entry` out (client gone, deadline); False when it was not queued any more."""
        if not entry.queued:
            return False
        f = self.flows[entry.flow]
        f.entries.remove(entry)
        self._dequeued(f, entry)
        return True

    def pop(
        self, now: float, prefer: Callable[[Entry], float] | None = None, window: int = 1
    ) -> Entry | None:
        """The next entry to dispatch (its cost charged to its flow), None when empty. Expired entries
        are left for `expired`. With `prefer` and `window` > 1, the flow's best-scoring entry among its
        first `window` (see the module docstring)."""
        f = self._next_flow(now)
        if f is None:
            return None
        entries = f.entries
        if prefer is None or window <= 1 or len(entries) == 1:
            entry = entries.popleft()
        else:
            entry = self._preferred(entries, prefer, window)
        self._dequeued(f, entry)
        f.counter += entry.cost / f.weight
        return entry

    @staticmethod
    def _preferred(entries: deque[Entry], prefer: Callable[[Entry], float], window: int) -> Entry:
        """Remove and return the best of the first `window` entries; an entry passed over `window`
        times already goes first."""
        head = [entries[i] for i in range(min(window, len(entries)))]
        chosen = 0
        for i, e in enumerate(head):
            if e.passed >= window:
                chosen = i
                break
        else:
            best = prefer(head[0])
            for i in range(1, len(head)):
                score = prefer(head[i])
                if score > best:
                    chosen, best = i, score
        for e in head[:chosen]:
            e.passed += 1
        entry = head[chosen]
        del entries[chosen]
        return entry

    def expired(self, now: float) -> list[Entry]:
        """Remove and return every entry whose deadline has come."""
        gone = [e for f in self.flows.values() for e in f.entries if e.deadline <= now]
        for e in gone:
            self.remove(e)
        return gone

    def next_deadline(self) -> float:
        return min((e.deadline for f in self.flows.values() for e in f.entries), default=float("inf"))

    def entries(self) -> Iterator[Entry]:
        for f in self.flows.values():
            yield from f.entries

    # ---- internals ----------------------------------------------------------------------------

    def _dequeued(self, f: Flow, entry: Entry) -> None:
        entry.queued = False
        f.nbytes -= entry.nbytes
        self.length -= 1
        self.nbytes -= entry.nbytes
        if not f.entries:
            band = self._bands.get(f.priority)
            if band is not None:
                band.pop(f.name, None)
                if not band:
                    del self._bands[f.priority]

    def _lift(self, f: Flow) -> None:
        """VTC: a flow (re)joining the backlog starts at the lowest counter of its band's waiting flows."""
        band = self._bands.get(f.priority)
        if band:
            low = min(other.counter for other in band.values())
            if f.counter < low:
                f.counter = low

    def _next_flow(self, now: float) -> Flow | None:
        if not self._bands:
            return None
        if self.order == "fifo":
            return min((f for band in self._bands.values() for f in band.values()),
                       key=lambda f: f.entries[0].seq)
        band = self._bands[self._band(now)]
        return min(band.values(), key=lambda f: (f.counter, f.entries[0].seq))

    def _band(self, now: float) -> int:
        if len(self._bands) == 1 or self.aging_s <= 0:
            return max(self._bands)
        best, best_score = 0, float("-inf")
        for priority, band in self._bands.items():
            oldest = min(f.entries[0].enqueued for f in band.values())
            score = priority + max(0.0, now - oldest) / self.aging_s
            if score > best_score or (score == best_score and priority > best):
                best, best_score = priority, score
        return best

"""session: sticky routing by a session key, with consistent hashing.

The key is `RouteRequest.session_key` when the gateway set one, else the request header `header`
(default `x-session-id`). Each endpoint owns `vnodes * weight` points on a 64-bit ring (xxh64 of
"url#i"); a key goes to the owner of the first point clockwise from xxh64(key) that is a candidate,
so a pod joining or leaving moves only the keys it gains or held (about 1/N of them), and a pod that
is unhealthy or already tried passes its keys to the next owner on the ring. Requests without a key
fall back to least_request.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping, Sequence
from typing import Any

import xxhash

from router.endpoint import Endpoint
from router.policies.common import gateway_load, pick_min, reject_unknown, rng_for
from router.policy import Decision, Policy, PolicyContext, RouteRequest

DEFAULT_HEADER = "x-session-id"


class HashRing:
    """Sorted virtual-node points -> endpoints. Rebuilt only when membership changes."""

    def __init__(self, vnodes: int) -> None:
        self.vnodes = vnodes
        self._members: dict[Endpoint, None] = {}  # insertion-ordered set
        self._points: list[int] = []
        self._owners: list[Endpoint] = []

    def __contains__(self, ep: Endpoint) -> bool:
        return ep in self._members

    def update(self, add: Sequence[Endpoint] = (), remove: Sequence[Endpoint] = ()) -> None:
        for ep in remove:
            self._members.pop(ep, None)
        for ep in add:
            self._members[ep] = None
        members = list(self._members)
        pairs = sorted(
            (xxhash.xxh64_intdigest(f"{ep.url}#{i}".encode()), m)
            for m, ep in enumerate(members)
            for i in range(max(1, round(self.vnodes * ep.weight)))
        )
        self._points = [p for p, _ in pairs]
        self._owners = [members[m] for _, m in pairs]

    def lookup(self, key: str, allowed: Sequence[Endpoint]) -> Endpoint | None:
        """The first owner clockwise from hash(key) that is in `allowed`; None if none is."""
        if not self._points:
            return None
        allowed_set = set(allowed)
        n = len(self._points)
        start = bisect_right(self._points, xxhash.xxh64_intdigest(key.encode()))
        for step in range(n):
            owner = self._owners[(start + step) % n]
            if owner in allowed_set:
                return owner
        return None


class SessionPolicy(Policy):
    """Consistent-hash stickiness on a session key; least_request (random tie-break) without one."""

    type_name = "session"

    def __init__(self, *, header: str = DEFAULT_HEADER, vnodes: int = 64, seed: int | None = None) -> None:
        if vnodes < 1:
            raise ValueError("vnodes must be at least 1")
        self.header = header.lower()
        self._ring = HashRing(vnodes)
        self._rng = rng_for(None, seed)

    @classmethod
    def from_config(cls, params: Mapping[str, Any], ctx: PolicyContext) -> SessionPolicy:
        reject_unknown(params, {"header", "vnodes", "seed"}, cls.type_name)
        return cls(
            header=str(params.get("header", DEFAULT_HEADER)),
            vnodes=int(params.get("vnodes", 64)),
            seed=params.get("seed", ctx.seed),
        )

    async def start(self, endpoints: Sequence[Endpoint]) -> None:
        self._ring.update(add=endpoints)

    def endpoints_changed(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        self._ring.update(add=added, remove=removed)

    def endpoints_reweighted(self, endpoints: Sequence[Endpoint]) -> None:
        self._ring.update()  # the same members, their points counted again from the new weights

    def pick(self, request: RouteRequest, candidates: Sequence[Endpoint]) -> Decision:
        key = request.session_key or request.headers.get(self.header)
        if not key:
            return Decision(pick_min(candidates, gateway_load, self._rng), "no_session_key")
        missing = [ep for ep in candidates if ep not in self._ring]
        if missing:  # endpoints never announced through start(): join them to the ring now
            self._ring.update(add=missing)
        owner = self._ring.lookup(key, candidates)
        assert owner is not None  # candidates is non-empty and all of it is on the ring
        return Decision(owner, "sticky")

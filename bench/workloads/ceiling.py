"""The best prefix-cache hit rate any router can reach: one cache of infinite size, same requests.

With chained block keys, a full block hits an infinite cache exactly when the same chain was seen
before, so the hit count is order-independent: total full blocks minus distinct chains. Partial last
blocks are never cached (as in vLLM). The bench keeps its own chaining (Python tuples): it must not
share the gateway's hashing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class Ceiling:
    prompt_tokens: int
    hit_tokens: int
    block_size: int

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def infinite_cache_ceiling(prompts: Iterable[Sequence[int]], block_size: int) -> Ceiling:
    """Hit tokens of an infinite block cache over `prompts` (token id sequences) at `block_size`."""
    if block_size <= 0:
        raise ValueError("block_size must be > 0")
    seen: set[int] = set()
    total = hits = 0
    for tokens in prompts:
        total += len(tokens)
        parent = 0
        for start in range(0, len(tokens) - block_size + 1, block_size):
            key = hash((parent, tuple(tokens[start : start + block_size])))
            if key in seen:
                hits += block_size
            else:
                seen.add(key)
            parent = key
    return Ceiling(total, hits, block_size)

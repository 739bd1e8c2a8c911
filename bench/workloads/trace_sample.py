"""A short replay of a conversation trace that keeps its sharing: sample conversations, not a time window.

In the Mooncake conversation trace a conversation's next turn comes minutes after the previous one,
so the first N records share almost nothing but the service's one common first block (the first 120
records: 3% of prompt tokens; the whole trace: 37%). Keeping whole conversations from a long stretch
of the trace instead, until N records are kept, preserves both the turns' sharing and the trace's
arrival pattern (thinned; replay faster to restore the rate).

Every prompt of that trace starts with the same block (hash id 0), and a turn repeats the previous
turn's ids, so the second hash id names the conversation (`conversation_key`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from bench.workloads.trace import TraceRecord
from bench.workloads.words import rng_for


def conversation_key(record: TraceRecord) -> tuple[int, ...]:
    """The record's conversation: its second hash id (its only one for a single-block prompt)."""
    return record.hash_ids[1:2] or record.hash_ids[:1]


def sample_conversations(records: Sequence[TraceRecord], keep: int, seed: int = 0) -> list[TraceRecord]:
    """About `keep` records of whole conversations drawn at random (seeded), in the original order.

    Conversations are added in a seeded random order while the total stays within `keep`; one that
    would overflow is skipped, so fewer than `keep` records come back only when no remaining
    conversation is small enough.
    """
    if keep <= 0:
        raise ValueError("keep must be > 0")
    by_key: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, rec in enumerate(records):
        by_key[conversation_key(rec)].append(i)
    keys = list(by_key)
    chosen: list[int] = []
    for j in rng_for(seed, "trace-conversations").permutation(len(keys)):
        members = by_key[keys[int(j)]]
        if len(chosen) + len(members) <= keep:
            chosen += members
        if len(chosen) == keep:
            break
    return [records[i] for i in sorted(chosen)]

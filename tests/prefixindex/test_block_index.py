"""The block index against a brute-force model, and its per-pod CLOCK capacity."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prefixindex.index import BlockIndex

PODS = ["a", "b", "c"]

op_st = st.one_of(
    st.tuples(st.just("insert"), st.sampled_from(PODS), st.lists(st.integers(1, 30), max_size=12)),
    st.tuples(st.just("discard"), st.sampled_from(PODS), st.lists(st.integers(1, 30), max_size=6)),
    st.tuples(st.just("clear"), st.sampled_from(PODS), st.just([])),
)


def brute_match(model: dict[str, set[int]], keys: list[int]) -> dict[str, int]:
    out = {}
    for pod, held in model.items():
        n = 0
        while n < len(keys) and keys[n] in held:
            n += 1
        if n:
            out[pod] = n
    return out


@given(st.lists(op_st, max_size=40), st.lists(st.integers(1, 30), max_size=15))
def test_unbounded_index_matches_brute_force(ops, query: list[int]) -> None:
    index = BlockIndex()
    model: dict[str, set[int]] = {p: set() for p in PODS}
    for p in PODS:
        index.add_pod(p)
    for op, pod, keys in ops:
        if op == "insert":
            index.insert(pod, keys)
            model[pod].update(keys)
        elif op == "discard":
            index.discard(pod, keys)
            model[pod].difference_update(keys)
        else:
            index.clear_pod(pod)
            model[pod].clear()
    assert index.match(query) == brute_match(model, query)
    assert index.match(query, ["b"]) == {k: v for k, v in brute_match(model, query).items() if k == "b"}
    for p in PODS:
        assert index.keys_of(p) == model[p]
        assert index.held(p) == len(model[p])
    assert index.entries == sum(len(v) for v in model.values())
    assert len(index) == len(set().union(*model.values()))


@given(
    st.integers(1, 12),
    st.lists(st.tuples(st.sampled_from(["a", "b"]), st.lists(st.integers(1, 40), max_size=8)), max_size=40),
)
def test_capacity_holds_and_the_newest_blocks_stay(capacity: int, ops) -> None:
    index = BlockIndex()
    index.add_pod("a", capacity)
    index.add_pod("b", capacity)
    for pod, keys in ops:
        index.insert(pod, keys)
        for p in ("a", "b"):
            assert index.held(p) <= capacity
            assert len(index.keys_of(p)) == index.held(p)
        if keys:
            assert keys[-1] in index.keys_of(pod)  # just inserted: never the victim
    # brute-force match over what the index actually holds
    model = {p: index.keys_of(p) for p in ("a", "b")}
    for _, keys in ops:
        assert index.match(keys) == brute_match(model, keys)


def test_lru_evicts_the_untouched_block_first() -> None:
    index = BlockIndex()
    index.add_pod("a", 3)
    index.insert("a", [1, 2, 3])
    index.insert("a", [1])  # touch 1: 2 is now least recently used
    index.insert("a", [4])
    assert index.keys_of("a") == {1, 3, 4}
    index.insert("a", [5])  # 3 is next
    assert index.keys_of("a") == {1, 4, 5}


def test_eviction_keeps_other_pods_copies() -> None:
    index = BlockIndex()
    index.add_pod("a", 2)
    index.add_pod("b", 2)
    index.insert("a", [1, 2])
    index.insert("b", [1, 2])
    index.insert("a", [3, 4])
    assert index.match([1, 2]) == {"b": 2}
    assert index.match([3, 4]) == {"a": 2}
    assert index.holders(1) == ["b"]


def test_match_stops_at_first_gap_per_pod() -> None:
    index = BlockIndex()
    for p in PODS:
        index.add_pod(p)
    index.insert("a", [1, 2, 3, 4])
    index.insert("b", [1, 2, 4])
    index.insert("c", [2, 3])
    assert index.match([1, 2, 3, 4]) == {"a": 4, "b": 2}
    assert index.match([5, 1]) == {}


def test_capacity_change_and_pod_removal() -> None:
    index = BlockIndex()
    index.add_pod("a", 10)
    index.insert("a", list(range(1, 11)))
    index.set_capacity("a", 4)
    assert index.keys_of("a") == {7, 8, 9, 10}
    index.set_capacity("a", 6)
    index.insert("a", [11, 12])
    assert index.held("a") == 6
    index.add_pod("b")
    index.insert("b", [7, 100])
    index.remove_pod("a")
    assert "a" not in index
    assert len(index) == 2 and index.entries == 2
    index.add_pod("c", 1)  # reuses a's slot: inherits nothing
    assert index.match([7, 8]) == {"b": 1}
    with pytest.raises(ValueError):
        index.add_pod("d", 0)


def test_memory_per_block_is_under_100_bytes() -> None:
    """A smaller version of bench/index_memory.py: 8 pods, 160k blocks."""
    n = 160_000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        index = BlockIndex()
        for p in range(8):
            index.add_pod(p, n // 8)
        key = 0x5DEECE66D
        for p in range(8):
            keys = []
            for _ in range(n // 8):
                key = (key * 6364136223846793005 + 1442695040888963407) & ((1 << 60) - 1)
                keys.append(key)
            index.insert(p, keys)
            del keys
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(index) == n
    assert used / n < 100
    assert index.nbytes() / n < 100

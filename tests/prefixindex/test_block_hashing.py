"""Block keys: chained, prefix-stable, full blocks only, separated by model, LoRA and cache_salt."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prefixindex.hashing import KEY_MASK, block_keys, root_key

tokens_st = st.lists(st.integers(0, 2**32 - 1), max_size=300)
ROOT = root_key("m")


@given(tokens_st, tokens_st, st.integers(1, 40))
def test_keys_of_a_prefix_are_a_prefix_of_the_keys(a: list[int], b: list[int], bs: int) -> None:
    whole = block_keys(a + b, bs, ROOT)
    assert block_keys(a, bs, ROOT) == whole[: len(a) // bs]


@given(tokens_st, st.integers(1, 40))
def test_one_key_per_full_block_in_range(tokens: list[int], bs: int) -> None:
    keys = block_keys(tokens, bs, ROOT)
    assert len(keys) == len(tokens) // bs
    assert all(0 < k <= KEY_MASK for k in keys)


@given(st.lists(st.integers(0, 1000), min_size=64, max_size=64), st.integers(0, 63))
def test_changing_a_token_changes_its_block_and_every_later_one(tokens: list[int], i: int) -> None:
    other = list(tokens)
    other[i] = tokens[i] + 1
    a, b = block_keys(tokens, 8, ROOT), block_keys(other, 8, ROOT)
    first = i // 8
    assert a[:first] == b[:first]
    assert all(x != y for x, y in zip(a[first:], b[first:], strict=True))


def test_roots_separate_models_adapters_and_salts() -> None:
    roots = {
        root_key("m"), root_key("m2"), root_key("m", lora="a"), root_key("m", cache_salt="a"),
        root_key("m", lora="a", cache_salt="b"), root_key("m", lora="b", cache_salt="a"),
    }
    assert len(roots) == 6
    tokens = list(range(32))
    assert block_keys(tokens, 16, root_key("m", cache_salt="t1"))[0] != block_keys(
        tokens, 16, root_key("m", cache_salt="t2")
    )[0]


def test_chaining_from_a_parent_continues_the_chain() -> None:
    tokens = list(range(100))
    keys = block_keys(tokens, 10, ROOT)
    assert block_keys(tokens[30:], 10, keys[2]) == keys[3:]


def test_max_blocks_and_bad_input() -> None:
    assert block_keys(list(range(100)), 10, ROOT, max_blocks=3) == block_keys(list(range(30)), 10, ROOT)
    with pytest.raises(ValueError):
        block_keys([1, -2, 3, 4], 2, ROOT)
    with pytest.raises(ValueError):
        block_keys([1, 2**32], 2, ROOT)
    with pytest.raises(ValueError):
        block_keys([1, 2], 0, ROOT)

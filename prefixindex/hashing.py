"""Block keys: the gateway's own names for KV-cache blocks.

A prompt of n tokens has n // block_size full blocks; block i is named by

    key_0 = xxh3_64(bytes(tokens[0:bs]), seed=root)
    key_i = xxh3_64(bytes(tokens[i*bs:(i+1)*bs]), seed=key_{i-1})

kept to 60 bits (so each key is a 32-byte Python int and fits a uint64 array) and never 0 (0 marks an
empty slot). Because each key chains its predecessor, a key names its block's whole prefix path: two
prompts share key_i exactly when they share their first (i+1)*bs tokens under the same root. The root
mixes the model, the LoRA adapter and the `cache_salt`, so tenants and adapters never share keys. Only
full blocks are named, as vLLM only caches full blocks.

Keys are the gateway's own: vLLM's engine hashes (SHA-256 over pickled/CBOR tuples, seeded per
process) are never reproduced; KV events are translated by recomputing these keys from their tokens.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import xxhash

KEY_BITS = 60
KEY_MASK = (1 << KEY_BITS) - 1

_xxh3 = xxhash.xxh3_64_intdigest


def root_key(model: str, lora: str | None = None, cache_salt: str | None = None) -> int:
    """The seed of a prompt's chain: distinct for every (model, LoRA adapter, cache_salt)."""
    material = f"kvgate/1\0{model}\0{lora or ''}\0{cache_salt or ''}".encode()
    return _xxh3(material) & KEY_MASK or 1


def token_bytes(tokens: Sequence[int]) -> bytes:
    """The tokens as little-endian uint32 bytes. Raises ValueError for an id outside [0, 2**32)."""
    try:
        return array("I", tokens).tobytes()
    except (OverflowError, TypeError) as exc:
        raise ValueError("token ids must be integers in [0, 2**32)") from exc


def block_keys(
    tokens: Sequence[int], block_size: int, root: int, *, max_blocks: int | None = None
) -> list[int]:
    """The chained keys of the full blocks of `tokens` (at most `max_blocks` of them).

    Prefix-stable: the keys of a prefix of `tokens` are a prefix of the keys of `tokens`.
    """
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    n = len(tokens) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        return []
    data = token_bytes(tokens[: n * block_size])
    return chain_keys(data, 4 * block_size, n, root)


def chain_keys(data: bytes, width: int, n: int, parent: int) -> list[int]:
    """Chain `n` blocks of `width` bytes each from `parent` (a root or the key of the block before).

    `data` is bytes, not a memoryview: slicing 64-byte blocks off bytes is cheaper than off a view."""
    out: list[int] = []
    append = out.append
    key = parent
    h = _xxh3
    mask = KEY_MASK
    for start in range(0, n * width, width):
        key = h(data[start : start + width], key) & mask or 1
        append(key)
    return out


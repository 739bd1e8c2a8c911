"""Deterministic filler text whose token count is exact under the default `WordTokenizer`.

Every word is lowercase letters only, so `WordTokenizer` (one token per `\\w+` run) gives one token per
word: `text(key, n)` is exactly n tokens. The same (seed, key) always gives the same words, different
keys give unrelated words, so content identity is controlled by keys alone.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import xxhash

_CONSONANTS = "bdfghjklmnprstvwz"
_VOWELS = "aeiou"


@lru_cache(maxsize=1)
def vocabulary() -> np.ndarray:
    """Four-letter consonant-vowel words (7225 of them) as a numpy object array."""
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    return np.array([a + b for a in syllables for b in syllables], dtype=object)


def rng_for(seed: int, *key: object) -> np.random.Generator:
    """A generator seeded by `seed` and `key` (any reprs), independent of PYTHONHASHSEED."""
    digest = xxhash.xxh128_intdigest(repr(key).encode(), seed=seed & 0xFFFFFFFFFFFFFFFF)
    return np.random.default_rng([digest & 0xFFFFFFFF_FFFFFFFF, digest >> 64])


def words(seed: int, key: object, n: int) -> list[str]:
    """`n` deterministic words for `key`."""
    if n <= 0:
        return []
    vocab = vocabulary()
    return vocab[rng_for(seed, "words", key).integers(0, len(vocab), n)].tolist()


def text(seed: int, key: object, n: int) -> str:
    """`n` deterministic words for `key`, space separated: exactly n WordTokenizer tokens."""
    return " ".join(words(seed, key, n))

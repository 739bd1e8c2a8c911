"""Deterministic generated text: one token per generated word, each word a single token.

The words are chosen so that re-tokenizing the generated text gives back the same token ids (a
multi-turn conversation that sends the answer back then shares its tokens, as with a real model).
"""

from __future__ import annotations

from collections.abc import Sequence

from prefixindex.tokenizer import Tokenizer

_WORDS = (
    "the of and to in is was for on that with as by at from it his an are be this which or her "
    "had were one all their but not has have they been its new more who first two when also after "
    "time into other would some can most years there over only may these about out up many him "
    "where between such well during under while three both then each through year world city used "
    "made known state later part since being before name people work school house water family "
    "music team game river north south east west small large long high early village model cache "
    "token block route prefix server engine batch queue"
).split()


class TextGenerator:
    """Maps (seed, position) to a (token id, text piece) from a fixed single-token vocabulary."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        ids: list[int] = []
        pieces: list[str] = []
        seen: set[int] = set()
        for word in _WORDS:
            toks = tokenizer.encode(" " + word, add_special_tokens=False)
            if len(toks) == 1 and toks[0] not in seen:
                seen.add(toks[0])
                ids.append(toks[0])
                pieces.append(" " + word)
        if not ids:
            raise ValueError("the tokenizer encodes none of the generator's words as a single token")
        self.ids = ids
        self.pieces = dict(zip(ids, pieces, strict=True))
        self._n = len(ids)

    def seed_for(self, prompt_ids: Sequence[int]) -> int:
        """A seed that depends on the prompt only, so the same prompt always gets the same answer."""
        return (len(prompt_ids) * 31 + (prompt_ids[-1] if prompt_ids else 0)) % self._n

    def token(self, seed: int, position: int) -> int:
        return self.ids[(seed + position * 7) % self._n]

    def text(self, token_ids: Sequence[int]) -> str:
        pieces = self.pieces
        return "".join(pieces.get(t, "") for t in token_ids)

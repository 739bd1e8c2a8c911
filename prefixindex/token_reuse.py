"""Reuse of a rendered chat's tokens across turns: a multi-turn chat's history was tokenized on the
previous turn, so the next turn only tokenizes what it adds.

Cutting a text and tokenizing the pieces apart gives the full text's tokens only where tokenization
provably restarts. A HuggingFace tokenizer first splits its input on its special added tokens (those
matched on the raw text), then normalizes, pre-tokenizes and encodes each piece on its own; a piece's
result depends only on its text and on whether it starts the input. So a cut just before an
occurrence of a special token S is exact when the full text's split starts a match there, which holds
when no added token can cover the cut (none holds S past its first character, nor ends in a prefix of
S: checked once per tokenizer), S does not eat whitespace to its left (`lstrip`), is not matched on
normalized text, is not `single_word`, and starts with a non-word character (so a `single_word` token
ending at the cut is matched the same with or without what follows). The pieces after the first then
never start the input, in both tokenizations. Chat templates put such tokens between messages
(`<|im_start|>`, `<|eot_id|>`, `</s>`), so the cuts fall on message boundaries. Only texts encoded
without added special tokens (chats, as vLLM encodes them) are cut: a post-processor adding BOS/EOS
would add them to every piece. A tokenizer with truncation or padding configured is never cut.

`TokenReuse` keys a prefix by a chained 128-bit xxh3 over its pieces (no text kept), holds its tokens
as 4-byte ids, and evicts least recently used entries past `max_bytes`. Each text stores its longest
prefix ending at a cut (the history up to the last message boundary: what the next turn starts with).
It is not thread-safe by itself: callers hold `lock`.
"""

from __future__ import annotations

import re
import threading
from array import array
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import xxhash

ENTRY_OVERHEAD = 120  # bytes per entry beside its ids: the dict slot, the key, the array header


class AddedTokenInfo(Protocol):
    """What `tokenizers.AddedToken` tells about an added token."""

    content: str
    special: bool
    normalized: bool
    lstrip: bool
    single_word: bool


def safe_cut_tokens(added: Iterable[AddedTokenInfo]) -> list[str]:
    """The special tokens a text may be cut just before (see the module docstring), longest first."""
    tokens = list(added)
    contents = [t.content for t in tokens if t.content]
    # every proper suffix of an added token: a token ending in a prefix of S could cover a cut before S
    suffixes = {c[i:] for c in contents for i in range(1, len(c))}
    safe = []
    for t in tokens:
        s = t.content
        if not s or not t.special or t.normalized or t.lstrip or t.single_word:
            continue
        if re.match(r"\w", s[0]):
            continue
        if any(s[:k] in suffixes for k in range(1, len(s) + 1)):
            continue  # some token's tail is a prefix of S (or S itself): it may cover the cut
        if any(s in c[1:] for c in contents):
            continue  # S sits inside another token: that one may be matched across the cut
        safe.append(s)
    return sorted(set(safe), key=len, reverse=True)


class CutFinder:
    """Positions in a text where it may be cut (just before a safe special token; never at 0)."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self._re = re.compile("|".join(map(re.escape, tokens))) if tokens else None

    def __bool__(self) -> bool:
        return self._re is not None

    def cuts(self, text: str) -> list[int]:
        if self._re is None:
            return []
        return [m.start() for m in self._re.finditer(text) if m.start()]


@dataclass(slots=True)
class ReusePlan:
    """How to tokenize one text: `head` (tokens of text[:start], from the cache, or empty), then the
    pieces text[a:b] encoded apart; `store` is the key under which the tokens of text[:pieces[0][1]]
    (head + first piece) are kept, when the text has a cut past `start`."""

    head: array
    start: int
    pieces: list[tuple[int, int]]
    store: int | None


class TokenReuse:
    """Tokens of text prefixes ending at a cut, LRU by bytes. See the module docstring."""

    def __init__(self, finder: CutFinder, max_bytes: int) -> None:
        self.finder = finder
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.reused_tokens = 0
        self.lock = threading.Lock()
        self._entries: OrderedDict[int, array] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def plan(self, text: str) -> ReusePlan:
        """The longest cached prefix of `text` at a cut, and the pieces left to encode."""
        cuts = self.finder.cuts(text)
        keys = []
        h = 0
        prev = 0
        for c in cuts:
            piece = text[prev:c].encode("utf-8", "surrogatepass")
            h = xxhash.xxh3_128_intdigest(h.to_bytes(16, "little") + piece)
            keys.append(h)
            prev = c
        start, head = 0, _EMPTY
        entries = self._entries
        for i in range(len(keys) - 1, -1, -1):
            got = entries.get(keys[i])
            if got is not None:
                entries.move_to_end(keys[i])
                start, head = cuts[i], got
                self.hits += 1
                self.reused_tokens += len(got)
                break
        else:
            if cuts:
                self.misses += 1
        if cuts and cuts[-1] > start:
            return ReusePlan(head, start, [(start, cuts[-1]), (cuts[-1], len(text))], keys[-1])
        return ReusePlan(head, start, [(start, len(text))], None)

    def store(self, key: int, tokens: list[int] | array) -> None:
        if key in self._entries:
            return
        ids = tokens if isinstance(tokens, array) else array("i", tokens)
        size = ids.itemsize * len(ids) + ENTRY_OVERHEAD
        if size > self.max_bytes:
            return
        self._entries[key] = ids
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= old.itemsize * len(old) + ENTRY_OVERHEAD


_EMPTY = array("i")


def reuse_for(tokenizer: Any, max_bytes: int) -> TokenReuse | None:
    """A TokenReuse for a tokenizer that names the tokens its texts may be cut before
    (`HFTokenizer.cut_tokens`), or None when it names none or `max_bytes` is 0."""
    cut_tokens = getattr(tokenizer, "cut_tokens", None)
    if max_bytes <= 0 or cut_tokens is None:
        return None
    finder = CutFinder(cut_tokens())
    return TokenReuse(finder, max_bytes) if finder else None

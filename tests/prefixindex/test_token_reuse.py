"""Chat-turn token reuse (prefixindex/token_reuse.py): cuts only where tokenization provably restarts,
identical tokens to a full tokenization on real templates, bounded memory."""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tokenizers import AddedToken, Tokenizer

from prefixindex.token_reuse import CutFinder, TokenReuse, safe_cut_tokens
from prefixindex.tokenize_worker import PromptEncoder
from prefixindex.tokenizer import HFTokenizer

pytestmark = pytest.mark.timeout(60)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MODEL = FIXTURES / "vllm" / "model"
TEMPLATES = FIXTURES / "chat_templates"
# the special tokens the templates write, added as a real model's tokenizer has them
TEMPLATE_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
WORDS = ("the quick brown fox jumps over the lazy dog , hello world ! data : model token "
         "cache prefix 42 naïve café ☕ 日本語 <s> </s> <|im_end|>").split()  # fmt: skip


@dataclass
class Tok:
    content: str
    special: bool = True
    normalized: bool = False
    lstrip: bool = False
    single_word: bool = False


@pytest.mark.parametrize(("tokens", "safe"), [
    ([Tok("<|im_start|>"), Tok("<|im_end|>")], ["<|im_start|>", "<|im_end|>"]),
    ([Tok("<x>", special=False)], []),  # not special: may be matched on normalized text
    ([Tok("<x>", normalized=True)], []),
    ([Tok("<x>", lstrip=True)], []),  # would eat the whitespace left of the cut
    ([Tok("<x>", single_word=True)], []),
    ([Tok("word>")], []),  # starts with a word character
    ([Tok("<x>"), Tok("a<x>")], []),  # another token holds <x> past its start: may cover the cut
    ([Tok("<x>"), Tok("ab<")], []),  # another token ends in a prefix of <x>
    ([Tok("<x>"), Tok("<x>y")], ["<x>", "<x>y"]),  # both start at the cut: still a split there
    ([Tok("</s>"), Tok("<s>")], ["</s>", "<s>"]),
])  # fmt: skip
def test_safe_cut_tokens(tokens: list[Tok], safe: list[str]) -> None:
    assert sorted(safe_cut_tokens(tokens)) == sorted(safe)


def test_cuts_are_just_before_each_safe_token_never_at_the_start() -> None:
    finder = CutFinder(["<a>", "<ab>"])
    assert finder.cuts("<a>x<ab>y<a>") == [4, 9]
    assert not CutFinder([]) and CutFinder([]).cuts("<a>") == []


def _tokenizer_dir(tmp_path: Path, template: str | None, specials: list[str]) -> Path:
    out = tmp_path / (template or "own").replace(".jinja", "")
    shutil.copytree(MODEL, out)
    if specials:
        tok = Tokenizer.from_file(str(MODEL / "tokenizer.json"))
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
        tok.save(str(out / "tokenizer.json"))
    if template:
        shutil.copy(TEMPLATES / template, out / "chat_template.jinja")
    return out


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _conversation(seed: int, turns: int) -> list[list[dict[str, Any]]]:
    """The message lists of successive turns of one chat (each turn: the history, a reply, a question)."""
    rng = random.Random(seed)
    messages: list[dict[str, Any]] = [{"role": "system", "content": _text(rng, 30)}]
    out = []
    for _ in range(turns):
        question = _text(rng, rng.randint(1, 60)) + rng.choice(["", " ", "\n"])
        messages.append({"role": "user", "content": question})
        out.append(list(messages))
        messages.append({"role": "assistant", "content": rng.choice(["", " ", _text(rng, 40)])})
    return out


@pytest.mark.parametrize(("template", "specials"), [
    (None, []),  # the tiny model's own template: messages end with </s>
    ("qwen25_tools.jinja", TEMPLATE_SPECIALS),
    ("parts_default.jinja", TEMPLATE_SPECIALS),
    ("qwen25_tools.jinja", []),  # the template's markers are plain text here: only </s> and <s> cut
])  # fmt: skip
def test_reused_turns_give_the_tokens_of_a_full_tokenization(
    tmp_path: Path, template: str | None, specials: list[str]
) -> None:
    tok = HFTokenizer(str(_tokenizer_dir(tmp_path, template, specials)))
    encoder = PromptEncoder(tok, workers=0, reuse_bytes=1 << 20)
    assert encoder.reuse is not None
    for seed in range(6):
        for messages in _conversation(seed, turns=5):
            body: dict[str, Any] = {"messages": messages}
            if seed % 2:
                body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
            text, special = tok.render_chat_request(body)
            assert encoder.encode_now(text, special) == tok.encode(text, special), (seed, text)
    if specials or template is None:
        assert encoder.reuse.hits >= 6 * 3 and encoder.reuse.reused_tokens > 0


def test_a_hit_reuses_the_history_and_encodes_only_the_rest(tmp_path: Path) -> None:
    tok = HFTokenizer(str(_tokenizer_dir(tmp_path, "qwen25_tools.jinja", TEMPLATE_SPECIALS)))
    calls: list[list[str]] = []

    class Counting:
        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return tok.encode(text, add_special_tokens)

        def encode_batch(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
            calls.append(texts)
            return tok.encode_batch(texts, add_special_tokens)

        def cut_tokens(self) -> list[str]:
            return tok.cut_tokens()

    encoder = PromptEncoder(Counting(), workers=0, reuse_bytes=1 << 20)  # type: ignore[arg-type]
    history = [{"role": "user", "content": "long question " * 200}]
    first, _ = tok.render_chat_request({"messages": history})
    encoder.encode_now(first, False)
    turn2 = [*history, {"role": "assistant", "content": "an answer"}, {"role": "user", "content": "more?"}]
    second, _ = tok.render_chat_request({"messages": turn2})
    calls.clear()
    assert encoder.encode_now(second, False) == tok.encode(second, False)
    encoded = "".join(text for call in calls for text in call)
    assert "long question" not in encoded and encoded == second[second.index("<|im_start|>assistant"):]


def test_texts_with_special_tokens_added_are_not_cut(tmp_path: Path) -> None:
    tok = HFTokenizer(str(_tokenizer_dir(tmp_path, None, [])))
    encoder = PromptEncoder(tok, workers=0, reuse_bytes=1 << 20)
    text = "<|user|>\nhi</s>\n<|assistant|>\n"
    for _ in range(2):
        assert encoder.encode_now(text, True) == tok.encode(text, True)
    assert encoder.reuse is not None and len(encoder.reuse) == 0


def test_a_tokenizer_with_truncation_is_never_cut(tmp_path: Path) -> None:
    out = _tokenizer_dir(tmp_path, None, [])
    raw = Tokenizer.from_file(str(out / "tokenizer.json"))
    raw.enable_truncation(16)
    raw.save(str(out / "tokenizer.json"))
    tok = HFTokenizer(str(out))
    assert tok.cut_tokens() == [] and PromptEncoder(tok, reuse_bytes=1 << 20).reuse is None


def test_memory_is_bounded_by_bytes_least_recently_used_out() -> None:
    reuse = TokenReuse(CutFinder(["<m>"]), max_bytes=3 * (400 + 120))
    texts = [f"a{i} <m>x" for i in range(4)]
    for i, t in enumerate(texts):
        plan = reuse.plan(t)
        assert plan.store is not None
        reuse.store(plan.store, list(range(100 + i % 1)))  # 100 ids: 400 bytes + overhead each
        if i == 2:
            assert reuse.plan(texts[0]).start > 0  # touch the oldest: the next eviction takes texts[1]
    assert len(reuse) == 3 and reuse.nbytes <= reuse.max_bytes
    assert reuse.plan(texts[1]).start == 0 and reuse.plan(texts[0]).start > 0
    big = reuse.plan("huge <m>")
    reuse.store(big.store or 0, list(range(10_000)))  # larger than the whole budget: not kept
    assert reuse.nbytes <= reuse.max_bytes and reuse.plan("huge <m>").start == 0


def test_a_token_eating_whitespace_to_its_left_would_change_the_tokens_so_is_no_cut(tmp_path: Path) -> None:
    out = _tokenizer_dir(tmp_path, None, [])
    raw = Tokenizer.from_file(str(out / "tokenizer.json"))
    raw.add_special_tokens([AddedToken("<|m|>", special=True, normalized=False, lstrip=True)])
    raw.save(str(out / "tokenizer.json"))
    tok = HFTokenizer(str(out))
    text = "hello   \n<|m|>world"
    cut = text.index("<|m|>")
    assert tok.encode(text[:cut], False) + tok.encode(text[cut:], False) != tok.encode(text, False)
    assert "<|m|>" not in tok.cut_tokens() and "</s>" in tok.cut_tokens()

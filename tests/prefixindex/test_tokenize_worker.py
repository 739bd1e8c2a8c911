"""The tokenizer worker (prefixindex/tokenize_worker.py): the same tokens as inline, batches of what
arrives together, errors handled as inline, and an event loop that stays responsive meanwhile."""

from __future__ import annotations

import asyncio
import os
import random
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from prefixindex import tokenize_worker
from prefixindex.tokenize_worker import PromptEncoder, TokenizerWorker, encode_texts
from prefixindex.tokenizer import HFTokenizer, WordTokenizer
from router.policy import RouteRequest
from router.prefix_cache import KEY_SLICE_BLOCKS, PrefixCache, PrefixCacheConfig

pytestmark = pytest.mark.timeout(60)

MODEL = Path(__file__).resolve().parents[1] / "fixtures" / "vllm" / "model"
WORDS = "the quick brown fox jumps over lazy dog, while hello-world data: model (token) cache prefix".split()


def words(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def hf() -> HFTokenizer:
    return HFTokenizer(str(MODEL))


class Recorder:
    """A BatchObserver keeping what it was told."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.reuse: list[tuple[bool, int]] = []

    def batch(self, texts: int) -> None:
        self.batches.append(texts)

    def reused(self, hit: bool, tokens: int, cache_bytes: int) -> None:
        self.reuse.append((hit, tokens))


class Gated:
    """An HF tokenizer whose first batch waits for `gate`, so the next requests queue up behind it."""

    def __init__(self, inner: HFTokenizer) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.calls = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.inner.encode(text, add_special_tokens)

    def encode_batch(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            self.gate.wait(10)
        return self.inner.encode_batch(texts, add_special_tokens)


class Failing:
    """Encodes like the word tokenizer, but a text holding `BOOM` raises `error`."""

    def __init__(self, error: type[Exception] = ValueError) -> None:
        self.error = error
        self.word = WordTokenizer()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if "BOOM" in text:
            raise self.error("cannot encode BOOM")
        return self.word.encode(text)

    def render_chat_request(self, body: Any) -> tuple[str, bool]:
        return self.word.render_chat_request(body)

    def encode_batch(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        return [self.encode(t, add_special_tokens) for t in texts]


async def test_the_worker_gives_the_tokens_inline_encoding_gives(hf: HFTokenizer) -> None:
    texts = ["", "hi", " leading space", "<s>special</s> inside", "naïve café ☕ 日本語", words(3000, 1)]
    worker = TokenizerWorker(hf)
    try:
        for special in (True, False):
            got = await asyncio.gather(*(worker.encode(t, special) for t in texts))
            assert got == [hf.encode(t, special) for t in texts]
    finally:
        worker.close()


async def test_requests_arriving_while_the_worker_is_busy_are_encoded_in_one_batch(hf: HFTokenizer) -> None:
    gated, seen = Gated(hf), Recorder()
    worker = TokenizerWorker(gated, observer=seen)
    try:
        first = asyncio.ensure_future(worker.encode("first", True))
        await asyncio.get_running_loop().run_in_executor(None, gated.entered.wait, 10)
        texts = [words(50, seed) for seed in range(5)]
        rest = [asyncio.ensure_future(worker.encode(t, True)) for t in texts]
        await asyncio.sleep(0)  # all five queued behind the gated batch
        gated.gate.set()
        assert await first == hf.encode("first")
        assert await asyncio.gather(*rest) == [hf.encode(t) for t in texts]
        assert seen.batches == [1, 5]
    finally:
        gated.gate.set()
        worker.close()


def test_a_batch_mixing_flags_encodes_each_flag_as_asked(hf: HFTokenizer) -> None:
    jobs = [("a b", True), ("a b", False), ("c", True)]
    assert encode_texts(hf, jobs) == [hf.encode(t, s) for t, s in jobs]


async def test_a_failing_text_fails_alone_with_its_own_exception() -> None:
    worker = TokenizerWorker(Failing())
    try:
        good, bad, also = await asyncio.gather(
            worker.encode("fine text", True), worker.encode("a BOOM here", True), worker.encode("ok", True),
            return_exceptions=True,
        )
        assert good == WordTokenizer().encode("fine text") and also == WordTokenizer().encode("ok")
        assert isinstance(bad, ValueError) and "BOOM" in str(bad)
    finally:
        worker.close()


def _unkeyed(registry: CollectorRegistry, reason: str) -> float:
    labels = {"model": "m", "reason": reason}
    return registry.get_sample_value("kvgate_prefix_unkeyed_requests_total", labels) or 0


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize(("path", "body", "reason"), [
    ("/v1/completions", {"model": "m", "prompt": "a BOOM prompt"}, "prompt"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "BOOM"}]},
     "chat_template"),
])  # fmt: skip
async def test_an_encode_failure_routes_without_keys_as_inline_does(
    workers: int, path: str, body: dict[str, Any], reason: str
) -> None:
    registry = CollectorRegistry()
    cache = PrefixCache("m", PrefixCacheConfig(tokenizer_workers=workers), tokenizer=Failing(),  # type: ignore[arg-type]
                        registry=registry)  # fmt: skip
    try:
        r = RouteRequest("r", "m", path, body, {})
        await cache.read_prompt(r.state, r)
        cache.prepare(r.state, r)
        assert r.state.prompt is None and r.state.keys == []
        assert _unkeyed(registry, reason) == 1
    finally:
        await cache.close()


@pytest.mark.parametrize("workers", [0, 1])
async def test_an_unexpected_tokenizer_error_propagates_as_inline(workers: int) -> None:
    cache = PrefixCache("m", PrefixCacheConfig(tokenizer_workers=workers), tokenizer=Failing(RuntimeError))  # type: ignore[arg-type]
    try:
        r = RouteRequest("r", "m", "/v1/completions", {"model": "m", "prompt": "BOOM"}, {})
        with pytest.raises(RuntimeError, match="BOOM"):
            await cache.read_prompt(r.state, r)
    finally:
        await cache.close()


async def test_read_prompt_through_the_worker_equals_prepare_inline(hf: HFTokenizer) -> None:
    bodies = [
        ("/v1/completions", {"model": "m", "prompt": words(400, 3)}),
        ("/v1/completions", {"model": "m", "prompt": list(range(5, 60))}),
        ("/v1/chat/completions", {"model": "lora-a", "cache_salt": "s",
                                  "messages": [{"role": "user", "content": words(300, 4)}]}),
    ]  # fmt: skip
    inline = PrefixCache("m", PrefixCacheConfig(tokenizer_workers=0), tokenizer=hf)
    worker = PrefixCache("m", PrefixCacheConfig(tokenizer_workers=1), tokenizer=hf)
    try:
        for path, body in bodies:
            a, b = RouteRequest("r", "m", path, body, {}), RouteRequest("r", "m", path, body, {})
            inline.prepare(a.state, a)
            await worker.read_prompt(b.state, b)
            worker.prepare(b.state, b)
            assert b.state.prompt == a.state.prompt and b.state.keys == a.state.keys and a.state.keys
    finally:
        await worker.close()


async def test_the_word_tokenizer_in_slices_gives_the_whole_texts_tokens() -> None:
    word = WordTokenizer()
    text = words(20_000, 5) + "  trailing,punct!! " + "x" * 40_000  # a long run without a space too
    sliced = PromptEncoder(word, workers=1)
    assert sliced.worker is None  # holds the GIL: stays on the loop, yielding between slices
    assert await sliced.encode(text, True) == word.encode(text)


async def _max_loop_lag_while(work: Any) -> tuple[float, float]:
    """(seconds `work` took, the longest a 1 ms ticker on the loop was late meanwhile)."""
    lags: list[float] = []
    stop = False

    async def ticker() -> None:
        while not stop:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - t - 0.001)

    task = asyncio.ensure_future(ticker())
    await asyncio.sleep(0.005)
    lags.clear()
    start = time.perf_counter()
    await work
    took = time.perf_counter() - start
    stop = True
    await task
    return took, max(lags, default=0.0)


async def test_the_loop_stays_responsive_while_a_32k_token_prompt_tokenizes(hf: HFTokenizer) -> None:
    text = words(12_000, 6)  # about 32k tokens with the tiny model's byte-level BPE
    assert len(hf.encode(text)) > 30_000

    async def inline() -> None:
        hf.encode(text)

    inline_took, inline_lag = await _max_loop_lag_while(inline())
    encoder = PromptEncoder(hf, workers=1)
    try:
        await encoder.encode("warm up", True)
        took, lag = await _max_loop_lag_while(encoder.encode(text, True))
    finally:
        encoder.close()
    # inline, the loop stalls for the whole encode; with the worker only for a small part of it
    assert inline_lag > 0.5 * inline_took
    assert lag < 0.25 * min(took, inline_took), (lag, took, inline_took)


async def test_a_long_prompts_keys_hashed_in_slices_are_the_keys_prepare_computes(hf: HFTokenizer) -> None:
    body = {"model": "m", "prompt": words(3000, 7)}  # ~8k tokens: more than one slice of blocks
    inline = PrefixCache("m", PrefixCacheConfig(tokenizer_workers=0), tokenizer=hf)
    worker = PrefixCache("m", PrefixCacheConfig(tokenizer_workers=1), tokenizer=hf)
    try:
        a, b = (RouteRequest("r", "m", "/v1/completions", body, {}) for _ in range(2))
        inline.prepare(a.state, a)
        await worker.read_prompt(b.state, b)
        assert b.state.keys_block_size == 16 and len(b.state.keys) > KEY_SLICE_BLOCKS
        assert b.state.keys == a.state.keys
    finally:
        await worker.close()


ODD = ["w1", "_x", "٣", "²", "é", " ", "\u3000", "\x1c", "\u2028", "\t", ",", "a.b"]


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200)
       | st.lists(st.sampled_from(ODD), max_size=40).map("".join))  # fmt: skip
@settings(max_examples=300, deadline=None)
def test_the_word_tokenizers_split_fast_path_finds_the_words_the_regex_finds(text: str) -> None:
    word = WordTokenizer()
    assert word.encode(text) == [word._id(w) for w in re.findall(r"\w+|[^\w\s]+", text)]


class ThreadRecorder:
    """An HF tokenizer recording, per encode_batch call, the thread, its nice value and the batch size."""

    def __init__(self, inner: HFTokenizer) -> None:
        self.inner = inner
        self.calls: list[tuple[str, int, int]] = []

    def encode_batch(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        self.calls.append((threading.current_thread().name, nice, len(texts)))
        return self.inner.encode_batch(texts, add_special_tokens)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_batch_is_encoded_one_text_at_a_time_on_the_niced_worker_thread(
    hf: HFTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(tokenize_worker.SERIAL_ENV, "true")  # restored after the test
    gated = Gated(hf)
    recorder = ThreadRecorder(gated)
    worker = TokenizerWorker(recorder)
    try:
        first = asyncio.ensure_future(worker.encode("first", True))
        await asyncio.get_running_loop().run_in_executor(None, gated.entered.wait, 10)
        texts = [words(40, seed) for seed in range(3)]
        rest = [asyncio.ensure_future(worker.encode(t, True)) for t in texts]
        await asyncio.sleep(0)
        gated.gate.set()
        assert await first == hf.encode("first")
        assert await asyncio.gather(*rest) == [hf.encode(t) for t in texts]
        # the library's thread pool is off: its threads would not inherit the worker's priority
        assert os.environ[tokenize_worker.SERIAL_ENV] == "false"
        loop_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        assert [size for _, _, size in recorder.calls] == [1, 1, 1, 1]
        assert all(name != threading.current_thread().name for name, _, _ in recorder.calls)
        niced = min(loop_nice + tokenize_worker.WORKER_NICE, 19)
        assert all(nice == niced for _, nice, _ in recorder.calls)
    finally:
        gated.gate.set()
        worker.close()

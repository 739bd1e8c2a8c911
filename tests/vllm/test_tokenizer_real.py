"""prefixindex.tokenizer.HFTokenizer gives exactly the token ids a real vLLM computes.

Two layers: the recordings in tests/fixtures/vllm (always run, no vLLM needed) and, with the marker
`vllm`, fresh prompts and conversations sent to the live pod's `POST /tokenize`. Prompt-cache routing
is only as good as this equality: one token of difference shifts every block hash after it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest

from prefixindex.tokenizer import HFTokenizer

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "vllm"


def _record(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / "http" / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def recorded_tokenizer() -> HFTokenizer:
    return HFTokenizer(str(FIXTURES / "model"))


# ---- recorded: no vLLM needed -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tokenize_prompt", "tokenize_prompt_no_special"])
def test_prompt_matches_recorded_tokenize(recorded_tokenizer: HFTokenizer, name: str) -> None:
    rec = _record(name)
    body = rec["request"]["body"]
    expected = rec["response"]["json"]["tokens"]
    got = recorded_tokenizer.encode(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))
    assert got == expected


@pytest.mark.parametrize(
    "name", ["tokenize_messages", "tokenize_messages_multiturn", "tokenize_messages_no_generation_prompt"]
)
def test_chat_matches_recorded_tokenize(recorded_tokenizer: HFTokenizer, name: str) -> None:
    rec = _record(name)
    body = rec["request"]["body"]
    expected = rec["response"]["json"]["tokens"]
    got = recorded_tokenizer.encode_chat(body["messages"], body.get("add_generation_prompt", True))
    assert got == expected


@pytest.mark.parametrize(
    "name", ["completion", "completion_cached_first", "completion_token_ids", "events_first_prompt"]
)
def test_completion_prompt_tokens_match_usage(recorded_tokenizer: HFTokenizer, name: str) -> None:
    rec = _record(name)
    prompt = rec["request"]["body"]["prompt"]
    ids = prompt if isinstance(prompt, list) else recorded_tokenizer.encode(prompt)
    assert len(ids) == rec["response"]["json"]["usage"]["prompt_tokens"]


@pytest.mark.parametrize("name", ["chat", "chat_max_completion_tokens", "events_chat"])
def test_chat_prompt_tokens_match_usage(recorded_tokenizer: HFTokenizer, name: str) -> None:
    rec = _record(name)
    ids = recorded_tokenizer.encode_chat(rec["request"]["body"]["messages"])
    assert len(ids) == rec["response"]["json"]["usage"]["prompt_tokens"]


@pytest.mark.parametrize(
    ("scenario", "request_name", "chat"),
    [("first_prompt", "events_first_prompt", False), ("chat", "events_chat", True)],
)
def test_event_token_ids_are_the_prompt_tokens(
    recorded_tokenizer: HFTokenizer, scenario: str, request_name: str, chat: bool
) -> None:
    """The engine's BlockStored token_ids are our tokens of the prompt, cut to whole blocks."""
    body = _record(request_name)["request"]["body"]
    tok = recorded_tokenizer
    ids = tok.encode_chat(body["messages"]) if chat else tok.encode(body["prompt"])
    messages = msgpack.unpackb((FIXTURES / "kv_events" / f"{scenario}.msgpack").read_bytes())
    stored = [
        event
        for _topic, _seq, payload in messages
        for event in msgpack.unpackb(payload, strict_map_key=False)[1]
        if event["type"] == "BlockStored"
    ]
    assert len(stored) == 1
    block_size = stored[0]["block_size"]
    full = len(ids) // block_size * block_size
    assert stored[0]["token_ids"] == ids[:full]


# ---- live: the running pod's /tokenize ----------------------------------------------------------

PROMPTS = [
    "Hello world",
    "  leading and trailing spaces  ",
    "Tabs\tand\nnew lines\n\nand a blank line",
    "Unicode: café, naïve, 東京, emoji 🚀, math ∑∫",
    "Special tokens as text: <s> </s> <unk> <pad> and <|user|>",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\n",
    "x" * 700,
    " ".join(f"word{i}" for i in range(400)),
]

CONVERSATIONS: list[tuple[list[dict[str, Any]], bool]] = [
    ([{"role": "user", "content": "Hi"}], True),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}], True),
    (
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Name three colours."},
            {"role": "assistant", "content": "Red, green, blue."},
            {"role": "user", "content": "And two more?"},
            {"role": "assistant", "content": "Cyan and magenta."},
            {"role": "user", "content": "Thanks 🚀 — done.\n\nBye"},
        ],
        True,
    ),
    ([{"role": "user", "content": "No reply prompt"}, {"role": "assistant", "content": "ok"}], False),
    ([{"role": "user", "content": ""}], True),
    ([{"role": "user", "content": [{"type": "text", "text": "Only one text part"}]}], True),
]


async def _tokenize(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> list[int]:
    async with session.post(url + "/tokenize", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return (await resp.json())["tokens"]


@pytest.mark.vllm
@pytest.mark.parametrize("add_special_tokens", [True, False])
async def test_prompts_match_live_vllm(real_vllm, add_special_tokens: bool) -> None:
    tok = HFTokenizer(str(real_vllm.model_dir))
    async with aiohttp.ClientSession() as session:
        for prompt in PROMPTS:
            body = {"model": real_vllm.model, "prompt": prompt, "add_special_tokens": add_special_tokens}
            expected = await _tokenize(session, real_vllm.url, body)
            assert tok.encode(prompt, add_special_tokens=add_special_tokens) == expected, prompt


@pytest.mark.vllm
async def test_chats_match_live_vllm(real_vllm) -> None:
    tok = HFTokenizer(str(real_vllm.model_dir))
    async with aiohttp.ClientSession() as session:
        for messages, add_generation_prompt in CONVERSATIONS:
            body = {"model": real_vllm.model, "messages": messages}
            body["add_generation_prompt"] = add_generation_prompt
            expected = await _tokenize(session, real_vllm.url, body)
            assert tok.encode_chat(messages, add_generation_prompt) == expected, messages


@pytest.mark.vllm
async def test_multi_turn_history_is_a_token_prefix(real_vllm) -> None:
    """Each turn's prompt (without the generation prompt) starts with the previous turn's tokens."""
    tok = HFTokenizer(str(real_vllm.model_dir))
    history: list[dict[str, Any]] = [{"role": "system", "content": "Answer in one word."}]
    previous: list[int] = []
    async with aiohttp.ClientSession() as session:
        for turn in range(4):
            history.append({"role": "user", "content": f"Question number {turn}?"})
            history.append({"role": "assistant", "content": f"Answer{turn}."})
            body = {"model": real_vllm.model, "messages": history, "add_generation_prompt": False}
            real = await _tokenize(session, real_vllm.url, body)
            assert tok.encode_chat(history, add_generation_prompt=False) == real
            assert real[: len(previous)] == previous
            previous = real


@pytest.mark.vllm
async def test_multi_part_content_matches_live_vllm(real_vllm) -> None:
    tok = HFTokenizer(str(real_vllm.model_dir))
    parts = [{"type": "text", "text": "part one"}, {"type": "text", "text": "two"}]
    messages = [{"role": "user", "content": parts}]
    async with aiohttp.ClientSession() as session:
        expected = await _tokenize(session, real_vllm.url, {"model": real_vllm.model, "messages": messages})
    assert tok.encode_chat(messages) == expected

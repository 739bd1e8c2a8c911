"""LoRA block keys: a request naming an adapter and a KV event stored under that adapter's name get
the same keys, apart from the base model's and other adapters'."""

from __future__ import annotations

from prefixindex.events import BlockStored, EventBatch
from prefixindex.hashing import block_keys
from prefixindex.index import BlockIndex
from prefixindex.precise import PodEventTracker
from prefixindex.prompt import extract_prompt
from prefixindex.tokenizer import load_tokenizer

BS = 4
TOKENS = list(range(100, 112))  # 3 full blocks


def request_keys(model: str, salt: str | None = None) -> list[int]:
    body = {"model": model, "prompt": TOKENS, **({"cache_salt": salt} if salt else {})}
    prompt = extract_prompt(body, "/v1/completions", load_tokenizer(None), "base")
    return block_keys(prompt.tokens, BS, prompt.root)


def tracker() -> tuple[PodEventTracker, BlockIndex]:
    index = BlockIndex()
    index.add_pod("p")
    return PodEventTracker(index, "p", "base", lambda bs: bs == BS), index


def stored(hashes: list[int], parent: int | None, tokens: list[int], **lora: object) -> BlockStored:
    return BlockStored(hashes, parent, tokens, BS, medium="GPU", **lora)  # type: ignore[arg-type]


def test_an_adapters_request_keys_differ_from_the_base_models_and_other_adapters() -> None:
    base, a1, a2 = request_keys("base"), request_keys("a1"), request_keys("a2")
    assert len(base) == 3
    assert not set(base) & set(a1) and not set(a1) & set(a2)


def test_events_with_lora_name_match_the_adapters_requests() -> None:
    t, index = tracker()
    # the run split in two events: the second chains from the first's engine hash
    t.apply(EventBatch(0.0, [stored([11, 12], None, TOKENS[:8], lora_id=1, lora_name="a1",
                                    extra_keys=[("a1", "s"), ("a1",)])]))
    t.apply(EventBatch(0.0, [stored([13], 12, TOKENS[8:], lora_id=1, lora_name="a1",
                                    extra_keys=[("a1",)])]))
    assert t.keys() == request_keys("a1", salt="s")
    assert index.match(request_keys("a1", salt="s")) == {"p": 3}
    assert index.match(request_keys("a1")).get("p", 0) == 0  # the salt still separates tenants
    assert index.match(request_keys("base", salt="s")).get("p", 0) == 0


def test_base_model_events_match_base_requests_only() -> None:
    t, index = tracker()
    t.apply(EventBatch(0.0, [stored([21, 22, 23], None, TOKENS, lora_id=None, lora_name=None)]))
    assert index.match(request_keys("base")) == {"p": 3}
    assert index.match(request_keys("a1")).get("p", 0) == 0


def test_an_adapter_event_without_its_name_is_skipped() -> None:
    t, index = tracker()
    t.apply(EventBatch(0.0, [stored([31, 32, 33], None, TOKENS, lora_id=2, lora_name=None)]))
    assert t.counts["skipped_lora_unnamed"] == 1 and len(t) == 0
    assert index.match(request_keys("base")).get("p", 0) == 0  # not claimed for the base model

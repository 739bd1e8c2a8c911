"""The matrix's new workloads: Zipf-skewed prefixes, unique prompts, conversation-sampled trace replay."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import orjson
import pytest

from bench.workloads import (
    TraceSpec,
    UniqueSpec,
    ZipfPrefixSpec,
    infinite_cache_ceiling,
    trace,
    unique_prompts,
    zipf_prefix,
)
from bench.workloads.trace import DEFAULT_TRACE, TraceRecord, read_trace, trace_workload
from bench.workloads.trace_sample import conversation_key, sample_conversations
from bench.workloads.unique import prompt_lengths
from bench.workloads.zipf_prefix import apportion, zipf_exponent, zipf_shares
from prefixindex.tokenizer import WordTokenizer

TOK = WordTokenizer()
ZIPF = ZipfPrefixSpec(prefixes=20, requests=100, top_share=0.4, prefix_tokens=32, question_tokens=5,
                      output_tokens=3)


def _bodies(workload):
    return [orjson.dumps(r.body("m")) for r in workload.requests()]


def test_zipf_exponent_gives_the_top_share():
    for n, share in ((20, 0.4), (64, 0.4), (5, 0.9)):
        assert zipf_shares(n, share)[0] == pytest.approx(share)
    shares = zipf_shares(20, 0.4)
    assert sum(shares) == pytest.approx(1.0) and all(a > b for a, b in pairwise(shares))


def test_zipf_exponent_boundaries():
    assert zipf_exponent(10, 0.1) == pytest.approx(0.0, abs=1e-9)  # 1/n exactly: uniform
    with pytest.raises(ValueError):
        zipf_exponent(10, 0.09)
    with pytest.raises(ValueError):
        zipf_exponent(10, 1.0)
    assert zipf_exponent(1, 1.0) == 0.0


def test_apportion_is_exact_and_favours_the_larger_remainder():
    assert apportion(10, [0.55, 0.25, 0.2]) == [6, 2, 2]  # 5.5, 2.5, 2.0: the tie goes to the first
    assert apportion(7, [1 / 3] * 3) == [3, 2, 2]
    assert sum(apportion(101, zipf_shares(30, 0.4))) == 101


def test_zipf_workload_has_one_hot_prefix_and_a_tail():
    w = zipf_prefix(ZIPF)
    assert w.name == "zipf-prefix" and w.num_requests == 100
    by_prefix: dict[str, list[list[int]]] = defaultdict(list)
    for r in w.requests():
        ids = r.token_ids(TOK)
        assert len(ids) == 37 and r.max_tokens == 3
        by_prefix[r.tag.split("/")[0]].append(ids)
    counts = Counter({k: len(v) for k, v in by_prefix.items()})
    assert counts["z0"] == 40  # exactly top_share of the requests
    ranked = [counts.get(f"z{k}", 0) for k in range(20)]
    assert ranked == sorted(ranked, reverse=True) and ranked[-1] >= 0
    assert w.params["prefixes_used"] == sum(1 for c in ranked if c)
    for prompts in by_prefix.values():
        assert len({tuple(p[:32]) for p in prompts}) == 1  # one prefix per group
        assert len({tuple(p[32:]) for p in prompts}) == len(prompts)  # distinct questions
    assert len({tuple(v[0][:32]) for v in by_prefix.values()}) == len(by_prefix)  # prefixes differ


def test_zipf_workload_is_deterministic_shuffled_and_seeded():
    w = zipf_prefix(ZIPF)
    assert _bodies(w) == _bodies(zipf_prefix(ZIPF))
    assert _bodies(zipf_prefix(replace(ZIPF, seed=1))) != _bodies(w)
    tags = [r.tag for r in w.requests()]
    assert tags[:40] != [f"z0/q{j}" for j in range(40)]


def test_zipf_chat_and_token_prompts():
    chat = next(zipf_prefix(replace(ZIPF, api="chat")).requests())
    assert chat.api == "chat" and chat.messages[0]["role"] == "system"
    tokens = next(zipf_prefix(replace(ZIPF, prompt_format="tokens")).requests())
    assert isinstance(tokens.prompt, tuple) and len(tokens.prompt) == 37
    with pytest.raises(ValueError):
        zipf_prefix(replace(ZIPF, api="chat", prompt_format="tokens"))


UNIQUE = UniqueSpec(requests=60, prompt_tokens=40, length_spread=0.5, output_tokens=2)


def test_unique_prompts_share_nothing():
    w = unique_prompts(UNIQUE)
    prompts = [r.token_ids(TOK) for r in w.requests()]
    assert infinite_cache_ceiling(prompts, 16).hit_tokens == 0
    assert len({tuple(p[:4]) for p in prompts}) == 60  # unrelated from their first words on


def test_unique_prompt_lengths_stay_within_the_spread():
    lengths = [len(r.token_ids(TOK)) for r in unique_prompts(UNIQUE).requests()]
    assert lengths == prompt_lengths(UNIQUE)
    assert min(lengths) >= 20 and max(lengths) <= 60 and len(set(lengths)) > 10
    fixed = [len(r.token_ids(TOK)) for r in unique_prompts(replace(UNIQUE, length_spread=0.0)).requests()]
    assert set(fixed) == {40}
    with pytest.raises(ValueError):
        unique_prompts(replace(UNIQUE, length_spread=1.0))


def test_unique_prompts_are_deterministic_and_seeded():
    assert _bodies(unique_prompts(UNIQUE)) == _bodies(unique_prompts(UNIQUE))
    assert _bodies(unique_prompts(replace(UNIQUE, seed=2))) != _bodies(unique_prompts(UNIQUE))


def _rec(t: float, *ids: int) -> TraceRecord:
    return TraceRecord(t, 512 * len(ids), 10, ids)


def test_conversation_sampling_keeps_whole_conversations_in_order():
    records = []
    for turn in range(3):  # 10 conversations of 3 turns, interleaved in time
        for c in range(10):
            records.append(_rec(1000.0 * (turn * 10 + c), 0, 100 + c, *range(1000 * c, 1000 * c + turn + 1)))
    kept = sample_conversations(records, 9, seed=1)
    assert len(kept) == 9
    by_conv = Counter(conversation_key(r) for r in kept)
    assert set(by_conv.values()) == {3}  # three whole conversations
    assert [r.timestamp_ms for r in kept] == sorted(r.timestamp_ms for r in kept)
    assert kept == sample_conversations(records, 9, seed=1)
    assert kept != sample_conversations(records, 9, seed=2)
    assert len(sample_conversations(records, 10, seed=1)) == 9  # no conversation of one turn to top up
    with pytest.raises(ValueError):
        sample_conversations(records, 0)


def test_a_single_block_prompt_is_its_own_conversation():
    assert conversation_key(_rec(0, 7)) == (7,) and conversation_key(_rec(0, 0, 9, 10)) == (9,)


@pytest.mark.skipif(not Path(DEFAULT_TRACE).exists(), reason="the Mooncake trace is not in this checkout")
def test_sampling_the_real_trace_keeps_far_more_sharing_than_its_first_records():
    def shared(records):  # fraction of hash ids seen before (block-level ceiling of the trace)
        seen: set[int] = set()
        hits = total = 0
        for r in records:
            for h in r.hash_ids:
                hits += h in seen
                total += 1
                seen.add(h)
        return hits / total

    records = read_trace(DEFAULT_TRACE, first=3000)
    assert shared(sample_conversations(records, 120)) > 3 * shared(records[:120])


def test_trace_workload_replays_given_records_as_trace_does(tmp_path: Path):
    path = tmp_path / "t.jsonl"
    lines = [{"timestamp": 1000 * i, "input_length": 40, "output_length": 8, "hash_ids": [0, 10 + i % 2]}
             for i in range(4)]
    path.write_bytes(b"\n".join(orjson.dumps(x) for x in lines))
    spec = TraceSpec(path=str(path), block_tokens=32)
    records = read_trace(path)
    assert _bodies(trace_workload(records, spec)) == _bodies(trace(spec))
    sampled = trace_workload(records[1::2], spec)
    assert [s.at for s in sampled.sessions] == [0.0, 2.0] and sampled.params["records"] == 2
    with pytest.raises(ValueError):
        trace_workload([], spec)

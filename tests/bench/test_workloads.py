"""Workload generators: deterministic with a seed, prefix sharing as specified, exact token counts."""

from __future__ import annotations

import itertools
from dataclasses import replace

import orjson
import pytest

from bench.workloads import (
    ClosedLoop,
    MultiTurnSpec,
    OpenLoop,
    SharedPrefixSpec,
    TraceSpec,
    infinite_cache_ceiling,
    multi_turn,
    scale_to_fleet,
    shared_prefix,
    start_times,
    trace,
)
from bench.workloads.shared_prefix import LLM_D, SGLANG
from prefixindex.tokenizer import WordTokenizer

TOK = WordTokenizer()
SPEC = SharedPrefixSpec(groups=5, prompts_per_group=4, system_tokens=40, question_tokens=7, output_tokens=3)


def _bodies(workload):
    return [orjson.dumps(r.body("m")) for r in workload.requests()]


def test_shared_prefix_is_deterministic_and_seed_dependent():
    assert _bodies(shared_prefix(SPEC)) == _bodies(shared_prefix(SPEC))
    other = shared_prefix(replace(SPEC, seed=1))
    assert _bodies(other) != _bodies(shared_prefix(SPEC))


def test_shared_prefix_groups_share_exactly_the_system_prompt():
    w = shared_prefix(SPEC)
    assert w.num_requests == 20
    by_group: dict[str, list[list[int]]] = {}
    for r in w.requests():
        ids = r.token_ids(TOK)
        assert len(ids) == 47  # S + Q tokens exactly under the word tokenizer
        assert r.max_tokens == 3
        by_group.setdefault(r.tag.split("/")[0], []).append(ids)
    assert len(by_group) == 5 and all(len(v) == 4 for v in by_group.values())
    systems = {tuple(v[0][:40]) for v in by_group.values()}
    assert len(systems) == 5  # groups differ
    for prompts in by_group.values():
        assert len({tuple(p[:40]) for p in prompts}) == 1  # same system prompt in a group
        assert len({tuple(p[40:]) for p in prompts}) == 4  # distinct questions


def test_shared_prefix_is_shuffled():
    tags = [r.tag for r in shared_prefix(SPEC).requests()]
    assert tags != sorted(tags, key=lambda t: tuple(int(x[1:]) for x in t.split("/")))


def test_shared_prefix_chat_and_token_prompts():
    chat = shared_prefix(replace(SPEC, api="chat"))
    r = next(chat.requests())
    assert r.path == "/v1/chat/completions"
    assert [m["role"] for m in r.body("m")["messages"]] == ["system", "user"]
    tokens = shared_prefix(replace(SPEC, prompt_format="tokens"))
    text = shared_prefix(SPEC)
    for a, b in zip(tokens.requests(), text.requests(), strict=True):
        assert a.body("m")["prompt"] == TOK.encode(b.body("m")["prompt"])
    with pytest.raises(ValueError):
        shared_prefix(replace(SPEC, api="chat", prompt_format="tokens"))


def test_presets_and_scaling_to_fleet():
    assert (LLM_D.groups, LLM_D.prompts_per_group, LLM_D.system_tokens) == (150, 5, 6000)
    assert (SGLANG.groups, SGLANG.prompts_per_group, SGLANG.system_tokens) == (64, 16, 2048)
    fleet_tokens = 4 * 1000 * 16
    scaled = scale_to_fleet(LLM_D, fleet_tokens, 0.73)
    assert scaled.groups == 150
    assert abs(scaled.prefix_tokens / fleet_tokens - 0.73) < 0.01
    assert scaled.question_tokens == pytest.approx(scaled.system_tokens / 5, abs=1)


def test_ceiling_of_shared_prefix_counts_only_repeated_full_blocks():
    spec = SharedPrefixSpec(groups=3, prompts_per_group=4, system_tokens=32, question_tokens=8,
                            output_tokens=1)
    c = infinite_cache_ceiling((r.token_ids(TOK) for r in shared_prefix(spec).requests()), 16)
    # each group: first prompt misses its 2 system blocks, the 3 others hit them; questions never repeat
    assert c.prompt_tokens == 12 * 40
    assert c.hit_tokens == 3 * 3 * 32
    assert c.hit_rate == pytest.approx(288 / 480)


def test_ceiling_is_a_chain_not_a_bag_of_blocks():
    a = [1] * 16 + [2] * 16
    b = [3] * 16 + [2] * 16  # same second block after a different first block: a miss
    assert infinite_cache_ceiling([a, b], 16).hit_tokens == 0
    assert infinite_cache_ceiling([a, a[:20]], 16).hit_tokens == 16


def test_multi_turn_history_grows_and_extends_the_previous_turn():
    spec = MultiTurnSpec(conversations=3, turns=3, system_tokens=20, user_tokens=5, output_tokens=4,
                         think_time=0.5)
    w = multi_turn(spec)
    assert w.num_requests == 9 and len(w.sessions) == 3
    for s in w.sessions:
        ids = [r.token_ids(TOK) for r in s.requests]
        assert len(ids[0]) < len(ids[1]) < len(ids[2])
        # turn t+1's prompt starts with turn t's messages (minus the generation prompt)
        prev = [dict(m) for m in s.requests[0].messages]
        assert [dict(m) for m in s.requests[1].messages][: len(prev)] == prev
        assert len(s.think_times) == 2 and all(t >= 0 for t in s.think_times)
    systems = {s.requests[0].messages[0]["content"] for s in w.sessions}
    assert len(systems) == 1  # shared system prompt
    assert _bodies(multi_turn(spec)) == _bodies(w)


def _write_trace(path, rows):
    path.write_bytes(b"\n".join(orjson.dumps(r) for r in rows) + b"\n")


def test_trace_equal_hash_ids_give_equal_content_and_lengths_are_cut(tmp_path):
    p = tmp_path / "t.jsonl"
    _write_trace(p, [
        {"timestamp": 0, "input_length": 1000, "output_length": 10, "hash_ids": [0, 1]},
        {"timestamp": 500, "input_length": 700, "output_length": 20, "hash_ids": [0, 2]},
        {"timestamp": 2000, "input_length": 300, "output_length": 5, "hash_ids": [3]},
    ])
    w = trace(TraceSpec(path=str(p)))
    ids = [r.token_ids(TOK) for r in w.requests()]
    assert [len(x) for x in ids] == [1000, 700, 300]
    assert ids[0][:512] == ids[1][:512] and ids[0][512:700] != ids[1][512:700]
    assert [r.max_tokens for r in w.requests()] == [10, 20, 5]
    assert start_times(w, OpenLoop(None, speed=2.0)) == [0.0, 0.25, 1.0]
    small = trace(TraceSpec(path=str(p), block_tokens=32))
    assert [len(r.token_ids(TOK)) for r in small.requests()] == [63, 44, 19]
    assert [r.max_tokens for r in small.requests()] == [1, 1, 1]
    window = trace(TraceSpec(path=str(p), start_s=0.4, first=1))
    assert window.num_requests == 1 and next(window.requests()).max_tokens == 20
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        trace(TraceSpec(path=str(bad)))


def test_real_mooncake_trace_head_ceiling_matches_its_hash_ids():
    spec = TraceSpec(first=60)
    w = trace(spec)
    c = infinite_cache_ceiling((r.token_ids(TOK) for r in w.requests()), 512)
    # independent count from the trace's own ids: a full block hits when its chain prefix was seen
    from bench.workloads.trace import read_trace

    seen, hits = set(), 0
    for rec in read_trace(spec.path, first=60):
        for i in range(rec.input_length // 512):
            key = rec.hash_ids[: i + 1]
            hits += 512 if key in seen else 0
            seen.add(key)
    assert c.hit_tokens == hits and c.hit_tokens > 0


def test_poisson_arrivals_are_seeded_and_at_the_rate():
    w = shared_prefix(SharedPrefixSpec(groups=50, prompts_per_group=20, system_tokens=2, question_tokens=1,
                                       output_tokens=1))
    a = start_times(w, OpenLoop(rate=10.0, seed=3))
    assert a == start_times(w, OpenLoop(rate=10.0, seed=3))
    assert a != start_times(w, OpenLoop(rate=10.0, seed=4))
    assert a[0] == 0.0 and all(x <= y for x, y in itertools.pairwise(a))
    assert 999 / a[-1] == pytest.approx(10.0, rel=0.15)
    with pytest.raises(ValueError):
        start_times(w, OpenLoop(rate=None))
    with pytest.raises(ValueError):
        ClosedLoop(0)

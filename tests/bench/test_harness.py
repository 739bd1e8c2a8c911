"""Harness pieces that need no fleet: router specs and command lines, warm-up, CPU-starvation notes."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.loadgen.harness import starvation_note, warmup_workload
from bench.loadgen.routers import RouterProcess, RouterSpec
from bench.loadgen.runner import Overhead
from bench.loadgen.stats import Dist
from bench.report.model import RunRecord
from prefixindex.tokenizer import WordTokenizer

PODS = ["http://127.0.0.1:1", "http://127.0.0.1:2"]


def test_router_spec_names_and_kv_event_wiring(tmp_path: Path):
    precise = RouterSpec.parse("cache_aware/precise")
    assert (precise.policy, precise.index, precise.name, precise.needs_kv_events) == (
        "cache_aware", "precise", "cache_aware/precise", True)
    assert not RouterSpec.parse("round_robin").needs_kv_events
    with pytest.raises(ValueError):
        RouterSpec.parse("cache_aware/exact")
    argv = RouterProcess(precise, PODS, "m", tmp_path, ["tcp://127.0.0.1:7", "tcp://127.0.0.1:8"]).process.argv
    assert argv[argv.index("--policy") + 1] == "cache_aware" and argv[argv.index("--index") + 1] == "precise"
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--backend"] == PODS
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--kv-events"] == ["tcp://127.0.0.1:7",
                                                                              "tcp://127.0.0.1:8"]
    assert argv[argv.index("--port") + 1] == "0"
    with pytest.raises(ValueError, match="KV-event"):
        RouterProcess(precise, PODS, "m", tmp_path, [None, None])


def test_sglang_baseline_command_line(tmp_path: Path):
    argv = RouterProcess(RouterSpec("sglang_router", python="/x/python"), PODS, "m", tmp_path).process.argv
    assert argv[:3] == ["/x/python", "-m", "sglang_router.launch_router"]
    assert argv[argv.index("--policy") + 1] == "cache_aware" and argv[-2:] == PODS


def test_warmup_prompts_are_unique_and_shorter_than_a_block():
    tok = WordTokenizer()
    a = [r.token_ids(tok) for r in warmup_workload(8, 0, run=1).requests()]
    b = [r.token_ids(tok) for r in warmup_workload(8, 0, run=2).requests()]
    assert all(len(x) < 16 for x in a) and len({tuple(x) for x in a + b}) == 16


def test_starvation_note_only_when_arrivals_ran_late():
    def record(lag_p99: float) -> RunRecord:
        lag = Dist(10, 0.0, 0.0, 0.0, lag_p99, 1.0)
        return RunRecord("rr", "5/s", 5.0, overhead=Overhead(1.0, 2.0, 0.1, lag))

    assert starvation_note(record(0.01)) is None
    note = starvation_note(record(0.5))
    assert note is not None and "500 ms late" in note and "2.0 ms CPU" in note

"""Load generator against a real SSE server on 127.0.0.1: streaming measurements, loops, errors."""

from __future__ import annotations

import asyncio
import itertools
import sys

import pytest

from bench.loadgen.runner import run_workload
from bench.workloads import ClosedLoop, MultiTurnSpec, OpenLoop, SharedPrefixSpec, multi_turn, shared_prefix
from bench.workloads.base import BenchRequest, Session, Workload

SPEC = SharedPrefixSpec(groups=3, prompts_per_group=4, system_tokens=30, question_tokens=5, output_tokens=4)


async def test_open_loop_streams_measures_and_sends_the_workload(fake_server):
    w = shared_prefix(SPEC)
    seen = []
    out = await run_workload(fake_server.url, "m", w, OpenLoop(rate=200.0, seed=1), progress=seen.append)
    assert len(out.results) == 12 == len(seen)
    assert all(r.ok for r in out.results)
    sent = [b["prompt"] for b in fake_server.bodies]
    assert sorted(sent) == sorted(r.body("m")["prompt"] for r in w.requests())
    body = fake_server.bodies[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    for r in out.results:
        assert r.ttft is not None and r.e2e is not None and r.ttft <= r.e2e
        assert len(r.itl) == 3  # 4 text chunks, 3 gaps
        assert (r.prompt_tokens, r.output_tokens, r.cached_tokens) == (35, 4, 16)
        assert r.endpoint == "pod-a"
        assert r.started >= r.scheduled - 1e-6
    assert out.overhead.cpu_s > 0 and out.overhead.lag.n == 12


async def test_chat_ttft_waits_for_text_not_the_role_chunk(fake_server):
    fake_server.delay_s = 0.05
    req = BenchRequest("c", "chat", 2, messages=({"role": "user", "content": "hi there"},))
    out = await run_workload(fake_server.url, "m", Workload("w", [Session((req,))]), ClosedLoop(1))
    (r,) = out.results
    assert r.ok and r.ttft >= 0.05 and r.output_tokens == 2


async def test_tokens_without_text_are_an_answer_without_a_ttft_sample_and_no_tokens_an_error(fake_server):
    fake_server.text = ""  # a random-weight model's tokens can detokenize to nothing
    out = await run_workload(fake_server.url, "m", shared_prefix(SPEC).head(1), ClosedLoop(1))
    (r,) = out.results
    assert r.ok and r.ttft is None and r.output_tokens == 4
    fake_server.usage = False  # nothing says a token was generated
    out = await run_workload(fake_server.url, "m", shared_prefix(SPEC).head(1), ClosedLoop(1))
    (r,) = out.results
    assert not r.ok and r.error == "stream ended without any generated text"


async def test_closed_loop_keeps_exactly_n_users_busy(fake_server):
    fake_server.delay_s = 0.02
    out = await run_workload(fake_server.url, "m", shared_prefix(SPEC), ClosedLoop(3))
    assert len(out.results) == 12 and fake_server.max_concurrent == 3


async def test_multi_turn_turns_are_sequential_with_think_time(fake_server):
    spec = MultiTurnSpec(conversations=2, turns=3, system_tokens=8, user_tokens=3, output_tokens=2,
                         think_time=0.01)
    out = await run_workload(fake_server.url, "m", multi_turn(spec), OpenLoop(rate=100.0))
    by_conv: dict[str, list] = {}
    for r in out.results:
        by_conv.setdefault(r.tag.split("/")[0], []).append(r)
    for turns in by_conv.values():
        assert [r.tag.split("/")[1] for r in turns] == ["t0", "t1", "t2"]  # completion order = turn order
        for a, b in itertools.pairwise(turns):
            assert b.started >= a.started + a.e2e  # the next turn starts after the reply ended


async def test_errors_are_recorded_not_raised(fake_server):
    out = await run_workload(fake_server.url, "other", shared_prefix(SPEC).head(2), ClosedLoop(2))
    assert [r.status for r in out.results] == [404, 404]
    assert all(not r.ok and "does not exist" in r.error for r in out.results)
    dead = await run_workload("http://127.0.0.1:9", "m", shared_prefix(SPEC).head(1), ClosedLoop(1),
                              request_timeout_s=5)
    assert not dead.results[0].ok and dead.results[0].status == 0


@pytest.mark.parametrize("users", [1, 4])
async def test_loadgen_overhead_is_small_per_request(fake_server, users):
    out = await run_workload(fake_server.url, "m", shared_prefix(SPEC), ClosedLoop(users))
    # the fake server shares this process, so this bounds loadgen + server; still far below 50 ms
    assert out.overhead.cpu_ms_per_request < 50


async def test_overhead_benchmark_reports_cpu_and_lag():
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.loadgen.overhead", "--requests", "40", "--users", "4", "--rate", "50",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-1000:]
    lines = out.decode().splitlines()
    assert len(lines) == 2 and all("40/40 ok" in x and "ms CPU/request" in x for x in lines)

"""The access log (gateway/access_log.py): one line per request with its routing, timing and tokens,
refused requests included up to a budget per interval, written by a thread that a blocked stdout
cannot turn into a blocked event loop; `kvgate serve` flags and the gateway's own log format."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from gateway_fakes import pool_config
from helpers import eventually
from prometheus_client import CollectorRegistry

from bench.sim.fleet import SimFleet
from gateway.access_log import REFUSAL_KEY, AccessLog, AnswerTally, setup_logging
from gateway.app import ACCESS_LOG
from gateway.config import Logs, config_from_mapping
from gateway.state import PROXY

FAST = {"model": "m", "itl_ms": 1.0, "itl_ms_per_seq": 0.0, "prefill_tps": 1e7, "seed": 1}
PROMPT = "The quick brown fox jumps over the lazy dog " * 12


class Lines:
    """A sink the writer thread writes to; `records()` are the JSON lines so far."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.data = b""

    def write(self, data: bytes) -> int:
        with self._lock:
            self.data += data
        return len(data)

    def flush(self) -> None:
        pass

    def lines(self) -> list[bytes]:
        with self._lock:
            return self.data.splitlines()

    def records(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.lines()]


def capture(lines: Lines):
    def prepare(app: web.Application) -> None:
        app[ACCESS_LOG].sink = lambda: lines

    return prepare


@pytest.fixture
async def fleet() -> AsyncIterator[SimFleet]:
    async with SimFleet(2, **FAST) as f:
        yield f


def skipped(registry: CollectorRegistry, cause: str) -> float:
    return registry.get_sample_value("kvgate_access_log_skipped_total", {"cause": cause}) or 0.0


async def test_a_streamed_request_logs_routing_timing_and_the_pods_usage(fleet, start_gateway, client):
    lines = Lines()
    gw = await start_gateway(pool_config(fleet.urls, policy="cache_aware"), capture(lines))
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 7, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    headers = {"X-Request-Id": "rid-stream", "x-kvgate-tenant": "team a"}
    async with client.post(gw.url + "/v1/completions", json=body, headers=headers) as r:
        assert r.status == 200
        pod = r.headers["x-kvgate-endpoint"]
        cached = int(r.headers["x-kvgate-cached-tokens"])
        events = [orjson.loads(e[6:]) for e in (await r.read()).split(b"\n\n") if e.startswith(b"data: {")]
    usage = events[-1]["usage"]
    await eventually(lambda: len(lines.lines()) == 1, what="the request's access-log line")
    (line,) = lines.records()
    assert line["request_id"] == "rid-stream" and line["tenant"] == "team a"
    assert (line["method"], line["path"], line["status"]) == ("POST", "/v1/completions", 200)
    assert line["reason"] == ""
    assert (line["model"], line["pool"], line["pod"], line["prefill_pod"]) == ("m", "m", pod, "")
    assert line["policy"] == "cache_aware" and line["decision"]
    assert line["cached_tokens"] == cached
    assert line["prompt_tokens"] == usage["prompt_tokens"]
    assert line["output_tokens"] == usage["completion_tokens"]
    assert line["usage"] == "pod" and line["output_tokens"] == 7
    assert 0 < line["ttft_ms"] <= line["latency_ms"]
    assert line["retries"] == 0 and line["client"] == "127.0.0.1" and line["trace_id"] == ""
    assert line["ts"].endswith("Z")


async def test_a_non_streamed_answer_logs_the_usage_of_its_body(fleet, start_gateway, client):
    lines = Lines()
    gw = await start_gateway(pool_config(fleet.urls), capture(lines))
    body = {"model": "m", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 5}
    async with client.post(gw.url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200
        usage = (await r.json())["usage"]
        request_id = r.headers["X-Request-Id"]
    await eventually(lambda: len(lines.lines()) == 1, what="the access-log line")
    (line,) = lines.records()
    assert line["request_id"] == request_id and line["policy"] == "round_robin"
    assert (line["prompt_tokens"], line["output_tokens"], line["usage"]) == (
        usage["prompt_tokens"], usage["completion_tokens"], "pod"
    )


async def test_a_stream_without_usage_is_estimated_from_its_events(fleet, start_gateway, client):
    lines = Lines()
    gw = await start_gateway(pool_config(fleet.urls, policy="cache_aware"), capture(lines))
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 6, "stream": True}
    async with client.post(gw.url + "/v1/completions", json=body) as r:
        raw = await r.read()
    assert b'"usage":{' not in raw  # nothing for the tail search to find
    await eventually(lambda: len(lines.lines()) == 1, what="the access-log line")
    (line,) = lines.records()
    assert line["usage"] == "estimate"
    assert line["output_tokens"] == raw.count(b"data: {")
    assert line["prompt_tokens"] > 0  # the gateway's own count (cache_aware tokenized the prompt)


async def test_a_retried_request_logs_its_retries(fake_pods, start_gateway, client):
    bad, good = await fake_pods(2)
    bad.status = 503
    lines = Lines()
    gw = await start_gateway(pool_config([bad.url, good.url], retries={"max_retries": 1}), capture(lines))
    for _ in range(2):  # round robin: one of the two starts on the 503 pod
        async with client.post(gw.url + "/v1/completions", json={"model": "m", "prompt": "hi"}) as r:
            assert r.status == 200
    await eventually(lambda: len(lines.lines()) == 2, what="two access-log lines")
    records = lines.records()
    assert sorted(r["retries"] for r in records) == [0, 1]
    assert {r["pod"] for r in records} == {good.url}


async def test_refused_requests_are_logged_with_their_reason_up_to_the_budget(fake_pods, start_gateway,
                                                                              client):
    (pod,) = await fake_pods(1)
    lines = Lines()
    config = pool_config([pod.url], logs={"access_refused_per_interval": 3, "rejected_interval": 3600})
    gw = await start_gateway(config, capture(lines))
    for _ in range(4):
        async with client.post(gw.url + "/v1/completions", json={"model": "nope", "prompt": "x"}) as r:
            assert r.status == 404
    async with client.post(gw.url + "/v1/completions", data=b"{not json") as r:
        assert r.status == 400
    async with client.post(gw.url + "/v1/completions", json={"model": "m", "prompt": "x"}) as r:
        assert r.status == 200  # answered requests are never held to the budget
    await eventually(lambda: len(lines.lines()) == 4, what="three refused lines and the answered one")
    records = lines.records()
    assert [(r["status"], r["reason"], r["pod"]) for r in records[:3]] == [(404, "unknown_model", "")] * 3
    assert (records[3]["status"], records[3]["reason"], records[3]["pod"]) == (200, "", pod.url)
    assert skipped(gw.registry, "refused_over_budget") == 2


def _refused(log: AccessLog, n: int) -> None:
    for _ in range(n):
        request = make_mocked_request("GET", "/admin")
        request[REFUSAL_KEY] = "unknown_route"
        log.log(request, None, 404, 0.0, "rid")


def test_the_refused_budget_resets_when_the_interval_has_passed_exactly() -> None:
    now = [100.0]
    registry = CollectorRegistry()
    log = AccessLog(Logs(access_refused_per_interval=2, rejected_interval=10.0), registry,
                    clock=lambda: now[0])
    _refused(log, 2)  # the budget exactly met: both logged
    assert log._queue.qsize() == 2 and skipped(registry, "refused_over_budget") == 0
    _refused(log, 1)
    now[0] = 109.999
    _refused(log, 1)
    assert log._queue.qsize() == 2 and skipped(registry, "refused_over_budget") == 2
    now[0] = 110.0  # one interval after the window opened: a new budget
    _refused(log, 3)
    assert log._queue.qsize() == 4 and skipped(registry, "refused_over_budget") == 3


def test_a_budget_of_zero_logs_no_refused_request() -> None:
    registry = CollectorRegistry()
    log = AccessLog(Logs(access_refused_per_interval=0), registry)
    _refused(log, 3)
    assert log._queue.qsize() == 0 and skipped(registry, "refused_over_budget") == 3


def test_a_blocked_sink_drops_lines_instead_of_blocking_the_caller() -> None:
    release = threading.Event()
    written = Lines()

    class Blocked(Lines):
        def write(self, data: bytes) -> int:
            release.wait(30)
            return written.write(data)

    registry = CollectorRegistry()
    log = AccessLog(Logs(access_queue=2), registry)
    log.sink = Blocked
    log.start()
    for i in range(10):  # returns at once though the writer is stuck: lines beyond the queue drop
        log.log(make_mocked_request("GET", "/v1/models"), None, 200, 0.0, f"rid-{i}")
    dropped = skipped(registry, "queue_full")
    assert dropped >= 10 - 2 - 2  # at most 2 queued and 2 taken by the writer before it blocked
    release.set()
    log.close()
    assert len(written.lines()) + dropped == 10


def test_text_format_is_key_value_pairs_with_quoted_values() -> None:
    log = AccessLog(Logs(format="text"), CollectorRegistry())
    request = make_mocked_request("GET", "/v1/models", headers={"x-kvgate-tenant": 'a "b" c'})
    log.log(request, None, 200, 0.0, "rid-1")
    line = log.format(log._queue.get_nowait()).decode()
    assert line.endswith("\n") and "\n" not in line[:-1]
    ts, word, rest = line.split(" ", 2)
    assert ts.endswith("+00:00") and word == "access"
    assert rest.startswith("request_id=rid-1 method=GET path=/v1/models status=200 ")
    assert 'tenant="a \\"b\\" c"' in rest
    assert "pod=" not in rest  # empty and unknown fields are left out


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([b'{"choices":[],"usage":{"prompt_tokens":12,"total_tokens":15,"completion_tokens":3}}'], (12, 3)),
        ([b'data: {"usage":{"prompt_tokens":4', b',"completion_tokens":9}}\n\ndata: [DONE]\n\n'], (4, 9)),
        ([b'data: {"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n',
          b'data: {"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\ndata: [DONE]\n\n'], (1, 2)),
        ([b'{"choices":[{"text":"hi"}],"usage":null}'], None),
        ([b'{"choices":[{"text":"usage"}]}'], None),
    ],
    ids=["body", "split", "last-wins", "null", "none"],
)
def test_usage_is_read_from_the_answers_tail(chunks: list[bytes], expected: tuple[int, int] | None) -> None:
    tally = AnswerTally(streamed=True)
    for chunk in [b"x" * 10_000, *chunks]:  # a long answer before: only the tail is searched
        tally.add(chunk)
    assert tally.usage() == expected


def test_stream_events_are_counted_without_done() -> None:
    tally = AnswerTally(streamed=True)
    for chunk in (b'data: {"i":0}\n\ndata: {"i":1}\n\n', b'data: {"i":2}\n\n', b"data: [DONE]\n\n"):
        tally.add(chunk)
    assert tally.events == 3
    plain = AnswerTally(streamed=False)
    plain.add(b'data: {"i":0}')
    assert plain.events == 0


async def test_client_leaving_mid_stream_is_logged_499(fake_pods, start_gateway):
    (pod,) = await fake_pods(1)
    pod.chunks, pod.chunk_delay = 50, 0.05
    lines = Lines()
    gw = await start_gateway(pool_config([pod.url]), capture(lines))
    async with aiohttp.ClientSession() as session:
        body = {"model": "m", "prompt": "x", "stream": True}
        resp = await session.post(gw.url + "/v1/completions", json=body)
        await resp.content.readany()
        resp.close()
    await eventually(lambda: len(lines.lines()) == 1, what="the line of the abandoned stream")
    (line,) = lines.records()
    assert line["status"] == 499 and line["pod"] == pod.url


async def test_access_log_off_builds_no_writer_and_tallies_nothing(fake_pods, start_gateway, client):
    (pod,) = await fake_pods(1)
    gw = await start_gateway(pool_config([pod.url], logs={"access": False}))
    assert ACCESS_LOG not in gw.app
    assert gw.app[PROXY].tally_answers is False
    async with client.post(gw.url + "/v1/completions", json={"model": "m", "prompt": "x"}) as r:
        assert r.status == 200


def test_logs_keys_are_checked() -> None:
    pools = {"m": {"endpoints": [{"url": "http://a"}]}}
    with pytest.raises(ValueError, match=r"logs.format: 'xml' is not one of \['json', 'text'\]"):
        config_from_mapping({"pools": pools, "logs": {"format": "xml"}})
    with pytest.raises(ValueError, match="access_queue"):
        config_from_mapping({"pools": pools, "logs": {"access_queue": 0}})


def test_the_gateways_own_log_in_json(capsys) -> None:
    import io
    import logging

    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    listener = setup_logging("INFO", "json", stream)
    try:
        logging.getLogger("kvgate.test").warning("pod %s ejected", "p0")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("kvgate.test").exception("a bug")
    finally:
        listener.stop()
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    first, second = (orjson.loads(line) for line in stream.getvalue().splitlines())
    assert {k: first[k] for k in ("level", "logger", "message")} == {
        "level": "WARNING", "logger": "kvgate.test", "message": "pod p0 ejected"
    }
    assert second["message"] == "a bug" and "RuntimeError: boom" in second["exc"]


async def _serve(pod_url: str, *flags: str) -> asyncio.subprocess.Process:
    args = [sys.executable, "-m", "gateway.cli", "serve", "--port", "0", "--model", "m",
            "--backend", pod_url, "--health-interval", "0.5", *flags]  # fmt: skip
    return await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flags", [["--log-format", "json"], ["--no-access-log", "--log-format", "text"]])
async def test_kvgate_serve_writes_access_lines_to_stdout_and_its_log_to_stderr(fake_pods, flags):
    (pod,) = await fake_pods(1)
    proc = await _serve(pod.url, *flags)
    assert proc.stdout is not None and proc.stderr is not None
    ready = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert ready.startswith(b"KVGATE_SERVE_READY "), ready
    url = orjson.loads(ready.split(b" ", 1)[1])["url"]
    body, headers = {"model": "m", "prompt": "x"}, {"X-Request-Id": "rid-cli"}
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/completions", json=body, headers=headers) as r:
        assert r.status == 200
    proc.send_signal(signal.SIGTERM)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    log_lines = err.decode().splitlines()
    assert any("kvgate listening on" in line for line in log_lines)
    if "--no-access-log" in flags:
        assert out == b""
        assert not log_lines[0].startswith("{")
        return
    (line,) = [orjson.loads(x) for x in out.splitlines()]
    assert line["request_id"] == "rid-cli" and line["status"] == 200 and line["pod"] == pod.url
    assert all(orjson.loads(x)["level"] for x in log_lines)  # every stderr line is JSON


def test_access_log_flag_from_the_environment() -> None:
    import argparse

    from gateway.serve_cli import add_arguments

    for value, expected in (("false", False), ("0", False), ("true", True), ("on", True), ("", None)):
        parser = argparse.ArgumentParser()
        add_arguments(parser, {"KVGATE_ACCESS_LOG": value})
        assert parser.parse_args([]).access_log is expected, value
    parser = argparse.ArgumentParser()
    add_arguments(parser, {"KVGATE_ACCESS_LOG": "false", "KVGATE_LOG_FORMAT": "text"})
    args = parser.parse_args(["--access-log"])
    assert args.access_log is True and args.log_format == "text"


@pytest.mark.timeout(90)
async def test_kvgate_serve_exits_on_sigterm_though_nobody_reads_its_stdout(fake_pods):
    import subprocess

    (pod,) = await fake_pods(1)
    args = [sys.executable, "-m", "gateway.cli", "serve", "--port", "0", "--model", "m", "--backend", pod.url,
            "--log-level", "WARNING"]  # fmt: skip
    # not asyncio's subprocess: its wait() also waits for the pipes, which a full one never closes
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # noqa: ASYNC220
    try:
        assert proc.stdout is not None
        ready = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        url = orjson.loads(ready.split(b" ", 1)[1])["url"]
        body, headers = {"model": "m", "prompt": "x"}, {"X-Request-Id": "r" * 100}
        async with aiohttp.ClientSession() as s:
            for _ in range(400):  # ~400 lines: more than a pipe holds (64 KiB), so the writer blocks
                async with s.post(url + "/v1/completions", json=body, headers=headers) as r:
                    assert r.status == 200  # answered while the log writer is stuck
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()

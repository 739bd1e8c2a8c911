"""Locust driving kvgate's benchmark workloads, with TTFT recorded as its own metric.

    locust -f bench/locustfile.py --headless -u 16 -r 16 --run-time 60s --host http://127.0.0.1:8080 \\
        --kvgate-workload shared-prefix --kvgate-groups 16 --kvgate-prompts-per-group 12

Each locust user is a closed-loop user: it takes the next session of the workload (one request, or a
whole conversation with its think times) and runs it, streaming. Besides locust's own row for the
HTTP request (time to response headers), every request adds a `TTFT` row (time to the first generated
text) and an `E2E` row (time to the end of the stream), so locust's percentiles cover what matters for
LLM serving. With `--kvgate-once` the test stops when the workload is exhausted; otherwise it cycles.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import gevent
import orjson
from locust import HttpUser, constant, events, task
from locust.env import Environment

from bench.loadgen.client import chunk_text
from bench.presets import QUICK
from bench.workloads import MultiTurnSpec, SharedPrefixSpec, TraceSpec, multi_turn, shared_prefix, trace
from bench.workloads.base import Session, Workload
from bench.workloads.trace import DEFAULT_TRACE


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    group = parser.add_argument_group("kvgate workload (shared-prefix defaults: the quick preset's)")
    d = QUICK.workload
    group.add_argument("--kvgate-workload", choices=["shared-prefix", "multi-turn", "trace"],
                       default="shared-prefix")
    group.add_argument("--kvgate-model", default="sim-model")
    group.add_argument("--kvgate-api", choices=["completions", "chat"], default=None)
    group.add_argument("--kvgate-seed", type=int, default=0)
    group.add_argument("--kvgate-groups", type=int, default=d.groups)
    group.add_argument("--kvgate-prompts-per-group", type=int, default=d.prompts_per_group)
    group.add_argument("--kvgate-system-tokens", type=int, default=d.system_tokens)
    group.add_argument("--kvgate-question-tokens", type=int, default=d.question_tokens)
    group.add_argument("--kvgate-output-tokens", type=int, default=d.output_tokens)
    group.add_argument("--kvgate-conversations", type=int, default=32)
    group.add_argument("--kvgate-turns", type=int, default=4)
    group.add_argument("--kvgate-think-time", type=float, default=1.0)
    group.add_argument("--kvgate-trace", default=DEFAULT_TRACE)
    group.add_argument("--kvgate-trace-first", type=int, default=300)
    group.add_argument("--kvgate-trace-block-tokens", type=int, default=32)
    group.add_argument("--kvgate-once", action="store_true", help="stop when every session has run")


def build_workload(o: Any) -> Workload:
    """The workload named by the parsed `--kvgate-*` options."""
    if o.kvgate_workload == "multi-turn":
        return multi_turn(MultiTurnSpec(
            conversations=o.kvgate_conversations, turns=o.kvgate_turns, output_tokens=o.kvgate_output_tokens,
            think_time=o.kvgate_think_time, api=o.kvgate_api or "chat", seed=o.kvgate_seed))
    if o.kvgate_workload == "trace":
        return trace(TraceSpec(path=o.kvgate_trace, first=o.kvgate_trace_first or None,
                               block_tokens=o.kvgate_trace_block_tokens, api=o.kvgate_api or "completions",
                               seed=o.kvgate_seed))
    return shared_prefix(SharedPrefixSpec(
        groups=o.kvgate_groups, prompts_per_group=o.kvgate_prompts_per_group,
        system_tokens=o.kvgate_system_tokens, question_tokens=o.kvgate_question_tokens,
        output_tokens=o.kvgate_output_tokens, api=o.kvgate_api or "completions", seed=o.kvgate_seed))


class SessionFeed:
    """Hands sessions to users in workload order. `once` ends the feed after one pass (the test stops
    when the last running session ends); otherwise it cycles."""

    def __init__(self, workload: Workload, once: bool) -> None:
        self._sessions = workload.sessions
        self._once = once
        self._lock = threading.Lock()
        self._next = 0
        self._running = 0
        self._stopping = False

    def take(self) -> Session | None:
        with self._lock:
            if self._next >= len(self._sessions):
                if self._once:
                    return None
                self._next = 0
            self._next += 1
            self._running += 1
            return self._sessions[self._next - 1]

    def done(self) -> bool:
        """A session ended; True exactly once: when a `once` feed is exhausted and nothing runs."""
        with self._lock:
            self._running -= 1
            last = self._once and self._next >= len(self._sessions) and self._running == 0
            if last and not self._stopping:
                self._stopping = True
                return True
            return False


_FEEDS: dict[int, SessionFeed] = {}  # per Environment: locust builds users from module-level classes


@events.test_start.add_listener
def _on_start(environment: Environment, **_: Any) -> None:
    o = environment.parsed_options
    _FEEDS[id(environment)] = SessionFeed(build_workload(o), o.kvgate_once)


class LLMUser(HttpUser):
    """A closed-loop user running one workload session after another."""

    wait_time = constant(0)

    @task
    def run_session(self) -> None:
        feed = _FEEDS.get(id(self.environment))
        session = feed.take() if feed else None
        if session is None:
            gevent.sleep(0.5)  # a `once` feed ran dry: idle until the last session ends the test
            return
        try:
            model = self.environment.parsed_options.kvgate_model
            for i, req in enumerate(session.requests):
                self._one(req.path, req.body(model))
                if i + 1 < len(session.requests) and session.think_after(i) > 0:
                    time.sleep(session.think_after(i))  # gevent-patched: yields to other users
        finally:
            if feed is not None and feed.done() and self.environment.runner is not None:
                gevent.spawn(self.environment.runner.quit)  # from another greenlet: quit() kills ours

    def _one(self, path: str, body: dict[str, Any]) -> None:
        start = time.perf_counter()
        ttft: float | None = None
        error: Exception | None = None
        with self.client.post(path, data=orjson.dumps(body), headers={"Content-Type": "application/json"},
                              stream=True, catch_response=True, name=path) as resp:
            if resp.status_code != 200:
                resp.failure(f"{resp.status_code}: {resp.text[:200]}")
                return
            try:
                for line in resp.iter_lines():
                    if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                        continue
                    if ttft is None and chunk_text(orjson.loads(line[5:])):
                        ttft = time.perf_counter() - start
            except Exception as exc:  # a broken stream is a failed request, reported to locust
                error = exc
                resp.failure(f"stream: {exc}")
        e2e = time.perf_counter() - start
        fire = self.environment.events.request.fire
        if ttft is None and error is None:
            error = RuntimeError("no generated text in the stream")
        fire(request_type="TTFT", name=path, response_time=(ttft or e2e) * 1000, response_length=0,
             exception=error, context={})
        fire(request_type="E2E", name=path, response_time=e2e * 1000, response_length=0, exception=error,
             context={})

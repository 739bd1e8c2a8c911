"""The access log: one line per request on stdout (`logs.access`, on by default), JSON or text
(`logs.format`), and the format of the gateway's own log (stderr) from the same setting.

A line is an `AccessRecord`. It is built on the event loop from the request's typed state (ProxyCall,
Decision, AnswerTally) when the request ends, and put on a bounded queue; a writer thread encodes and
writes the lines in batches, so a slow or blocked stdout (a full pipe) never stalls the loop. The
writer polls the queue every `_POLL_S` (50 ms) instead of waiting on it, so a request's `put` wakes no
thread: waking the writer per line cost ~0.9 ms of CPU per request at low request rates (measured with
bench.proxy_overhead, access log on vs off), the GIL handed back and forth each time. Once
`logs.access_queue` lines wait, further lines are dropped and counted in
`kvgate_access_log_skipped_total{cause="queue_full"}`.

Refused requests (a 4xx the gateway answers itself: bad target, body, key, model, admission limits)
are logged too, with their reason, but at most `logs.access_refused_per_interval` of them per
`logs.rejected_interval`: a flood of malformed or over-limit requests costs that many lines and no
more. The rest are counted in `kvgate_access_log_skipped_total{cause="refused_over_budget"}` and in the
refusal summary line of gateway.rejections, which already counts every refusal by reason. HTTP that
aiohttp cannot parse never reaches a handler and is only counted there (`protocol`).

Token counts come from the pod's `usage` when its answer carries one (a non-streamed body; the last
data chunk of a stream sent with `stream_options.include_usage`), found in the last bytes relayed, so
no chunk is parsed. Without it, a stream's output tokens are estimated by its data events (one per
token as vLLM streams) and the prompt tokens are the gateway's own count when it tokenized the prompt;
`usage` says which (`pod`, `estimate`, or empty).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import logging.handlers
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING

import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from gateway.config import Logs

if TYPE_CHECKING:
    from gateway.proxy import ProxyCall

TENANT_HEADER = "x-kvgate-tenant"
# why the gateway refused a request (GatewayError.reason), set by the error middleware
REFUSAL_KEY = web.RequestKey("kvgate_refusal", str)
_MAX_FIELD = 256  # client-chosen strings (model, tenant) are cut to this many characters
_TAIL = 4096  # bytes of an answer's end searched for its usage object
_USAGE = re.compile(rb'"usage":\s*\{')
_PROMPT = re.compile(rb'"prompt_tokens":\s*(\d+)')
_COMPLETION = re.compile(rb'"completion_tokens":\s*(\d+)')
_BATCH = 256  # lines written per write() call at most
_POLL_S = 0.05  # the writer's sleep while the queue is empty: the longest a line waits to be written


class AnswerTally:
    """What the relay saw of one answer: the SSE data events (streams) and its last two chunks (the
    usage object may straddle them). `add` is called per chunk; it parses nothing."""

    __slots__ = ("before", "events", "last", "streamed")

    def __init__(self, streamed: bool) -> None:
        self.streamed = streamed
        self.events = 0
        self.before = b""
        self.last = b""

    def add(self, chunk: bytes) -> None:
        if self.streamed:
            self.events += chunk.count(b"data: {")
        self.before, self.last = self.last, chunk

    def usage(self) -> tuple[int, int] | None:
        """(prompt_tokens, completion_tokens) of the last usage object in the answer's tail, if any."""
        tail = (self.before[-_TAIL:] + self.last)[-2 * _TAIL :]
        found = list(_USAGE.finditer(tail))
        if not found:
            return None
        end = found[-1].end()
        window = tail[end : end + 512]
        prompt, completion = _PROMPT.search(window), _COMPLETION.search(window)
        if prompt is None or completion is None:
            return None
        return int(prompt[1]), int(completion[1])


class AccessRecord(msgspec.Struct, kw_only=True):
    """One access-log line, keys in this order. Times in milliseconds; None: not known."""

    ts: datetime.datetime
    request_id: str
    method: str
    path: str
    status: int
    reason: str  # the refusal reason when the gateway answered 4xx itself, else ""
    client: str  # the peer address
    tenant: str  # admission's tenant, else the x-kvgate-tenant header, else ""
    model: str  # as the client named it (an alias or adapter included)
    pool: str  # the pool's model
    pod: str  # the pod that answered ("" when none did)
    prefill_pod: str  # P/D: the pod that ran the prefill step
    policy: str
    decision: str  # the policy's reason for the pick
    cached_tokens: int | None  # prompt tokens the policy predicted cached on the pod
    prompt_tokens: int | None
    output_tokens: int | None
    usage: str  # pod: the pod's usage object; estimate: the gateway's own counts; "": none
    ttft_ms: float | None  # arrival to the first byte relayed
    latency_ms: float  # arrival to the last byte
    retries: int
    trace_id: str  # when tracing is on (gateway.tracing)


_FIELDS = AccessRecord.__struct_fields__


class AccessLog:
    """Builds the lines (`log`, on the loop) and writes them (`start`/`close`: the writer thread)."""

    def __init__(
        self,
        logs: Logs,
        registry: CollectorRegistry,
        *,
        sink: Callable[[], IO[bytes] | FdSink] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.text = logs.format == "text"
        self.budget = logs.access_refused_per_interval
        self.interval = logs.rejected_interval
        self.sink = sink or stdout_sink  # opened by the writer thread
        self._queue: queue.Queue[AccessRecord | None] = queue.Queue(maxsize=logs.access_queue)
        self._clock = clock
        self._window_end = 0.0
        self._refused_left = 0
        self._thread: threading.Thread | None = None
        skipped = Counter(
            "kvgate_access_log_skipped",
            "Access-log lines not written: refused requests beyond logs.access_refused_per_interval "
            "(refused_over_budget), or the writer's queue full (queue_full).",
            ["cause"],
            registry=registry,
        )
        self._over_budget = skipped.labels("refused_over_budget")
        self._queue_full = skipped.labels("queue_full")
        self._encode = msgspec.json.Encoder().encode

    # ---- on the event loop ------------------------------------------------------------------

    def log(self, request: web.Request, call: ProxyCall | None, status: int, start: float,
            request_id: str, trace_id: str = "") -> None:
        """The line of a request that ended with `status`; `start`: perf_counter() at its arrival."""
        reason = request.get(REFUSAL_KEY, "")
        if reason and not self._refused_allowed():
            self._over_budget.inc()
            return
        now = time.perf_counter()
        record = AccessRecord(
            ts=datetime.datetime.now(datetime.UTC),
            request_id=request_id,
            method=request.method,
            path=request.path[:_MAX_FIELD],
            status=status,
            reason=reason,
            client=request.remote or "",
            tenant=request.headers.get(TENANT_HEADER, "")[:_MAX_FIELD],
            model="",
            pool="",
            pod="",
            prefill_pod="",
            policy="",
            decision="",
            cached_tokens=None,
            prompt_tokens=None,
            output_tokens=None,
            usage="",
            ttft_ms=None,
            latency_ms=round(1e3 * (now - start), 3),
            retries=0,
            trace_id=trace_id,
        )
        if call is not None:
            _fill_from_call(record, call)
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._queue_full.inc()

    def _refused_allowed(self) -> bool:
        """Whether one more refused request gets its line in the current interval."""
        now = self._clock()
        if now >= self._window_end:
            self._window_end = now + self.interval
            self._refused_left = self.budget
        if self._refused_left <= 0:
            return False
        self._refused_left -= 1
        return True

    # ---- the writer thread ------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._write_lines, name="kvgate access log", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 2.0) -> None:
        """Stop the writer once it wrote what is queued. A sink blocked for `timeout` s (a pipe nobody
        reads) is left to its daemon thread, which ends with the process."""
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(max(0.0, deadline - time.monotonic()))
        self._thread = None

    def _write_lines(self) -> None:
        sink = self.sink()
        try:
            self._drain_into(sink)
        finally:
            if isinstance(sink, FdSink):
                os.close(sink.fd)

    def _drain_into(self, sink: IO[bytes] | FdSink) -> None:
        while True:
            batch: list[AccessRecord | None] = []
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if not batch:
                time.sleep(_POLL_S)  # polled, not waited on: a put never wakes this thread
                continue
            lines = [self.format(r) for r in batch if r is not None]
            if lines:
                try:
                    sink.write(b"".join(lines))
                    sink.flush()
                except (OSError, ValueError):  # stdout closed: nothing more can be written
                    return
            if None in batch:
                return

    def format(self, record: AccessRecord) -> bytes:
        """A line: JSON, or `key=value` pairs (values quoted when they hold spaces or quotes)."""
        if not self.text:
            return self._encode(record) + b"\n"
        parts = [f"{record.ts.isoformat(timespec='milliseconds')} access"]
        for name in _FIELDS[1:]:
            value = getattr(record, name)
            if value is None or value == "":
                continue
            parts.append(f"{name}={_logfmt(value)}")
        return (" ".join(parts) + "\n").encode()


class FdSink:
    """Writes to a file descriptor with os.write: a writer blocked on a full pipe holds no Python lock,
    so neither sys.stdout nor the interpreter's exit waits for it (a BufferedWriter's lock would)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        return len(data)

    def flush(self) -> None:
        pass


def stdout_sink() -> IO[bytes] | FdSink:
    """A copy of stdout's descriptor, or sys.stdout.buffer when stdout has none (an in-memory stream)."""
    try:
        return FdSink(os.dup(sys.stdout.fileno()))
    except (AttributeError, OSError, ValueError):
        return sys.stdout.buffer


def _fill_from_call(record: AccessRecord, call: ProxyCall) -> None:
    pool = call.pool
    record.pool = pool.model
    model = call.route.body.get("model")
    record.model = model[:_MAX_FIELD] if isinstance(model, str) else pool.model
    if call.tenant:
        record.tenant = call.tenant
    record.policy = pool.policy_name
    decision = call.decision
    if decision is not None:
        record.decision = decision.reason
        record.cached_tokens = decision.cached_tokens
    if call.served_by is not None:
        record.pod = call.served_by.url
    if call.prefill_by is not None:
        record.prefill_pod = call.prefill_by.url
    record.retries = max(0, len(call.tried) - 1)
    if call.first_byte_at:
        record.ttft_ms = round(1e3 * (call.first_byte_at - call.arrival), 3)
    counted = call.route.state.prompt_tokens or call.route.state.counted_tokens or None
    tally = call.tally
    usage = tally.usage() if tally is not None else None
    if usage is not None:
        record.prompt_tokens, record.output_tokens = usage
        record.usage = "pod"
    elif tally is not None and tally.streamed and tally.events:
        record.prompt_tokens, record.output_tokens = counted, tally.events
        record.usage = "estimate"
    elif counted:
        record.prompt_tokens = counted
        record.usage = "estimate"


def _logfmt(value: object) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\\') or not text.isprintable():
        return json.dumps(text)
    return text


# ---- the gateway's own log ---------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, message (and exc, the traceback, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def setup_logging(level: str, fmt: str, stream: IO[str] | None = None) -> logging.handlers.QueueListener:
    """Route the root logger through a queue to a thread writing `stream` (stderr) in `fmt` (json or
    text). Records are formatted where they are logged (rare lines), written off the event loop.
    Returns the started listener: stop() it at exit to write what is queued."""
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    to_queue = logging.handlers.QueueHandler(records)
    to_queue.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    out = logging.StreamHandler(stream if stream is not None else sys.stderr)
    out.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(to_queue)
    root.setLevel(level.upper())
    listener = logging.handlers.QueueListener(records, out)
    listener.start()
    return listener

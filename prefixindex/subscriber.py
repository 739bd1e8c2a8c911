"""KV-event transport: ZMQ SUB sockets, sequence tracking, gap recovery through the replay socket.

Each pod publishes 3-frame messages `[topic, seq (8 bytes big-endian), payload]`. A source whose
endpoint contains `*` is *bound* by the gateway, and many pods may connect to that one socket: they are
told apart by topic. Any other endpoint is *connected* to (the pod binds), and everything received
there belongs to that one pod.

Per pod the subscriber expects seq = last + 1. A higher seq is a gap (including the first message of
a pod that published before the gateway started): the missed batches are fetched from the pod's replay
ROUTER socket (a DEALER sends `["", start_seq]` and receives `["", topic, seq, payload]` per buffered
batch, then an end marker with seq -1); when replay is impossible or incomplete the pod's state is
reset (the sink clears it) and learning restarts from the message at hand. A seq of 0 after later ones
means the pod restarted: reset. On `add`, a pod with a replay endpoint is replayed from 0 at once, so a
restarted gateway rebuilds its view of an idle fleet; afterwards a pod silent for `resync_interval`
seconds is asked for anything after its last seq, which catches the last batches of a burst lost to
ZMQ's slow joiner or a dropped connection (a gap would otherwise only show at the next message).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Protocol

import zmq
import zmq.asyncio

from prefixindex.events import DecodeError, EventBatch, decode_batch

log = logging.getLogger(__name__)

END_SEQ = -1


class EventSink(Protocol):
    """Where decoded batches go. Called on the event loop, in sequence order per pod."""

    def apply(self, pod: Hashable, batch: EventBatch) -> None:
        """Apply one batch of `pod`'s events."""

    def reset(self, pod: Hashable) -> None:
        """`pod`'s state is unknown (lost events, restart): forget what it holds."""

    def note(self, pod: Hashable, what: str) -> None:
        """Count a transport incident: "gap", "replay_ok", "replay_failed", "malformed", "restart"."""


@dataclass(slots=True)
class EventSource:
    """Where one pod's KV events come from (see the module docstring for bind vs connect)."""

    pod: Hashable
    endpoint: str
    replay: str | None = None
    topic: str | None = None  # required to tell pods apart on a bound endpoint shared by several


def is_bind(endpoint: str) -> bool:
    return "*" in endpoint


@dataclass(slots=True, eq=False)
class _PodState:
    source: EventSource
    last_seq: int = -1
    last_rx: float = field(default_factory=time.monotonic)
    replayed_at: float = float("-inf")
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(slots=True, eq=False)
class _Listener:
    endpoint: str
    socket: zmq.asyncio.Socket
    bound: str  # the endpoint actually bound or connected (a `*` port resolved)
    pods: dict[bytes, _PodState] = field(default_factory=dict)  # by topic
    untopiced: list[_PodState] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def pod_for(self, topic: bytes) -> _PodState | None:
        st = self.pods.get(topic)
        if st is None and len(self.untopiced) == 1:
            st = self.untopiced[0]
        return st


class KVEventSubscriber:
    """Receives many pods' KV events and feeds `sink`, recovering gaps. Owned by one event loop."""

    def __init__(
        self, sink: EventSink, *, replay_timeout: float = 2.0, resync_interval: float | None = 5.0
    ) -> None:
        self._sink = sink
        self._timeout = replay_timeout
        self._resync = resync_interval
        self._resync_task: asyncio.Task[None] | None = None
        self._ctx = zmq.asyncio.Context()
        self._listeners: dict[str, _Listener] = {}
        self._states: dict[Hashable, tuple[_PodState, _Listener]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def bound_endpoint(self, endpoint: str) -> str | None:
        """The address actually bound for a `*` endpoint (e.g. `tcp://127.0.0.1:*` -> its port)."""
        lis = self._listeners.get(endpoint)
        return lis.bound if lis is not None else None

    def last_seq(self, pod: Hashable) -> int:
        got = self._states.get(pod)
        return got[0].last_seq if got is not None else -1

    async def add(self, source: EventSource) -> None:
        """Start receiving `source`'s events (and replay its buffer from 0 if it has a replay socket)."""
        if source.pod in self._states:
            await self.remove(source.pod)
        lis = self._listeners.get(source.endpoint)
        if lis is not None and not is_bind(source.endpoint):
            raise ValueError(f"KV-event endpoint {source.endpoint} is already used by another pod")
        if lis is None:
            lis = self._open(source.endpoint)
        st = _PodState(source)
        if source.topic is not None:
            lis.pods[source.topic.encode()] = st
        else:
            lis.untopiced.append(st)
        self._states[source.pod] = (st, lis)
        if source.replay:
            self._spawn(self._catch_up(st, initial=True))
            if self._resync and self._resync_task is None:
                self._resync_task = asyncio.get_running_loop().create_task(self._resync_loop(self._resync))

    async def remove(self, pod: Hashable) -> None:
        """Stop receiving `pod`'s events (its index entries are the caller's to drop)."""
        got = self._states.pop(pod, None)
        if got is None:
            return
        st, lis = got
        if st.source.topic is not None:
            lis.pods.pop(st.source.topic.encode(), None)
        else:
            lis.untopiced.remove(st)
        if not lis.pods and not lis.untopiced:
            await self._close_listener(lis)

    async def close(self) -> None:
        if self._resync_task is not None:
            self._resync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._resync_task
        for t in list(self._tasks):
            t.cancel()
        for lis in list(self._listeners.values()):
            await self._close_listener(lis)
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._states.clear()
        self._ctx.term()

    # ---- sockets ------------------------------------------------------------------------------

    def _open(self, endpoint: str) -> _Listener:
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        try:
            if is_bind(endpoint):
                sock.bind(endpoint)
                bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            else:
                sock.connect(endpoint)
                bound = endpoint
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            verb = "bind" if is_bind(endpoint) else "connect to"
            raise ValueError(f"cannot {verb} KV-event endpoint {endpoint!r}: {exc}") from exc
        lis = _Listener(endpoint, sock, bound)
        self._listeners[endpoint] = lis
        lis.task = asyncio.get_running_loop().create_task(self._receive(lis))
        return lis

    async def _close_listener(self, lis: _Listener) -> None:
        self._listeners.pop(lis.endpoint, None)
        if lis.task is not None:
            lis.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lis.task
        lis.socket.close(linger=0)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- receiving ----------------------------------------------------------------------------

    async def _receive(self, lis: _Listener) -> None:
        while True:
            frames = await lis.socket.recv_multipart()
            if len(frames) != 3 or len(frames[1]) != 8:
                log.warning("KV events on %s: dropped a message of %d frames", lis.endpoint, len(frames))
                continue
            st = lis.pod_for(frames[0])
            if st is None:
                continue  # a publisher we do not route to
            try:
                await self._deliver(st, int.from_bytes(frames[1], "big", signed=True), frames[2])
            except Exception:  # one bad message must not stop the pool's event stream
                log.exception("KV events from %s: failed to apply", st.source.pod)

    async def _deliver(self, st: _PodState, seq: int, payload: bytes) -> None:
        async with st.lock:
            if seq <= st.last_seq:
                # Live messages come once: an old seq is either a batch a replay just applied (it was
                # in flight meanwhile) or a restarted pod counting from 0 again (its 0 may be lost).
                if seq != 0 and time.monotonic() - st.replayed_at < 2 * self._timeout + 1:
                    return
                self._sink.note(st.source.pod, "restart")
                self._sink.reset(st.source.pod)
                st.last_seq = -1
            if seq > st.last_seq + 1:
                self._sink.note(st.source.pod, "gap")
                if not await self._replay(st, st.last_seq + 1, seq):
                    self._sink.reset(st.source.pod)
            self._apply(st, seq, payload)

    def _apply(self, st: _PodState, seq: int, payload: bytes) -> None:
        st.last_seq = seq
        st.last_rx = time.monotonic()
        try:
            batch = decode_batch(payload)
        except DecodeError as exc:
            self._sink.note(st.source.pod, "malformed")
            log.warning("KV events from %s seq %d: %s", st.source.pod, seq, exc)
            return
        self._sink.apply(st.source.pod, batch)

    async def _catch_up(self, st: _PodState, *, initial: bool = False) -> None:
        """Apply whatever `st`'s replay buffer holds after its last seq. A first sync that cannot reach
        the pod resets it (its state is unknown); a later one leaves it (the health checker judges)."""
        async with st.lock:
            if initial and st.last_seq >= 0:
                return
            ok = await self._replay(st, st.last_seq + 1, None, quiet=not initial)
            if initial and not ok:
                self._sink.reset(st.source.pod)

    async def _resync_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for st, _ in list(self._states.values()):
                if st.source.replay and now - st.last_rx >= interval and not st.lock.locked():
                    st.last_rx = now
                    self._spawn(self._catch_up(st))

    async def _replay(self, st: _PodState, start: int, until: int | None, *, quiet: bool = False) -> bool:
        """Fetch and apply `st`'s buffered batches from `start` (up to, not including, `until`).

        True when the pod's state is complete afterwards: every batch up to `until` - 1 applied (or,
        with `until` None, the whole buffer). A buffer that no longer reaches back to `start` resets
        the pod before its oldest batch is applied. `quiet`: count it only if it applied something.
        """
        if not st.source.replay:
            return False
        pod = st.source.pod
        applied = 0
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(st.source.replay)
            await sock.send_multipart([b"", start.to_bytes(8, "big")])
            while True:
                frames = await asyncio.wait_for(sock.recv_multipart(), self._timeout)
                if len(frames) != 4 or len(frames[2]) != 8:
                    continue
                seq = int.from_bytes(frames[2], "big", signed=True)
                if seq == END_SEQ:
                    break
                if seq <= st.last_seq or (until is not None and seq >= until):
                    continue
                if seq > st.last_seq + 1 and st.last_seq >= 0:  # buffer lost part of the gap
                    self._sink.reset(pod)
                self._apply(st, seq, frames[3])
                applied += 1
        except TimeoutError:
            if not quiet:
                self._sink.note(pod, "replay_failed")
            return False
        finally:
            sock.close(linger=0)
            if applied:
                st.replayed_at = time.monotonic()
        complete = until is None or st.last_seq == until - 1
        if applied or not quiet:
            self._sink.note(pod, "replay_ok" if complete else "replay_failed")
        return complete

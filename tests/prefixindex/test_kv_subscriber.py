"""The KV-event subscriber over real ZMQ sockets on 127.0.0.1: connect and bind, gaps, replay, restarts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Hashable

import pytest
import zmq.asyncio
from helpers import eventually
from kv_publisher_fake import FakePublisher

import prefixindex.subscriber as subscriber_module
from prefixindex.events import BlockRemoved, EventBatch
from prefixindex.subscriber import EventSource, KVEventSubscriber

EV = [BlockRemoved([1])]


class RecordingSink:
    def __init__(self) -> None:
        self.seen: dict[Hashable, list[int]] = {}
        self.notes: list[tuple[Hashable, str]] = []

    def apply(self, pod: Hashable, batch: EventBatch) -> None:
        self.seen.setdefault(pod, []).append(int(batch.ts))

    def reset(self, pod: Hashable) -> None:
        self.seen.setdefault(pod, []).append(-1)

    def note(self, pod: Hashable, what: str) -> None:
        self.notes.append((pod, what))


class ShiftedClock:
    """Stands in for the subscriber module's `time`: real monotonic time plus what a test skipped."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture
async def zctx() -> AsyncIterator[zmq.asyncio.Context]:
    ctx = zmq.asyncio.Context()
    yield ctx
    ctx.term()


@pytest.fixture
async def sub_sink() -> AsyncIterator[tuple[KVEventSubscriber, RecordingSink]]:
    sink = RecordingSink()
    sub = KVEventSubscriber(sink, replay_timeout=2.0)
    yield sub, sink
    await sub.close()


async def warm_up(pub: FakePublisher, sink: RecordingSink, pod: str) -> None:
    """Publish until the subscription is live (ZMQ drops what a SUB publishes before it joins)."""
    async with asyncio.timeout(10):
        while pod not in sink.seen or not any(s >= 0 for s in sink.seen[pod]):
            await pub.publish(EV)
            await asyncio.sleep(0.02)


async def test_connect_mode_replays_history_then_follows_live(zctx, sub_sink) -> None:
    sub, sink = sub_sink
    pub = FakePublisher(zctx, "tcp://127.0.0.1:*")
    for _ in range(3):
        await pub.publish(EV)  # nobody listens yet
    await sub.add(EventSource("p", pub.endpoint, pub.replay_endpoint))
    await eventually(lambda: sink.seen.get("p", [])[:3] == [0, 1, 2])
    await eventually(lambda: sub.last_seq("p") == 2)
    for _ in range(20):
        await pub.publish(EV)
        await asyncio.sleep(0.005)
    await eventually(lambda: sub.last_seq("p") == 22)
    assert sink.seen["p"] == list(range(23))  # in order, nothing twice, nothing lost
    await pub.close()


async def test_gap_is_recovered_from_the_replay_socket(zctx, sub_sink) -> None:
    sub, sink = sub_sink
    pub = FakePublisher(zctx, "tcp://127.0.0.1:*")
    await sub.add(EventSource("p", pub.endpoint, pub.replay_endpoint))
    await warm_up(pub, sink, "p")
    last = pub.seq - 1
    await eventually(lambda: sub.last_seq("p") == last)
    dropped = [await pub.publish(EV, drop=True) for _ in range(3)]
    after = await pub.publish(EV)
    await eventually(lambda: sub.last_seq("p") == after)
    assert sink.seen["p"][-4:] == [*dropped, after]
    assert ("p", "gap") in sink.notes and ("p", "replay_ok") in sink.notes
    await pub.close()


async def test_gap_without_replay_resets_the_pod(zctx, sub_sink) -> None:
    sub, sink = sub_sink
    pub = FakePublisher(zctx, "tcp://127.0.0.1:*", replay=False)
    await sub.add(EventSource("p", pub.endpoint))
    await warm_up(pub, sink, "p")
    await pub.publish(EV, drop=True)
    after = await pub.publish(EV)
    await eventually(lambda: sub.last_seq("p") == after)
    assert sink.seen["p"][-2:] == [-1, after]  # reset, then learning resumes
    assert ("p", "gap") in sink.notes


async def test_bound_endpoint_tells_pods_apart_by_topic_and_sees_restarts(zctx, sub_sink) -> None:
    sub, sink = sub_sink
    await sub.add(EventSource("a", "tcp://127.0.0.1:*", topic="kv@a"))
    bound = sub.bound_endpoint("tcp://127.0.0.1:*")
    assert bound and bound.startswith("tcp://127.0.0.1:")
    await sub.add(EventSource("b", "tcp://127.0.0.1:*", topic="kv@b"))
    pa = FakePublisher(zctx, bound, replay=False, topic="kv@a")
    pb = FakePublisher(zctx, bound, replay=False, topic="kv@b")
    other = FakePublisher(zctx, bound, replay=False, topic="kv@unknown")
    await warm_up(pa, sink, "a")
    await warm_up(pb, sink, "b")
    await other.publish(EV)
    na, nb = pa.seq, pb.seq
    await eventually(lambda: sub.last_seq("a") == na - 1 and sub.last_seq("b") == nb - 1)
    assert set(sink.seen) == {"a", "b"}
    pa.restart()
    await pa.publish(EV)
    await eventually(lambda: sub.last_seq("a") == 0)
    assert sink.seen["a"][-2:] == [-1, 0] and ("a", "restart") in sink.notes
    await sub.remove("a")
    await pa.publish(EV)
    await pb.publish(EV)
    await eventually(lambda: sub.last_seq("b") == nb)
    for p in (pa, pb, other):
        await p.close()


async def test_unreachable_replay_times_out_and_resets(zctx) -> None:
    sink = RecordingSink()
    sub = KVEventSubscriber(sink, replay_timeout=0.2)
    pub = FakePublisher(zctx, "tcp://127.0.0.1:*", replay=False)
    dead = zctx.socket(zmq.ROUTER)
    dead.bind("tcp://127.0.0.1:*")  # accepts the request, never answers
    await sub.add(EventSource("p", pub.endpoint, dead.getsockopt_string(zmq.LAST_ENDPOINT)))
    await eventually(lambda: ("p", "replay_failed") in sink.notes)
    assert sink.seen["p"] == [-1]
    await sub.close()
    dead.close(linger=0)
    await pub.close()


async def test_a_lost_last_batch_is_fetched_when_the_pod_goes_quiet(zctx) -> None:
    sink = RecordingSink()
    sub = KVEventSubscriber(sink, resync_interval=0.2)
    pub = FakePublisher(zctx, "tcp://127.0.0.1:*")
    await sub.add(EventSource("p", pub.endpoint, pub.replay_endpoint))
    await warm_up(pub, sink, "p")
    lost = await pub.publish(EV, drop=True)  # nothing follows it: no gap will ever show
    await eventually(lambda: sub.last_seq("p") == lost)
    assert sink.seen["p"][-1] == lost
    await sub.close()
    await pub.close()


async def test_a_restarted_pod_is_reset_even_if_its_seq_0_was_lost(zctx, monkeypatch) -> None:
    clock = ShiftedClock()
    monkeypatch.setattr(subscriber_module, "time", clock)
    sink = RecordingSink()
    sub = KVEventSubscriber(sink, replay_timeout=0.2, resync_interval=None)
    pub = FakePublisher(zctx, "tcp://127.0.0.1:*")
    await sub.add(EventSource("p", pub.endpoint, pub.replay_endpoint))
    await warm_up(pub, sink, "p")
    for _ in range(5):
        await pub.publish(EV)
    await eventually(lambda: sub.last_seq("p") == pub.seq - 1)
    clock.advance(1.5)  # past the window in which an old seq may be a replay's overlap
    pub.restart()
    await pub.publish(EV, drop=True)  # the restarted pod's seq 0 never arrives live
    await pub.publish(EV)
    await eventually(lambda: sub.last_seq("p") == 1 and sink.seen["p"][-3:] == [-1, 0, 1])
    assert ("p", "restart") in sink.notes
    await sub.close()
    await pub.close()


async def test_bad_endpoints_fail_clearly(sub_sink) -> None:
    sub, _ = sub_sink
    with pytest.raises(ValueError, match="KV-event endpoint"):
        await sub.add(EventSource("p", "tcp://*:notaport"))
    with pytest.raises(ValueError, match="KV-event endpoint"):
        await sub.add(EventSource("q", "nonsense://x"))

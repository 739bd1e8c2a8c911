"""KV-event publisher in vLLM's ZMQ wire format (vllm/distributed/kv_events.py, ZmqEventPublisher).

PUB messages are 3 frames: [topic, seq (8-byte big-endian, from 0), msgpack KVEventBatch]. The PUB
socket binds when the endpoint contains '*' (e.g. `tcp://*:5557`, or `tcp://127.0.0.1:*` for an
OS-chosen port) and connects otherwise, so many pods can feed one subscriber's bound port. A ROUTER
socket on the replay endpoint answers a DEALER's ["", start_seq] with ["", topic, seq, payload] for
every buffered batch from start_seq on, then ["", "", seq -1, ""].

PUB sends never block (ZMQ drops at the high-water mark), so `publish` is called straight from the
engine step; the replay socket is served by an asyncio task (zmq.asyncio), never blocking the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence

import msgspec
import zmq
import zmq.asyncio

from bench.sim.events import Event, KVEventBatch

log = logging.getLogger(__name__)
END_SEQ = (-1).to_bytes(8, "big", signed=True)


def _bound_endpoint(sock: zmq.Socket) -> str:
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    # A wildcard bind reports 0.0.0.0; local subscribers reach it on loopback.
    return endpoint.replace("tcp://0.0.0.0:", "tcp://127.0.0.1:")


class KVEventPublisher:
    """Publishes event batches with sequence numbers and serves replays from a bounded buffer."""

    def __init__(
        self,
        endpoint: str,
        *,
        replay_endpoint: str | None = None,
        topic: str = "",
        buffer_steps: int = 10_000,
        data_parallel_rank: int = 0,
        hwm: int = 100_000,
    ) -> None:
        self._ctx = zmq.asyncio.Context.instance()
        self._topic = topic.encode()
        self._dp_rank = data_parallel_rank
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._encoder = msgspec.msgpack.Encoder()
        self.seq = 0
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.set_hwm(hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        if "*" in endpoint or endpoint.startswith(("ipc://", "inproc://")):
            self._pub.bind(endpoint)
            self.endpoint = _bound_endpoint(self._pub)
        else:
            self._pub.connect(endpoint)
            self.endpoint = endpoint
        self._replay: zmq.asyncio.Socket | None = None
        self.replay_endpoint: str | None = None
        self._replay_task: asyncio.Task[None] | None = None
        if replay_endpoint:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(replay_endpoint)
            self.replay_endpoint = _bound_endpoint(self._replay)

    def start(self) -> None:
        """Start serving replay requests (needs a running loop)."""
        if self._replay is not None and self._replay_task is None:
            self._replay_task = asyncio.get_running_loop().create_task(self._serve_replay())

    def publish(self, events: Sequence[Event]) -> None:
        """Send one batch now (non-blocking) and keep it for replay."""
        payload = self._encoder.encode(
            KVEventBatch(ts=time.time(), events=list(events), data_parallel_rank=self._dp_rank)
        )
        seq = self.seq
        self.seq += 1
        self._buffer.append((seq, payload))
        try:
            self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload), flags=zmq.NOBLOCK)
        except zmq.Again:  # at the high-water mark: dropped, as vLLM's PUB drops; replay covers it
            log.warning("KV-event batch %d dropped at the PUB high-water mark", seq)

    async def _serve_replay(self) -> None:
        sock = self._replay
        assert sock is not None
        while True:
            frames = await sock.recv_multipart()
            if len(frames) != 3:
                log.warning("invalid replay request with %d frames", len(frames))
                continue
            client_id, _, start = frames
            start_seq = int.from_bytes(start, "big")
            for seq, payload in list(self._buffer):
                if seq >= start_seq:
                    await sock.send_multipart((client_id, b"", self._topic, seq.to_bytes(8, "big"), payload))
            await sock.send_multipart((client_id, b"", b"", END_SEQ, b""))

    async def close(self) -> None:
        if self._replay_task is not None:
            self._replay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replay_task
            self._replay_task = None
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)

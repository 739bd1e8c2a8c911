"""A KV-event publisher speaking vLLM's ZMQ protocol (PUB + replay ROUTER), for subscriber tests.

Written from the documented protocol, like vLLM's ZmqEventPublisher: `[topic, seq, payload]` on PUB,
a ROUTER answering `["", start_seq]` with `["", topic, seq, payload]` per buffered batch and an end
marker of seq -1. `publish(..., drop=True)` buffers a batch without sending it, to make a gap.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

import zmq
import zmq.asyncio

from prefixindex.events import KVEvent, encode_batch


class FakePublisher:
    def __init__(
        self, ctx: zmq.asyncio.Context, endpoint: str, *, replay: bool = True, topic: str = "kv-events"
    ) -> None:
        self.topic = topic.encode()
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        if "*" in endpoint:
            self.pub.bind(endpoint)
            self.endpoint = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            self.pub.connect(endpoint)
            self.endpoint = endpoint
        self.buffer: deque[tuple[int, bytes]] = deque(maxlen=10_000)
        self.seq = 0
        self.replay_endpoint: str | None = None
        self._task: asyncio.Task[None] | None = None
        if replay:
            self.router = ctx.socket(zmq.ROUTER)
            self.router.setsockopt(zmq.LINGER, 0)
            self.router.bind("tcp://127.0.0.1:*")
            self.replay_endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
            self._task = asyncio.get_running_loop().create_task(self._serve_replay())

    async def publish(self, events: list[KVEvent], *, drop: bool = False) -> int:
        seq = self.seq
        self.seq += 1
        payload = encode_batch(events, ts=float(seq))
        self.buffer.append((seq, payload))
        if not drop:
            await self.pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])
        return seq

    def restart(self) -> None:
        """Sequence numbers start again from 0 and the buffer empties, as after a pod restart."""
        self.seq = 0
        self.buffer.clear()

    async def _serve_replay(self) -> None:
        while True:
            client, _, start = await self.router.recv_multipart()
            first = int.from_bytes(start, "big")
            for seq, payload in list(self.buffer):
                if seq >= first:
                    frames = [client, b"", self.topic, seq.to_bytes(8, "big"), payload]
                    await self.router.send_multipart(frames)
            await self.router.send_multipart([client, b"", b"", (-1).to_bytes(8, "big", signed=True), b""])

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self.router.close(linger=0)
        self.pub.close(linger=0)

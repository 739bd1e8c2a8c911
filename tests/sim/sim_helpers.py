"""Helpers for the simulator's tests: fast cost settings, HTTP and /metrics helpers, a KV-event subscriber."""

from __future__ import annotations

from typing import Any

import aiohttp
import msgpack
import orjson
import zmq
import zmq.asyncio

# Fast, exact cost settings: steps of ~1 ms, no jitter.
FAST: dict[str, Any] = {"model": "sim-model", "prefill_tps": 1e6, "itl_ms": 1.0, "itl_ms_per_seq": 0.0}








async def post(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any], **headers: str
) -> tuple[int, Any]:
    async with http.post(url, json=body, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


async def sse(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> list[Any]:
    """The `data:` payloads of a streamed response, [DONE] included as the string."""
    out: list[Any] = []
    async with http.post(url, json=body) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = (await resp.read()).decode()
    for event in raw.split("\n\n"):
        if not event:
            continue
        assert event.startswith("data: "), event
        payload = event[len("data: "):]
        out.append(payload if payload == "[DONE]" else orjson.loads(payload))
    return out


async def scrape(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """/metrics samples as {'name{labels}': value} with labels sorted as exposed."""
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total, found = 0.0, False
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
            found = True
    assert found, f"no sample {name} {labels}"
    return total


class Subscriber:
    """A SUB socket bound on an OS-chosen loopback port that pods connect to, as a gateway would."""

    def __init__(self) -> None:
        self.ctx = zmq.asyncio.Context.instance()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"

    async def recv(self, within: float = 5.0) -> tuple[bytes, int, list[Any]]:
        """(topic, seq, [ts, events, dp_rank]) of the next batch."""
        if not await self.sock.poll(int(within * 1000)):
            raise TimeoutError("no KV-event batch")
        topic, seq, payload = await self.sock.recv_multipart()
        return topic, int.from_bytes(seq, "big"), msgpack.unpackb(payload, raw=False)

    async def drain(self, quiet: float = 0.3) -> list[tuple[bytes, int, list[Any]]]:
        out = []
        while await self.sock.poll(int(quiet * 1000)):
            topic, seq, payload = await self.sock.recv_multipart()
            out.append((topic, int.from_bytes(seq, "big"), msgpack.unpackb(payload, raw=False)))
        return out

    def close(self) -> None:
        self.sock.close(linger=0)



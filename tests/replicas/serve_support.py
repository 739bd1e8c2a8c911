"""`kvgate serve` subprocesses for the replica tests, and the shared-prefix workload they are driven by."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import aiohttp
import orjson
from helpers import eventually
from prometheus_client.parser import text_string_to_metric_families

MODEL = "sim-model"
WORDS = [f"w{i}" for i in range(500)]


def text(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def shared_prefix_workload(groups: int, per_group: int, prefix: int, question: int) -> list[str]:
    """`groups` system prompts of `prefix` words, `per_group` questions each, interleaved (round r
    asks every group its r-th question), so one group's requests are `groups` requests apart."""
    return [text(g, prefix) + " " + text(10_000 + 100 * g + r, question)
            for r in range(per_group) for g in range(groups)]


class ServeProcess:
    """One `kvgate serve` child; `url` once started."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.args = list(args)
        self.env = env
        self.url = ""
        self.proc: asyncio.subprocess.Process | None = None
        self.ready: dict = {}

    async def start(self, within: float = 60.0) -> ServeProcess:
        argv = [sys.executable, "-m", "gateway.cli", "serve", "--port", "0", "--log-level", "WARNING",
                "--no-access-log", *self.args]  # fmt: skip
        self.proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})},
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), within)
        assert line.startswith(b"KVGATE_SERVE_READY "), line
        self.ready = orjson.loads(line.split(b" ", 1)[1])
        self.url = self.ready["url"]
        return self

    async def stop(self) -> int | None:
        if self.proc is None or self.proc.returncode is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), 20)
        except TimeoutError:
            self.proc.kill()
            return await self.proc.wait()


async def start_all(processes: Sequence[ServeProcess]) -> list[ServeProcess]:
    try:
        return list(await asyncio.gather(*(p.start() for p in processes)))
    except BaseException:
        await stop_all(processes)
        raise


async def stop_all(processes: Sequence[ServeProcess]) -> list[int | None]:
    return list(await asyncio.gather(*(p.stop() for p in processes)))


@dataclass
class Answer:
    status: int
    endpoint: str
    cached_tokens: int


async def complete(http: aiohttp.ClientSession, base: str, prompt: str) -> Answer:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0}
    async with http.post(f"{base}/v1/completions", json=body) as resp:
        await resp.read()
        return Answer(resp.status, resp.headers.get("x-kvgate-endpoint", ""),
                      int(resp.headers.get("x-kvgate-cached-tokens", "0")))


async def round_robin(http: aiohttp.ClientSession, gateways: Sequence[str], prompts: Sequence[str],
                      start: int = 0, settle: Callable[[list[int]], Awaitable[None]] | None = None,
                      ) -> list[Answer]:
    """Each prompt in turn, to the next gateway in turn (a plain round-robin load balancer); after each,
    `settle(requests sent to each gateway so far)` when given."""
    answers = []
    sent = [0] * len(gateways)
    for i, p in enumerate(prompts):
        g = (start + i) % len(gateways)
        answers.append(await complete(http, gateways[g], p))
        sent[g] += 1
        if settle is not None:
            await settle(sent)
    return answers


async def metric_samples(http: aiohttp.ClientSession, base: str, name: str) -> dict[tuple, float]:
    """{sorted label items: value} of every sample called `name` at `base`/metrics."""
    async with http.get(f"{base}/metrics") as resp:
        body = await resp.text()
    out: dict[tuple, float] = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


async def metric(http: aiohttp.ClientSession, base: str, name: str, **labels: str) -> float:
    samples = await metric_samples(http, base, name)
    return samples.get(tuple(sorted(labels.items())), 0.0)


async def wait_connected(http: aiohttp.ClientSession, gateways: Sequence[str], up: bool = True,
                         within: float = 15.0) -> None:
    async def check() -> bool:
        values = [await metric(http, g, "kvgate_replica_sync_connected") for g in gateways]
        return all(v == (1.0 if up else 0.0) for v in values)

    await eventually(check, within=within, interval=0.05,
                     what=f"every replica's kvgate_replica_sync_connected to be {int(up)}")


@contextlib.asynccontextmanager
async def client():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        yield http

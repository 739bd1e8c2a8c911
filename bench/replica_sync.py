"""Replica sync cost and speed: what sharing a routing decision through Redis costs the request path,
and how long until another replica's index holds it.

Two ReplicaSyncs in this process (two replicas' approximate prefix caches) against a redis-server
started on a free port (Debian's `redis-server` on PATH). For prompts of `--tokens` tokens:
- record cost: PrefixCache.record on the request path with and without the sync attached, per call;
- delay: from replica A recording a prompt to replica B's index holding it (one record at a time,
  timed by this process's clock; a tick, a Redis round trip and B's read loop);
- throughput: records per second B applies while A records as fast as it can.

    python -m bench.replica_sync [--tokens 2048] [--records 500]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from prefixindex.tokenizer import WordTokenizer
from router.endpoint import Endpoint
from router.policy import RouteRequest
from router.prefix_cache import PrefixCache, PrefixCacheConfig
from router.replicas.config import ReplicasConfig
from router.replicas.sync import ReplicaSync
from router.route_state import RouteState

MODEL = "m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(seed: int, tokens: int) -> RouteRequest:
    prompt = " ".join(f"s{seed}w{i}" for i in range(tokens))
    return RouteRequest("r", MODEL, "/v1/completions", {"model": MODEL, "prompt": prompt}, {})


async def replica(url: str, eps: list[Endpoint]) -> tuple[PrefixCache, ReplicaSync]:
    config = PrefixCacheConfig(block_size=16, capacity=1_000_000)
    cache = PrefixCache(MODEL, config, tokenizer=WordTokenizer())
    await cache.start(eps)
    sync = ReplicaSync(ReplicasConfig(redis_url=url, channel="bench"), lambda: {MODEL: cache}, dict,
                       lambda: eps)
    await sync.start()
    return cache, sync


async def until(condition: Callable[[], bool], pause: float) -> None:
    while True:
        if condition():
            return
        await asyncio.sleep(pause)


def prepared(cache: PrefixCache, req: RouteRequest) -> RouteState:
    state = RouteState()
    cache.prepare(state, req)
    return state


async def main(tokens: int, records: int) -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server not found (apt-get install redis-server)")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="kvgate-bench-redis-")
    proc = await asyncio.create_subprocess_exec(
        binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", workdir, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    try:
        eps_a = [Endpoint(f"http://10.0.0.{i}:8000", MODEL) for i in range(4)]
        eps_b = [Endpoint(f"http://10.0.0.{i}:8000", MODEL) for i in range(4)]
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), 0.1).close()
                break
            except OSError:
                await asyncio.sleep(0.02)
        a, sync_a = await replica(url, eps_a)
        b, sync_b = await replica(url, eps_b)
        await until(lambda: sync_a.connected and sync_b.connected, 0.01)

        # request-path cost: record into the index, and the sync's share of it (routed: copy and queue)
        states = [prepared(a, request(i, tokens)) for i in range(records)]
        a.shared = None
        start = time.perf_counter()
        for i, st in enumerate(states):
            a.record(st, eps_a[i % 4])
        record_us = (time.perf_counter() - start) / records * 1e6
        a.shared = sync_a
        start = time.perf_counter()
        for i, st in enumerate(states):
            sync_a.routed(MODEL, eps_a[i % 4].url, 16, st.keys)
        routed_us = (time.perf_counter() - start) / records * 1e6
        await asyncio.sleep(0.5)  # one tick's message of all of them goes out and is applied

        # delay, one record at a time
        delays = []
        for i in range(min(records, 300)):
            st = prepared(a, request(10_000 + i, tokens))
            ep = eps_b[i % 4]
            keys = st.keys
            a.record(st, eps_a[i % 4])
            t0 = time.perf_counter()
            await until(lambda: b.index.match(keys, [ep]).get(ep, 0) == len(keys), 0)  # noqa: B023
            delays.append(time.perf_counter() - t0)

        # throughput: A records flat out, one tick per record
        applied0 = sync_b.metrics.applied.labels("blocks")._value.get()
        states = [prepared(a, request(20_000 + i, tokens)) for i in range(records)]
        start = time.perf_counter()
        for i, st in enumerate(states):
            a.record(st, eps_a[i % 4])
            await asyncio.sleep(0)
        target = applied0 + records
        await until(lambda: sync_b.metrics.applied.labels("blocks")._value.get() >= target, 0.001)
        rate = records / (time.perf_counter() - start)

        delays.sort()
        q = statistics.quantiles(delays, n=100)
        print(f"prompt {tokens} tokens ({tokens // 16} blocks), {records} records")
        print(f"request path: PrefixCache.record {record_us:.1f} us, the sync's share (routed) "
              f"{routed_us:.1f} us per request ({routed_us / record_us:.2f}x of record)")
        print(f"delay A record -> B index: p50 {q[49] * 1e3:.2f} ms, p90 {q[89] * 1e3:.2f} ms, "
              f"p99 {q[98] * 1e3:.2f} ms")
        print(f"throughput: {rate:.0f} records/s applied by B (one message per record)")
        for s in (sync_a, sync_b):
            await s.close()
    finally:
        proc.kill()
        await proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--records", type=int, default=500)
    ns = parser.parse_args()
    asyncio.run(main(ns.tokens, ns.records))

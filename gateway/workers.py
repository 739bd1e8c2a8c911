"""`kvgate serve --workers N`: N gateway processes on one port, supervised by the one that was started.

Each worker is a full `kvgate serve` (the same command line, `--workers 1`) listening on the same
port with SO_REUSEPORT, so the kernel spreads connections over their accept queues; they share
prefix learning and load as replicas do (router/replicas, Redis: `--workers` above 1 requires it).
The supervisor (this module, no event loop of the gateway's own):
- picks the port once (`--port 0`: a port it holds bound, not listening, until every worker listens);
- waits for every worker's ready line on a private pipe, then prints one `KVGATE_SERVE_READY`
  (`workers`, `pids` added);
- forwards SIGHUP (reload) to every worker, and SIGTERM/SIGINT, then exits 0 once all exited 0
  (each drains its own requests for timeouts.shutdown), non-zero otherwise;
- restarts a worker that dies on its own, at most MAX_RESTARTS times per RESTART_WINDOW_S; beyond
  that it stops the others and exits 1 (a crash loop is a bug to see, not to hide).
A worker whose supervisor is gone (SIGKILL) notices within a second and shuts down.

Metrics: any worker's `GET /metrics` answers for all of them. Each worker also serves its own
exposition on a private unix socket (in the supervisor's run directory); the worker that takes a
scrape reads its siblings' there and merges them with a `worker` label on every sample, so one
Prometheus target sees every worker (sum counters over `worker`). prometheus_client's multiprocess
mode was the alternative: it drops the gateway's scrape-time collectors (per-endpoint state, queues)
and keeps dead workers' gauges, so the merge is simpler and exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

log = logging.getLogger("kvgate.workers")

READY_FD_ENV: Final = "KVGATE_SUPERVISOR_READY_FD"  # a worker writes its ready line there
WORKER_ENV: Final = "KVGATE_SUPERVISOR_WORKER"  # "INDEX/COUNT/PARENT_PID/RUN_DIR"
MAX_RESTARTS: Final = 5
RESTART_WINDOW_S: Final = 60.0
READY_TIMEOUT_S: Final = 120.0
SIBLING_TIMEOUT_S: Final = 2.0


# ---- the worker's side --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """What a worker knows of its place: its index, how many there are, its supervisor, the run dir."""

    index: int
    count: int
    parent: int
    run_dir: Path

    @classmethod
    def from_env(cls) -> WorkerRole | None:
        raw = os.environ.get(WORKER_ENV)
        if not raw:
            return None
        index, count, parent, run_dir = raw.split("/", 3)
        return cls(int(index), int(count), int(parent), Path(run_dir))

    def socket_path(self, index: int) -> str:
        return str(self.run_dir / f"worker-{index}.sock")


def announce_ready(line: str) -> None:
    """A worker's ready line goes to the supervisor's pipe (stdout stays the access log's)."""
    fd = int(os.environ[READY_FD_ENV])
    os.write(fd, (line + "\n").encode())
    os.close(fd)


async def watch_parent(role: WorkerRole, stop: asyncio.Event) -> None:
    """Stop the worker when its supervisor is gone (it was killed: nobody would stop this one)."""
    while not stop.is_set():
        if os.getppid() != role.parent:
            log.warning("worker %d: supervisor %d is gone, shutting down", role.index, role.parent)
            stop.set()
            return
        await asyncio.sleep(1.0)


async def own_metrics_site(role: WorkerRole, registry: CollectorRegistry) -> web.AppRunner:
    """This worker's own exposition on its unix socket, for the sibling that takes a scrape."""

    async def own(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", own)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    path = role.socket_path(role.index)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a restarted worker's predecessor left it
    await web.UnixSite(runner, path).start()
    return runner


def all_workers_exposition(role: WorkerRole, registry: CollectorRegistry) -> Callable[[], Awaitable[bytes]]:
    """The /metrics body of every worker, merged (see the module docstring); for handlers' METRICS_BODY."""

    async def body() -> bytes:
        texts = await asyncio.gather(*(
            _sibling(role.socket_path(i)) if i != role.index else _own(registry) for i in range(role.count)
        ))  # fmt: skip
        merged = CollectorRegistry(auto_describe=False)
        merged.register(_Merged([(str(i), t) for i, t in enumerate(texts) if t is not None]))
        return generate_latest(merged)

    return body


async def _own(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


async def _sibling(path: str) -> str | None:
    """A sibling's exposition; None while it is down or restarting (its series are absent a scrape)."""
    try:
        timeout = aiohttp.ClientTimeout(total=SIBLING_TIMEOUT_S)
        async with (
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path), timeout=timeout) as session,
            session.get("http://worker/metrics") as resp,
        ):
            return await resp.text() if resp.status == 200 else None
    except (OSError, aiohttp.ClientError, TimeoutError):
        return None


class _Merged(Collector):
    """Families of several expositions, one per name, each sample labelled with its worker."""

    def __init__(self, texts: Sequence[tuple[str, str]]) -> None:
        self._texts = texts

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for worker, text in self._texts:
            for fam in text_string_to_metric_families(text):
                out = families.get(fam.name)
                if out is None:
                    out = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                for s in fam.samples:
                    out.samples.append(s._replace(labels={**s.labels, "worker": worker}))
        yield from families.values()


# ---- the supervisor -----------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    ready: dict = field(default_factory=dict)


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound (SO_REUSEPORT, not listening: it takes no connection) to `port`, 0 for any."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class Supervisor:
    """Runs `count` workers of `serve_argv` (the `serve ...` arguments) on `host`:`port`."""

    def __init__(self, serve_argv: Sequence[str], count: int, host: str, port: int) -> None:
        self.serve_argv = list(serve_argv)
        self.count = count
        self.host = host
        self.port = port
        self.workers = [_Worker(i) for i in range(count)]
        self.stopping = False
        self.restarts: list[float] = []
        self.run_dir = Path(tempfile.mkdtemp(prefix="kvgate-workers-"))

    async def run(self) -> int:
        reserved = reserve_port(self.host, self.port)
        self.port = reserved.getsockname()[1]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)  # each worker reloads
        try:
            started = await self._start_all(stop)
            reserved.close()
            if not started:
                return await self._shutdown(1)
            host = self.host if ":" not in self.host else f"[{self.host}]"
            ready = {**self.workers[0].ready, "url": f"http://{host}:{self.port}", "workers": self.count,
                     "pids": [w.proc.pid for w in self.workers if w.proc is not None]}
            print(f"KVGATE_SERVE_READY {orjson.dumps(ready).decode()}", flush=True)
            return await self._supervise(stop)
        finally:
            reserved.close()
            for path in self.run_dir.glob("*"):
                with contextlib.suppress(OSError):
                    path.unlink()
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()

    async def _start_all(self, stop: asyncio.Event) -> bool:
        starts = [asyncio.create_task(self._spawn(w)) for w in self.workers]
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([stopped, asyncio.gather(*starts)], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if stop.is_set():
            return False
        return all(t.result() for t in starts)

    async def _spawn(self, worker: _Worker) -> bool:
        """Start `worker` and wait for its ready line; False when it exits first or stays silent."""
        read_fd, write_fd = os.pipe()
        argv = [sys.executable, "-m", "gateway.cli", *self.serve_argv,
                "--workers", "1", "--port", str(self.port)]  # fmt: skip
        env = {**os.environ, READY_FD_ENV: str(write_fd),
               WORKER_ENV: f"{worker.index}/{self.count}/{os.getpid()}/{self.run_dir}"}  # fmt: skip
        try:
            worker.proc = await asyncio.create_subprocess_exec(*argv, env=env, pass_fds=(write_fd,))
        finally:
            os.close(write_fd)
        try:
            line = await asyncio.wait_for(asyncio.to_thread(_read_line, read_fd), READY_TIMEOUT_S)
        except TimeoutError:
            line = b""
        if not line.startswith(b"KVGATE_SERVE_READY "):
            log.error("worker %d did not start (exit %s)", worker.index, worker.proc.returncode)
            return False
        worker.ready = orjson.loads(line.split(b" ", 1)[1])
        return True

    async def _supervise(self, stop: asyncio.Event) -> int:
        while True:
            waits = {asyncio.create_task(w.proc.wait()): w for w in self.workers if w.proc is not None}
            stopped = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([stopped, *waits], return_when=asyncio.FIRST_COMPLETED)
            for t in [stopped, *waits]:
                t.cancel()
            if stop.is_set():
                return await self._shutdown(0)
            for task in done:
                worker = waits[task]
                log.error("worker %d (pid %d) exited with %s", worker.index, worker.proc.pid,
                          worker.proc.returncode)
                now = time.monotonic()
                self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW_S] + [now]
                if len(self.restarts) > MAX_RESTARTS:
                    log.error("%d worker restarts within %.0f s: stopping", len(self.restarts) - 1,
                              RESTART_WINDOW_S)
                    return await self._shutdown(1)
                if not await self._spawn(worker):
                    return await self._shutdown(1)
                log.info("worker %d restarted (pid %d)", worker.index, worker.proc.pid)

    def _forward(self, sig: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)

    async def _shutdown(self, code: int) -> int:
        """SIGTERM every worker, wait for them all; the exit code is `code`, or 1 if one failed."""
        self.stopping = True
        alive = [w.proc for w in self.workers if w.proc is not None and w.proc.returncode is None]
        for proc in alive:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        codes = await asyncio.gather(*(p.wait() for p in alive))
        return code if all(c == 0 for c in codes) else 1


def _read_line(fd: int) -> bytes:
    """One line from a pipe (blocking: run in a thread); b"" when the writer closed it first."""
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        data = b""
        while not data.endswith(b"\n"):
            chunk = pipe.read(4096)
            if not chunk:
                return data
            data += chunk
        return data


def supervise(serve_argv: Sequence[str], count: int, host: str, port: int) -> int:
    """Run the supervisor (blocking) and return its exit code."""
    return asyncio.run(Supervisor(serve_argv, count, host, port).run())

"""Child processes the bench launches (gateway, third-party routers): start, learn the URL, stop.

kvgate processes print one `<PREFIX> {json}` line on stdout once listening (so `--port 0` works);
everything else they print goes to a log file in the report folder, which is what to read when a
run fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
import orjson

CLK_TCK = os.sysconf("SC_CLK_TCK")


class ProcessError(RuntimeError):
    """A child process exited or did not become ready in time."""


def free_port() -> int:
    """A port the OS considers free now (for programs that cannot be told to use port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class ChildProcess:
    """One child started with `argv`; stdout and stderr go to `log_path` (after any READY line)."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
                 cwd: str | None = None) -> None:
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.proc: asyncio.subprocess.Process | None = None
        self._log: BinaryIO | None = None
        self._drain: asyncio.Task[None] | None = None

    async def start(self, ready_prefix: str | None, timeout_s: float) -> dict[str, Any]:
        """Start the process; with `ready_prefix`, wait for that line and return its JSON."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = await asyncio.to_thread(open, self.log_path, "ab")  # closed in stop()
        self._log.write(("$ " + " ".join(self.argv) + "\n").encode())
        self._log.flush()
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdout=asyncio.subprocess.PIPE, stderr=self._log,
            env={**os.environ, **(self.env or {})}, start_new_session=True, cwd=self.cwd,
        )
        ready: dict[str, Any] = {}
        if ready_prefix is not None:
            ready = await asyncio.wait_for(self._read_ready(ready_prefix), timeout_s)
        self._drain = asyncio.create_task(self._copy_stdout())
        return ready

    async def _read_ready(self, prefix: str) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None and self._log is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                await self.proc.wait()
                raise ProcessError(f"{self.argv[0]} exited with {self.proc.returncode} before it was ready; "
                                   f"see {self.log_path}")
            self._log.write(line)
            if line.startswith(prefix.encode()):
                self._log.flush()
                return orjson.loads(line[len(prefix):])

    async def _copy_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None and self._log is not None
        while line := await self.proc.stdout.readline():
            self._log.write(line)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `grace_s`; idempotent."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), grace_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        if self._drain is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._drain, 2.0)
            self._drain = None
        if self._log is not None:
            self._log.close()
            self._log = None


async def wait_http_ok(url: str, timeout_s: float, proc: ChildProcess | None = None,
                       json_key: str | None = None) -> None:
    """Poll GET `url` until it answers 200 (and, with `json_key`, a truthy value at that key)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last = "no answer"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while loop.time() < deadline:
            if proc is not None and not proc.alive:
                raise ProcessError(f"{proc.argv[0]} exited while starting; see {proc.log_path}")
            try:
                async with http.get(url) as resp:
                    body = await resp.read()
                    if resp.status == 200 and (json_key is None or orjson.loads(body).get(json_key)):
                        return
                    last = f"{resp.status} {body[:100]!r}"
            except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
                last = type(exc).__name__
            await asyncio.sleep(0.1)
    raise ProcessError(f"{url} not ready after {timeout_s:.0f} s (last: {last})")

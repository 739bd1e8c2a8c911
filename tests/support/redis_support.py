"""A real redis-server for the replica tests: started on a free port, killed and restarted at will.

Debian's `redis-server` (.ci/run installs it). Missing in CI is a failure naming the package; outside
CI the tests that need it are skipped with the install command (the pattern of the Prometheus test).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from pathlib import Path

from helpers import free_port, service_binary


def redis_binary() -> str:
    return service_binary(shutil.which("redis-server"), "redis-server",
                          "install Debian's redis-server package (.ci/run)", "apt-get install redis-server")


async def _pings(port: int) -> bool:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    try:
        writer.write(b"PING\r\n")
        await writer.drain()
        return (await asyncio.wait_for(reader.readline(), 1.0)) == b"+PONG\r\n"
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


class RedisServer:
    """`redis-server` on 127.0.0.1:`port`, no persistence: a restart comes back empty, as a lost
    Redis pod would."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.binary = redis_binary()
        self.port = port or free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _spawn(self) -> subprocess.Popen[bytes]:
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--protected-mode", "no", "--dir", str(self.workdir),
                "--loglevel", "warning"]  # fmt: skip
        with open(self.workdir / f"redis-{self.port}.log", "ab") as log:
            return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    async def start(self) -> RedisServer:
        self.proc = self._spawn()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10.0
        while not await _pings(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            if loop.time() > deadline:
                raise RuntimeError("redis-server did not answer PING within 10 s")
            await asyncio.sleep(0.02)
        return self

    async def kill(self) -> None:
        """SIGKILL: connections drop at once, everything stored is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait)
        self.proc = None

    async def stop(self) -> None:
        await self.kill()

    async def __aenter__(self) -> RedisServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

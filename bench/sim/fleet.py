"""Fleets of simulated pods: in this event loop (`SimFleet`) or as `kvgate sim` processes (`SimFleetProcess`).

Both take the pod options of `SimConfig` as keyword arguments, plus `per_pod` overrides (e.g. roles),
and give every pod a distinct identity (port, engine id). With a KV-event endpoint that
contains no '*', all pods connect to that one subscriber and are told apart by their topic,
`kv@<host:port>@<model>` unless `kv_events_topic` says otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any, Self

import orjson

from bench.sim.config import SimConfig
from bench.sim.pod import SimPod
from prefixindex.tokenizer import Tokenizer, load_tokenizer

READY_PREFIX = "KVGATE_SIM_READY "
FLEET_TOPIC = "kv@{host}:{port}@{model}"


def pod_configs(
    n: int, per_pod: Sequence[Mapping[str, Any]] | None, options: Mapping[str, Any]
) -> list[SimConfig]:
    """One SimConfig per pod: `options` for all, `per_pod[i]` on top for pod i."""
    if n < 1:
        raise ValueError("a fleet needs at least one pod")
    if per_pod is not None and len(per_pod) != n:
        raise ValueError(f"per_pod has {len(per_pod)} entries for {n} pods")
    base = dict(options)
    if base.get("kv_events_endpoint") and "kv_events_topic" not in base:
        base["kv_events_topic"] = FLEET_TOPIC
    configs = []
    for i in range(n):
        config = SimConfig(**{**base, **(per_pod[i] if per_pod else {})})
        config.validate()
        configs.append(config)
    return configs


def _pod_port(port_base: int, i: int) -> int:
    """Pod i's port: port_base + i, or 0 (the OS chooses) when port_base is 0."""
    return port_base + i if port_base else 0


class _Fleet:
    """What both fleets share: `urls`, and `async with` running the subclass's start() and stop()."""

    pods: Sequence[SimPod | SimProcess]

    @property
    def urls(self) -> list[str]:
        return [pod.url for pod in self.pods]

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class SimFleet(_Fleet):
    """`async with SimFleet(n, model=..., **pod options) as fleet:` n pods in the current event loop.

    `port_base` 0 lets the OS choose each port; otherwise pods take port_base, port_base+1, ...
    `fleet.pods[i]` can be stopped and started again (same port, empty cache) to simulate a restart.
    """

    def __init__(
        self,
        n: int,
        *,
        host: str = "127.0.0.1",
        port_base: int = 0,
        per_pod: Sequence[Mapping[str, Any]] | None = None,
        **options: Any,
    ) -> None:
        tokenizers: dict[str | None, Tokenizer] = {}
        self.pods: list[SimPod] = []
        for i, config in enumerate(pod_configs(n, per_pod, options)):
            if config.tokenizer not in tokenizers:  # one tokenizer per path, shared by the pods
                tokenizers[config.tokenizer] = load_tokenizer(config.tokenizer)
            tokenizer = tokenizers[config.tokenizer]
            self.pods.append(SimPod(config, host=host, port=_pod_port(port_base, i), tokenizer=tokenizer))

    def ready_infos(self) -> list[dict[str, Any]]:
        return [pod.ready_info() for pod in self.pods]

    async def start(self) -> None:
        try:
            for pod in self.pods:
                await pod.start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        for pod in self.pods:
            await pod.stop()


def config_to_args(config: SimConfig) -> list[str]:
    """`kvgate sim` flags reproducing `config` (only the options that differ from the defaults)."""
    default = SimConfig()
    args: list[str] = []
    for f in fields(SimConfig):
        value = getattr(config, f.name)
        if value == getattr(default, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, list):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    return args


class SimProcess:
    """One `kvgate sim` process serving one pod; `info` is its KVGATE_SIM_READY payload."""

    def __init__(self, config: SimConfig, host: str, port: int) -> None:
        self.config = config
        self.host = host
        self.port = port
        self.proc: asyncio.subprocess.Process | None = None
        self.info: dict[str, Any] = {}

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self, ready_within: float = 30.0) -> None:
        cmd = [sys.executable, "-m", "bench.sim.cli", "--host", self.host, "--port", str(self.port),
               "--exit-with-stdin", *config_to_args(self.config)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # stdin is a pipe only we hold: if this process dies, the pod sees EOF and exits.
        self.proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, env=env,
        )
        try:
            self.info = await asyncio.wait_for(self._read_ready(), ready_within)
        except BaseException:
            await self.kill()
            raise
        self.port = int(self.info["url"].rsplit(":", 1)[1])

    async def _read_ready(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"kvgate sim exited with {await self.proc.wait()} before it was ready")
            text = line.decode()
            if text.startswith(READY_PREFIX):
                return orjson.loads(text[len(READY_PREFIX):])

    async def kill(self) -> None:
        """SIGKILL: the pod dies at once, as a crashed pod does."""
        if self.alive:
            assert self.proc is not None
            self.proc.kill()
        await self._reap()

    async def terminate(self, grace: float = 5.0) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                self.proc.kill()
        await self._reap()

    async def _reap(self) -> None:
        if self.proc is not None:
            await self.proc.wait()
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            if self.proc.stdout is not None:
                with contextlib.suppress(Exception):
                    self.proc.stdout.feed_eof()


class SimFleetProcess(_Fleet):
    """Same arguments as SimFleet; each pod is a real `kvgate sim` subprocess that tests can kill."""

    def __init__(
        self,
        n: int,
        *,
        host: str = "127.0.0.1",
        port_base: int = 0,
        per_pod: Sequence[Mapping[str, Any]] | None = None,
        **options: Any,
    ) -> None:
        self.pods = [
            SimProcess(config, host, _pod_port(port_base, i))
            for i, config in enumerate(pod_configs(n, per_pod, options))
        ]

    def ready_infos(self) -> list[dict[str, Any]]:
        return [pod.info for pod in self.pods]

    async def kill(self, i: int) -> None:
        await self.pods[i].kill()

    async def restart(self, i: int) -> None:
        """Start pod i again on its port (after `kill`)."""
        await self.pods[i].kill()
        await self.pods[i].start()

    async def start(self) -> None:
        try:
            await asyncio.gather(*(pod.start() for pod in self.pods))
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        await asyncio.gather(*(pod.terminate() for pod in self.pods), return_exceptions=True)

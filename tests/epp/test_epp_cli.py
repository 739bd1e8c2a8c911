"""`kvgate epp` as a process: serve's flags, both listeners on ports the OS chose, the ready line,
Envoy routing through it, /metrics on its HTTP port (which proxies nothing), SIGTERM exits 0."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest
from envoy_support import Envoy, envoy_config, free_port

from bench.sim.fleet import SimFleet

MODEL = "sim-model"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


async def test_kvgate_epp_runs_behind_envoy_and_stops_on_sigterm(tmp_path: Path) -> None:
    async with SimFleet(2, model=MODEL, prefill_tps=1e6, itl_ms=1.0) as fleet:
        backends = [arg for url in fleet.urls for arg in ("--backend", url)]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "epp", *backends, "--policy", "round_robin",
            "--port", "0", "--grpc-port", "0", "--no-access-log",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            prefix, _, payload = line.decode().partition(" ")
            assert prefix == "KVGATE_EPP_READY", line
            where = orjson.loads(payload)
            host, port = where["grpc"].rsplit(":", 1)
            pods = [("127.0.0.1", pod.port) for pod in fleet.pods]
            cfg = envoy_config(listen_port=free_port(), admin_port=free_port(), epp=(host, int(port)),
                               pods=pods)
            async with Envoy(cfg, tmp_path) as envoy, aiohttp.ClientSession() as s:
                served = []
                for _ in range(2):
                    async with s.post(envoy.url + "/v1/completions",
                                      json={"model": MODEL, "prompt": "hi", "max_tokens": 2}) as r:
                        assert r.status == 200
                        served.append(r.headers["x-kvgate-endpoint"])
                assert sorted(served) == sorted(fleet.urls)  # round robin, the model found by asking
                async with s.get(where["url"] + "/metrics") as r:
                    assert 'kvgate_routing_decisions_total{policy="round_robin"' in await r.text()
                async with s.post(where["url"] + "/v1/completions", json={"model": MODEL}) as r:
                    assert r.status == 404  # the EPP's own port proxies nothing: API traffic goes via Envoy
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def test_the_shipped_envoy_config_is_valid_for_envoy(tmp_path: Path) -> None:
    """As shipped (not only as the tests rewrite its addresses): Envoy's own validation mode."""
    import subprocess

    from envoy_support import SHIPPED, envoy_binary

    result = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(SHIPPED)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "OK" in result.stdout + result.stderr, result.stderr[-2000:]

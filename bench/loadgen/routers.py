"""The routers a comparison puts in front of the fleet: the kvgate gateway with one policy, or a
third-party router. Each is a child process that exposes the OpenAI API on a URL.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.loadgen.procs import ChildProcess, free_port, wait_http_ok

GATEWAY_READY = "KVGATE_SERVE_READY "
SGLANG = "sglang_router"


@dataclass(slots=True, frozen=True)
class RouterSpec:
    """`kvgate serve --policy policy [--index index]`, or the SGLang router when policy is `sglang_router`.

    Written as `policy` or `policy/index`, e.g. `cache_aware/precise`.
    """

    policy: str
    index: str | None = None
    extra_args: tuple[str, ...] = field(default=())
    python: str = sys.executable  # the interpreter that runs the router (a venv holding sglang_router)
    sglang_policy: str = "cache_aware"  # the SGLang router's own --policy
    src: str | None = None  # kvgate: the source tree it runs from (another commit's); None: this one

    @classmethod
    def parse(cls, text: str, extra_args: Sequence[str] = ()) -> RouterSpec:
        policy, _, index = text.strip().partition("/")
        if index and index not in ("approximate", "precise"):
            raise ValueError(f"{text!r}: the index is 'approximate' or 'precise'")
        return cls(policy, index or None, tuple(extra_args))

    @property
    def name(self) -> str:
        return f"{self.policy}/{self.index}" if self.index else self.policy

    @property
    def needs_kv_events(self) -> bool:
        return self.index == "precise"


def sglang_available(python: str = sys.executable) -> bool:
    """Whether `python` can import sglang_router (blocking: call before the event loop starts)."""
    if python == sys.executable:
        return importlib.util.find_spec(SGLANG) is not None
    try:
        probe = subprocess.run([python, "-c", f"import {SGLANG}"], capture_output=True, timeout=60)
        return probe.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class RouterProcess:
    """A running router in front of `backends`; `url` is its OpenAI base URL once started."""

    def __init__(self, spec: RouterSpec, backends: Sequence[str], model: str, log_dir: Path,
                 kv_events: Sequence[str | None] = (), seed: int = 0,
                 kv_events_replay: Sequence[str | None] = ()) -> None:
        self.spec = spec
        self.url = ""
        safe = spec.name.replace("/", "-")
        if spec.policy == SGLANG:
            self._port = free_port()
            argv = [spec.python, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
                    "--port", str(self._port), "--policy", spec.sglang_policy, "--log-level", "warn",
                    *spec.extra_args, "--worker-urls", *backends]
        else:
            argv = [sys.executable, "-m", "gateway.cli", "serve", "--host", "127.0.0.1", "--port", "0",
                    "--model", model, "--policy", spec.policy, "--seed", str(seed), "--log-level", "WARNING"]
            for url in backends:
                argv += ["--backend", url]
            if spec.index:
                argv += ["--index", spec.index]
            if spec.needs_kv_events:
                if not kv_events or any(e is None for e in kv_events):
                    raise ValueError("precise routing needs every pod's KV-event endpoint")
                for endpoint in kv_events:
                    argv += ["--kv-events", str(endpoint)]
                if kv_events_replay and all(kv_events_replay):  # replay lets gaps heal without a reset
                    for endpoint in kv_events_replay:
                        argv += ["--kv-events-replay", str(endpoint)]
            argv += list(spec.extra_args)
        env = {"PYTHONUNBUFFERED": "1"}
        if spec.src is not None:  # `-m` puts the working directory first on sys.path
            env["PYTHONPATH"] = spec.src
        self.process = ChildProcess(argv, log_dir / f"router-{safe}.log", env=env, cwd=spec.src)

    async def start(self, timeout_s: float = 60.0) -> str:
        """Start and wait until it routes (kvgate: GET /ready says ready; SGLang: GET /health is 200)."""
        try:
            if self.spec.policy == SGLANG:
                await self.process.start(None, timeout_s)
                self.url = f"http://127.0.0.1:{self._port}"
                await wait_http_ok(self.url + "/health", timeout_s, self.process)
            else:
                info = await self.process.start(GATEWAY_READY.strip(), timeout_s)
                self.url = str(info["url"])
                await wait_http_ok(self.url + "/ready", timeout_s, self.process, json_key="ready")
        except BaseException:
            await self.process.stop()
            raise
        return self.url

    async def stop(self) -> None:
        await self.process.stop()

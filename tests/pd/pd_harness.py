"""The P/D test world: simulated prefill/decode pods behind recorders, a gateway in front, helpers.

Everything listens on 127.0.0.1 on OS-chosen ports; pods run in this event loop (bench.sim.SimFleet).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pd_recorder import Recorder
from prometheus_client import CollectorRegistry

from bench.sim.fleet import SimFleet
from bench.sim.pod import SimPod
from gateway.config import EndpointSpec
from gateway.pools import Pool
from gateway.state import STATE
from router.endpoint import Endpoint

MODEL = "pd-model"
# Fast pods: the tests check behaviour, not speed.
SIM_OPTIONS: dict[str, Any] = {
    "model": MODEL,
    "prefill_tps": 200_000.0,
    "itl_ms": 1.0,
    "itl_ms_per_seq": 0.0,
    "num_gpu_blocks": 4000,
    "max_model_len": 16384,
    "kv_hold_s": 5.0,
}


@dataclass(frozen=True)
class PodSpec:
    role: str  # sim role and gateway role
    version: str = ""
    gateway_role: str | None = None  # when the gateway is told something else than the pod's role


@dataclass
class PDWorld:
    """Pods (sim + recorder in front), the gateway and its registry."""

    specs: list[PodSpec]
    fleet: SimFleet
    recorders: list[Recorder]
    url: str = ""
    app: web.Application | None = None
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    @property
    def pool(self) -> Pool:
        assert self.app is not None
        return next(iter(self.app[STATE].pools))

    def endpoint(self, i: int) -> Endpoint:
        url = self.recorders[i].url
        return next(ep for ep in self.pool.endpoints if ep.url == url)

    def in_flight(self) -> int:
        """Requests the gateway counts in flight over the whole pool."""
        return sum(ep.in_flight for ep in self.pool.endpoints)

    def pod(self, i: int) -> SimPod:
        return self.fleet.pods[i]

    def version_of_engine(self, engine_id: str) -> str:
        pods = zip(self.specs, self.fleet.pods, strict=True)
        return next(spec.version for spec, pod in pods if pod.engine_id == engine_id)

    def sample(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return value or 0.0

    def outcomes(self) -> dict[str, float]:
        names = ("disaggregated", "local_short", "local_no_prefill", "fallback_prefill_failed")
        return {o: self.sample("kvgate_pd_decisions_total", model=MODEL, outcome=o) for o in names}


def endpoint_spec(rec: Recorder, spec: PodSpec, kv_events: str | None = None) -> EndpointSpec:
    role = spec.gateway_role or spec.role
    return EndpointSpec(url=rec.url, role=role, version=spec.version, kv_events=kv_events)  # type: ignore[arg-type]


def long_prompt(n_words: int, tag: str = "") -> str:
    """A prompt of about n_words tokens (the default WordTokenizer: one token a word)."""
    return " ".join(f"w{tag}{i % 97}x{i}" for i in range(n_words))

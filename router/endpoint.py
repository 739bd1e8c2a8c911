"""An upstream pod and the live state the router reads when it scores it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

Role = Literal["both", "prefill", "decode"]


@dataclass(slots=True, frozen=True)
class PeerLoad:
    """What the other gateway replicas have in flight on one pod, summed from their latest summaries
    (router/replicas); fresher than a scrape, and it says which of that work is still prefilling."""

    prefilling: int = 0  # their requests sent there whose first byte has not come back
    decoding: int = 0  # their requests past the first byte
    prefill_tokens: int = 0  # uncached prompt tokens of their prefilling requests


@dataclass(slots=True, eq=False)
class Endpoint:
    """One vLLM pod serving one model.

    Configuration fields are set once; the load fields are written by the gateway (in-flight counts)
    and by background tasks (scraper, health checker) and only read by policies, which do no I/O.
    Identity is the object itself (eq=False), so endpoints can key dicts and sets.
    """

    url: str  # base URL, e.g. http://10.0.0.5:8000 (no trailing slash)
    model: str
    role: Role = "both"
    version: str = ""
    weight: float = 1.0
    kv_events: str | None = None  # ZMQ endpoint of the pod's KV-event publisher, if any
    kv_events_replay: str | None = None

    # live state
    healthy: bool = True
    consecutive_failures: int = 0
    in_flight: int = 0  # requests the gateway has sent and not yet finished
    in_flight_tokens: int = 0  # uncached prompt tokens of those requests (prefill work in flight)
    waiting: int = 0  # vllm:num_requests_waiting, last scrape
    running: int = 0  # vllm:num_requests_running, last scrape
    kv_usage: float = 0.0  # vllm:kv_cache_usage_perc, last scrape (0..1)
    block_size: int | None = None  # from vllm:cache_config_info
    num_gpu_blocks: int | None = None  # from vllm:cache_config_info
    last_scrape: float = 0.0
    in_flight_at_scrape: int = 0  # in_flight when the last scrape was taken (other gateways' work: the rest)
    peer_load: PeerLoad | None = None  # other replicas' work there (router/replicas); None: not known
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.url

    def queue_depth(self) -> int:
        """Work queued at the pod as the gateway best knows it: the scraped queue or our own in-flight."""
        return max(self.waiting, self.in_flight - self.running)

    def mark_scraped(self) -> None:
        self.last_scrape = time.monotonic()

"""The config of replica sync (`replicas:`), decoded by gateway.config with the rest of the file.

Declared here, beside the code that reads it, so the router imports nothing from the gateway; see
config/kvgate.example.yaml for every key with an example.
"""

from __future__ import annotations

from dataclasses import dataclass

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


@dataclass(slots=True)
class ReplicasConfig:
    """How the replicas of one gateway fleet share what they learn through Redis (router/replicas)."""

    redis_url: str = ""  # required: redis://HOST:6379/0 (rediss:// for TLS, unix:///path.sock)
    # the Redis stream the fleet shares (and `<channel>:load`); another fleet (other pods): another name
    channel: str = "kvgate"
    # stream entries Redis keeps (MAXLEN ~): a replica that (re)joins replays them to warm its index
    history: int = 10000
    load_interval_s: float = 0.5  # each replica publishes its per-pod in-flight summary this often ...
    load_ttl_s: float = 2.0  # ... and a summary older than this no longer counts (its replica is gone)
    queue: int = 1024  # messages waiting for Redis; beyond, new ones are dropped and counted
    timeout_s: float = 2.0  # connecting to Redis and each command
    backoff_initial_s: float = 0.1  # after a Redis error, doubling up to backoff_max_s
    backoff_max_s: float = 5.0


def validate_replicas(r: ReplicasConfig, where: str = "replicas") -> None:
    """Cross-field checks; ValueError naming the key."""
    if not r.redis_url.startswith(REDIS_SCHEMES):
        raise ValueError(f"{where}.redis_url: expected redis://HOST:PORT[/DB] (or rediss://, unix://), "
                         f"got {r.redis_url!r}")
    if not r.channel:
        raise ValueError(f"{where}.channel: must not be empty")
    if r.history < 1 or r.queue < 1:
        raise ValueError(f"{where}: history and queue must be at least 1")
    if min(r.load_interval_s, r.timeout_s, r.backoff_initial_s) <= 0:
        raise ValueError(f"{where}: load_interval_s, timeout_s and backoff_initial_s must be positive")
    if r.load_ttl_s <= r.load_interval_s:
        raise ValueError(f"{where}.load_ttl_s must exceed load_interval_s (a live replica never expires)")
    if r.backoff_max_s < r.backoff_initial_s:
        raise ValueError(f"{where}.backoff_max_s must be at least backoff_initial_s")

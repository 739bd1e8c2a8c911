"""Configuration: the documented example, the quick-start flags, and rejection of bad configs."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from gateway.app import build_app
from gateway.config import config_from_mapping, load_config
from gateway.serve_cli import add_arguments, config_from_args, run
from gateway.state import STATE

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "kvgate.example.yaml"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_example_config_loads_with_every_section():
    config = load_config(str(EXAMPLE))
    (pool,) = config.pools
    assert pool.policy.name == "cache_aware" and pool.policy.params == {"index": "approximate"}
    assert [e.kv_events for e in pool.endpoints] == ["tcp://vllm-0:5557", "tcp://vllm-1:5557"]
    assert pool.endpoints[0].version == "v1" and pool.endpoints[1].role == "both"
    assert config.retries.on_status == [502, 503] and config.scrape.interval == 2.0


def test_quick_start_flags_build_the_same_config_object():
    args = parse(
        "--backend", "http://a:1/", "--backend", "http://b:2", "--model", "m", "--policy", "cache_aware",
        "--index", "precise", "--kv-events", "tcp://a:5557", "--kv-events", "tcp://b:5557",
        "--port", "0", "--retries", "1", "--health-interval", "0.5", "--seed", "4",
    )  # fmt: skip
    config = config_from_args(args)
    (pool,) = config.pools
    assert pool.model == "m"
    assert (pool.policy.name, pool.policy.params) == ("cache_aware", {"index": "precise"})
    assert [(e.url, e.kv_events) for e in pool.endpoints] == [
        ("http://a:1", "tcp://a:5557"),
        ("http://b:2", "tcp://b:5557"),
    ]
    assert (config.listen.port, config.retries.max_retries, config.health.interval, config.seed) == (
        0,
        1,
        0.5,
        4,
    )


def test_config_file_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"pools": {"m": {"endpoints": [{"url": "http://a:1"}]}}}))
    config = config_from_args(parse("--config", str(path), "--host", "0.0.0.0", "--port", "9"))
    assert (config.listen.host, config.listen.port) == ("0.0.0.0", 9)
    assert config.pools[0].policy.name == "least_request"
    assert config.replicas is None


def test_redis_url_flag_turns_replica_sync_on_over_the_config(tmp_path):
    path = tmp_path / "c.yaml"
    replicas = {"redis_url": "redis://old:6379/0", "channel": "fleet-a"}
    pools = {"m": {"endpoints": [{"url": "http://a:1"}]}}
    path.write_text(yaml.safe_dump({"pools": pools, "replicas": replicas}))
    config = config_from_args(parse("--config", str(path), "--redis-url", "redis://new:6379/1"))
    assert config.replicas is not None
    assert (config.replicas.redis_url, config.replicas.channel) == ("redis://new:6379/1", "fleet-a")
    quick = config_from_args(parse("--backend", "http://a:1", "--model", "m", "--redis-url", "redis://r:1"))
    assert quick.replicas is not None and quick.replicas.redis_url == "redis://r:1"


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({}, "pools"),
        ({"pools": {"m": {"endpoints": []}}}, "at least one endpoint"),
        ({"pools": {"m": {"endpoints": [{"url": "a:1"}]}}}, "http"),
        ({"pools": {"m": {"endpoints": [{"url": "http://a", "role": "boss"}]}}}, "role"),
        ({"pools": {"m": {"endpoints": [{"url": "http://a", "wieght": 2}]}}}, "wieght"),
        ({"pools": {"m": {"endpoints": [{"url": "http://a"}]}}, "health": {"interval": "1s"}}, "interval"),
        (
            {"pools": {"m": {"endpoints": [{"url": "http://a"}]}}, "retries": {"max_retries": -1}},
            "max_retries",
        ),
        ({"pools": {"m": {"endpoints": [{"url": "http://a"}]}}, "listen": {"port": True}}, "port"),
        ({"pools": {"m": {"endpoints": [{"url": "http://a"}]}}, "replicas": {"channel": "x"}}, "redis_url"),
        (
            {"pools": {"m": {"endpoints": [{"url": "http://a"}]}},
             "replicas": {"redis_url": "redis://r:6379", "load_interval_s": 2.0, "load_ttl_s": 2.0}},
            "load_ttl_s",
        ),
    ],
)
def test_bad_configs_name_the_problem(data, match):
    with pytest.raises(ValueError, match=match):
        config_from_mapping(data)


@pytest.mark.parametrize(
    "argv",
    [
        ["--backend", "http://a:1", "--model", "m", "--kv-events", "tcp://a:1", "--kv-events", "tcp://b:1"],
        ["--model", "m"],
        ["--backend", "http://a:1", "--model", "m", "--policy", "session", "--index", "precise"],
    ],
)
def test_serve_refuses_bad_flags_with_a_message(argv, capsys):
    args = parse(*argv)
    assert run(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvgate serve: ") and "Traceback" not in err


def test_example_config_builds_a_gateway():
    """The Dockerfile's default config must start: every pool's policy builds from its params."""
    app = build_app(load_config(str(EXAMPLE)))
    pool = app[STATE].pools.get("meta-llama/Llama-3.1-8B-Instruct")
    assert pool is not None and pool.policy_name == "cache_aware" and pool.prefix_cache is not None
    assert [ep.kv_events_replay for ep in pool.endpoints] == ["tcp://vllm-0:5558", "tcp://vllm-1:5558"]


@pytest.mark.parametrize(
    ("section", "key", "bad", "edge"),
    [
        ("health", "eject_after", 0, 1),
        ("health", "panic_threshold", 1.01, 1.0),
        ("health", "interval", 0, 0.5),  # edge: the health timeout (0.5) may equal the interval
        ("scrape", "interval", -0.1, 0),
        ("listen", "port", 65536, 65535),
        ("retries", "max_retries", -1, 0),
        ("tracing", "sample_ratio", -0.01, 0.0),
    ],
)
def test_bounds_declared_on_the_types_hold_at_their_edge_and_fail_past_it(section, key, bad, edge):
    base = {"pools": {"m": {"endpoints": [{"url": "http://a"}]}}}
    config = config_from_mapping({**base, section: {key: edge}})
    assert getattr(getattr(config, section), key) == edge
    with pytest.raises(ValueError, match=rf"^{section}\.{key}: must be "):
        config_from_mapping({**base, section: {key: bad}})


def test_a_flag_out_of_bounds_is_refused_like_the_same_key_in_the_file():
    with pytest.raises(ValueError, match=r"health\.interval: must be > 0"):
        config_from_args(parse("--backend", "http://a:1", "--model", "m", "--health-interval", "0"))
    with pytest.raises(ValueError, match=r"timeouts\.connect: must be > 0"):
        config_from_args(parse("--backend", "http://a:1", "--model", "m", "--connect-timeout", "-1"))

"""`kvgate serve`: run the gateway from a YAML config or from quick-start flags.

Once listening it prints one line to stdout, `KVGATE_SERVE_READY {"url": ...}`, so launchers using
`--port 0` learn the OS-chosen port. SIGTERM/SIGINT stop accepting connections and let in-flight
requests finish for up to timeouts.shutdown seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import get_args

import aiohttp
import orjson
from aiohttp import web

from gateway.app import build_app
from gateway.config import (
    EndpointSpec,
    GatewayConfig,
    PDSpec,
    PolicySpec,
    PoolSpec,
    Role,
    load_config,
)
from router.registry import POLICIES, PolicyError

log = logging.getLogger("kvgate.serve")
READY_PREFIX = "KVGATE_SERVE_READY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (see config/kvgate.example.yaml)")
    parser.add_argument("--host", help="listen address (overrides the config; default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port, 0 for any free one (default 8080)")
    quick = parser.add_argument_group("quick start (one pool, instead of --config)")
    quick.add_argument(
        "--backend",
        action="append",
        default=[],
        metavar="URL[#role=R,version=V]",
        help="a pod; repeat. P/D: role prefill|decode|both (default both) and version, e.g. "
        "http://p0:8000#role=prefill,version=v1",
    )
    quick.add_argument("--model", help="model name served by the backends (default: ask the first one)")
    quick.add_argument("--policy", default="least_request", choices=sorted(POLICIES))
    quick.add_argument("--index", choices=["approximate", "precise"], help="cache_aware: prefix index kind")
    quick.add_argument(
        "--kv-events", action="append", default=[], metavar="ENDPOINT", help="per backend, same order"
    )
    quick.add_argument("--kv-events-replay", action="append", default=[], metavar="ENDPOINT")
    quick.add_argument("--tokenizer", help="HuggingFace tokenizer dir for cache-aware routing")
    quick.add_argument("--block-size", type=int)
    pd = parser.add_argument_group("prefill/decode disaggregation (quick start; with prefill backends)")
    pd.add_argument("--pd-threshold-tokens", type=int, help="uncached prompt tokens worth a prefill pod")
    pd.add_argument("--pd-prefill-timeout", type=float, help="seconds before falling back to local prefill")
    pd.add_argument(
        "--pd-compatible",
        action="append",
        default=[],
        metavar="DECODE_V=PREFILL_V[,...]",
        help="decode pods of DECODE_V also read KV from these prefill versions; repeat",
    )
    tune = parser.add_argument_group("tuning (override the config)")
    tune.add_argument("--retries", type=int, help="extra attempts on other pods")
    tune.add_argument("--health-interval", type=float)
    tune.add_argument("--scrape-interval", type=float, help="seconds; 0 disables scraping")
    tune.add_argument("--connect-timeout", type=float)
    tune.add_argument("--read-timeout", type=float)
    tune.add_argument("--shutdown-timeout", type=float)
    tune.add_argument("--max-body-bytes", type=int)
    tune.add_argument("--api-keys-file")
    tune.add_argument("--api-keys-env", help="environment variable with comma-separated keys")
    tune.add_argument("--seed", type=int, help="seed for the policies' random choices")
    parser.add_argument("--log-level", default="INFO")


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    """The config file with flag overrides, or a one-pool config built from the quick-start flags."""
    if args.config:
        if args.backend:
            raise ValueError("use either --config or --backend, not both")
        config = load_config(args.config)
    else:
        if not args.backend:
            raise ValueError("give --config FILE or at least one --backend URL")
        config = GatewayConfig(pools=[quick_pool(args)])
    _apply_overrides(config, args)
    return config


def quick_pool(args: argparse.Namespace) -> PoolSpec:
    n = len(args.backend)
    for flag, values in (("--kv-events", args.kv_events), ("--kv-events-replay", args.kv_events_replay)):
        if values and len(values) != n:
            raise ValueError(f"{flag} must be given once per --backend ({n}), got {len(values)}")
    params = {"index": args.index} if args.index else {}
    endpoints = []
    for i, backend in enumerate(args.backend):
        url, role, version = parse_backend(backend)
        endpoints.append(
            EndpointSpec(
                url=url,
                role=role,
                version=version,
                kv_events=args.kv_events[i] if args.kv_events else None,
                kv_events_replay=args.kv_events_replay[i] if args.kv_events_replay else None,
            )
        )
    return PoolSpec(
        model=args.model,
        endpoints=endpoints,
        policy=PolicySpec(args.policy, params),
        tokenizer=args.tokenizer,
        block_size=args.block_size,
        pd=pd_spec(args),
    )


def parse_backend(value: str) -> tuple[str, Role, str]:
    """`URL[#role=R,version=V]` -> (url, role, version); ValueError naming a bad suffix."""
    url, _, suffix = value.partition("#")
    role, version = "both", ""
    for item in filter(None, (part.strip() for part in suffix.split(","))):
        key, sep, val = item.partition("=")
        if not sep or key not in ("role", "version"):
            raise ValueError(f"--backend {value!r}: expected URL#role=R,version=V, got {item!r}")
        if key == "role":
            if val not in get_args(Role):
                raise ValueError(f"--backend {value!r}: role must be one of {list(get_args(Role))}")
            role = val
        else:
            version = val
    return url, role, version  # type: ignore[return-value]


def pd_spec(args: argparse.Namespace) -> PDSpec | None:
    """The pool's `pd:` settings from the flags; None when none is given (defaults then apply)."""
    if args.pd_threshold_tokens is None and args.pd_prefill_timeout is None and not args.pd_compatible:
        return None
    spec = PDSpec()
    if args.pd_threshold_tokens is not None:
        spec.threshold_tokens = args.pd_threshold_tokens
    if args.pd_prefill_timeout is not None:
        spec.prefill_timeout_s = args.pd_prefill_timeout
    for item in args.pd_compatible:
        decode, sep, prefills = item.partition("=")
        if not sep or not decode:
            raise ValueError(f"--pd-compatible {item!r}: expected DECODE_V=PREFILL_V[,...]")
        spec.compatibility.setdefault(decode, []).extend(v for v in prefills.split(",") if v)
    return spec


def _apply_overrides(c: GatewayConfig, a: argparse.Namespace) -> None:
    overrides = [
        (a.host, c.listen, "host"),
        (a.port, c.listen, "port"),
        (a.retries, c.retries, "max_retries"),
        (a.health_interval, c.health, "interval"),
        (a.scrape_interval, c.scrape, "interval"),
        (a.connect_timeout, c.timeouts, "connect"),
        (a.read_timeout, c.timeouts, "read"),
        (a.shutdown_timeout, c.timeouts, "shutdown"),
        (a.max_body_bytes, c.limits, "max_body_bytes"),
        (a.api_keys_file, c.auth, "api_keys_file"),
        (a.api_keys_env, c.auth, "api_keys_env"),
        (a.seed, c, "seed"),
    ]
    for value, section, name in overrides:
        if value is not None:
            setattr(section, name, value)
    c.__post_init__()  # re-validate with the overrides


async def discover_model(url: str) -> str:
    """The first model a backend lists at /v1/models (quick start without --model)."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(url.rstrip("/") + "/v1/models") as resp,
    ):
        resp.raise_for_status()
        data = orjson.loads(await resp.read())
    return str(data["data"][0]["id"])


async def serve(config: GatewayConfig) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully."""
    app = build_app(config)
    runner = web.AppRunner(
        app, handler_cancellation=True, shutdown_timeout=config.timeouts.shutdown, access_log=None
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.listen.host, config.listen.port, backlog=2048)
        await site.start()
        host, port = runner.addresses[0][:2]
        url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
        ready = {"url": url, "models": [p.model for p in config.pools]}
        print(f"{READY_PREFIX} {orjson.dumps(ready).decode()}", flush=True)
        log.info("kvgate listening on %s", url)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down: finishing in-flight requests (up to %.0f s)", config.timeouts.shutdown)
    finally:
        await runner.cleanup()


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # uvloop is not available on every platform
        runner = asyncio.run
    try:
        if not args.config and args.backend and not args.model:
            args.model = runner(discover_model(parse_backend(args.backend[0])[0]))
        config = config_from_args(args)
        runner(serve(config))
    except (ValueError, PolicyError, OSError, aiohttp.ClientError) as exc:
        print(f"kvgate serve: {exc}", file=sys.stderr)
        return 2
    return 0

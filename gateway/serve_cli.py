"""`kvgate serve`: run the gateway from a YAML config or from quick-start flags.

Once listening it prints one line to stdout, `KVGATE_SERVE_READY {"url": ...}`, so launchers using
`--port 0` learn the OS-chosen port. SIGTERM/SIGINT stop accepting connections and let in-flight
requests finish for up to timeouts.shutdown seconds. SIGHUP (and, with --config, a change of the
file) reloads the config as it was read at startup, flags and KVGATE_* variables included
(gateway/reload.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, get_args

import aiohttp
import orjson
from aiohttp import web

from gateway.access_log import TEXT_FORMAT, setup_logging
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
from gateway.handlers import METRICS_BODY
from gateway.reload import RELOADER, ConfigSource
from gateway.replicas import check_replicas
from gateway.runner import app_runner, freeze_startup_heap
from gateway.state import STATE
from gateway.workers import (
    WorkerRole,
    all_workers_exposition,
    announce_ready,
    own_metrics_site,
    supervise,
    watch_parent,
)
from router.prefix_cache import DEFAULT_BLOCK_SIZE
from router.registry import POLICIES, PolicyError
from router.replicas.config import ReplicasConfig

log = logging.getLogger("kvgate.serve")
READY_PREFIX = "KVGATE_SERVE_READY"


ENV_PREFIX = "KVGATE_"
PRECEDENCE = (
    "Each flag may come from its KVGATE_* environment variable instead (repeated flags: values separated "
    "by spaces). A flag on the command line wins over its variable, both win over --config, and the "
    "defaults shown apply when none of them sets a value."
)


def env_name(flag: str) -> str:
    """`--kv-events-replay` -> `KVGATE_KV_EVENTS_REPLAY`."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


class _Repeat(argparse.Action):
    """`append`, except that values on the command line replace a default (taken from the environment)
    instead of adding to it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        items = getattr(namespace, self.dest)
        setattr(namespace, self.dest, [*([] if items is self.default else items), values])


class _EnvFlags:
    """Adds flags that also read a KVGATE_* variable: the variable's value becomes the flag's default
    (checked like a command-line value: a bad one is a usage error naming it), and the help line names
    the variable and the default in force."""

    def __init__(self, parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
        self.parser = parser
        self.environ = environ

    def add(self, group: argparse._ActionsContainer, flag: str, help_text: str, *, shown: object = None,
            repeat: bool = False, **kwargs: Any) -> None:
        """`shown` describes the default when the flag itself has none (the config's value applies);
        `repeat` makes a flag given once per value (its variable: values separated by spaces)."""
        name = env_name(flag)
        if repeat:
            kwargs.update(action=_Repeat, default=[])
        action = group.add_argument(flag, **kwargs)
        raw = self.environ.get(name, "").strip()
        if raw:  # an empty variable counts as unset
            try:
                values = [_convert(action, v) for v in raw.split()] if repeat else _convert(action, raw)
            except (TypeError, ValueError) as exc:
                self.parser.error(f"{name}={raw!r}: {exc}")
            action.default = values
        if action.default not in (None, []):
            default = " ".join(action.default) if repeat else "%(default)s"
        else:
            default = "none" if shown is None else str(shown)
        action.help = f"{help_text} (default: {default}; env {name})"


def _convert(action: argparse.Action, raw: str) -> Any:
    if isinstance(action, argparse.BooleanOptionalAction):
        return _switch(raw)
    value = action.type(raw) if callable(action.type) else raw
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"expected one of {', '.join(map(str, action.choices))}")
    return value


def _switch(raw: str) -> bool:
    """A switch's variable: true/false, 1/0, yes/no, on/off."""
    value = raw.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def add_arguments(parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None) -> None:
    """The serve flags, with defaults from `environ` (os.environ by default)."""
    add = _EnvFlags(parser, os.environ if environ is None else environ).add
    d = GatewayConfig(pools=[])  # the built-in defaults a config file starts from
    parser.description = f"run the gateway. {PRECEDENCE}"
    add(parser, "--config", "YAML config file (see config/kvgate.example.yaml)",
        shown="none: the quick-start flags")
    add(parser, "--host", "listen address", shown=d.listen.host)
    add(parser, "--port", "listen port, 0 for any free one", type=int, shown=d.listen.port)
    quick = parser.add_argument_group("quick start (one pool, instead of --config)")
    add(quick, "--backend",
        "a pod; repeat. P/D: role prefill|decode|both (default both) and version, e.g. "
        "http://p0:8000#role=prefill,version=v1", repeat=True, metavar="URL[#role=R,version=V]")
    add(quick, "--model", "model name served by the backends", shown="the first one the first backend lists")
    add(quick, "--policy", "routing policy", default="least_request", choices=sorted(POLICIES))
    add(quick, "--index", "cache_aware: prefix index kind", choices=["approximate", "precise"],
        shown="approximate")
    add(quick, "--kv-events", "precise index: a pod's KV-events ZMQ endpoint, once per --backend in "
        "the same order", repeat=True, metavar="ENDPOINT")
    add(quick, "--kv-events-replay", "a pod's KV-events replay endpoint, once per --backend", repeat=True,
        metavar="ENDPOINT")
    add(quick, "--adapter", "a LoRA adapter the backends serve on top of --model; repeat (more are "
        "learned from their /v1/models)", repeat=True, metavar="NAME")
    add(quick, "--tokenizer", "the model's tokenizer for cache-aware routing: a local dir (tokenizer.json, "
        "chat template) or a HuggingFace repo id already in the local HF cache (org/name[@rev]; offline)",
        shown="a built-in word tokenizer")
    add(quick, "--tokenizer-workers", "cache_aware: threads tokenizing prompts off the event loop, batching "
        "what arrives together; 0 tokenizes on the loop", type=int, shown="1")
    add(quick, "--block-size", "tokens per KV block for cache-aware routing", type=int,
        shown=f"what the pods report, else {DEFAULT_BLOCK_SIZE}")
    pd = parser.add_argument_group("prefill/decode disaggregation (quick start; with prefill backends)")
    pd_defaults = PDSpec()
    add(pd, "--pd-threshold-tokens", "uncached prompt tokens worth a prefill pod", type=int,
        shown=pd_defaults.threshold_tokens)
    add(pd, "--pd-prefill-timeout", "seconds before falling back to local prefill", type=float,
        shown=pd_defaults.prefill_timeout_s)
    add(pd, "--pd-compatible", "decode pods of DECODE_V also read KV from these prefill versions; repeat",
        repeat=True, metavar="DECODE_V=PREFILL_V[,...]", shown="equal versions only")
    tune = parser.add_argument_group("tuning (override the config)")
    add(tune, "--retries", "extra attempts on other pods", type=int, shown=d.retries.max_retries)
    add(tune, "--health-interval", "seconds between active health checks of a pod", type=float,
        shown=d.health.interval)
    add(tune, "--scrape-interval", "seconds between /metrics scrapes of a pod; 0 disables scraping",
        type=float, shown=d.scrape.interval)
    add(tune, "--connect-timeout", "seconds to open a connection to a pod", type=float,
        shown=d.timeouts.connect)
    add(tune, "--read-timeout", "longest silence from a pod, seconds", type=float, shown=d.timeouts.read)
    add(tune, "--shutdown-timeout", "seconds in-flight requests may run on after SIGTERM", type=float,
        shown=d.timeouts.shutdown)
    add(tune, "--client-body-timeout", "longest silence from a client sending its body, seconds (408)",
        type=float, shown=d.timeouts.client_body)
    add(tune, "--max-body-bytes", "largest request body accepted", type=int, shown=d.limits.max_body_bytes)
    add(tune, "--api-keys-file", "file of accepted API keys, one a line", shown="no API keys: open")
    add(tune, "--api-keys-env", "environment variable with comma-separated API keys",
        shown="no API keys: open")
    add(tune, "--seed", "seed for the policies' random choices", type=int, shown="random")
    scale = parser.add_argument_group("scale out")
    add(scale, "--redis-url", "replicas share prefix learning and load through this Redis "
        "(replicas.redis_url; needs the redis extra)", metavar="redis://HOST:PORT[/DB]",
        shown="none: each replica learns alone")
    add(scale, "--workers", "gateway processes on the one port (SO_REUSEPORT), supervised by this one; "
        "above 1 needs --redis-url (they share state as replicas do)", type=int, default=1)
    add(parser, "--log-level", "Python logging level", default="INFO")
    add(parser, "--access-log", "one line per request on stdout (logs.access)",
        action=argparse.BooleanOptionalAction, shown="on")
    add(parser, "--log-format", "access log and gateway log (stderr) format (logs.format)",
        choices=["json", "text"], shown=d.logs.format)


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
    params: dict[str, Any] = {"index": args.index} if args.index else {}
    if args.tokenizer_workers is not None:
        params["tokenizer_workers"] = args.tokenizer_workers
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
        adapters=list(args.adapter),
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
        (a.client_body_timeout, c.timeouts, "client_body"),
        (a.max_body_bytes, c.limits, "max_body_bytes"),
        (a.api_keys_file, c.auth, "api_keys_file"),
        (a.api_keys_env, c.auth, "api_keys_env"),
        (a.seed, c, "seed"),
        (a.access_log, c.logs, "access"),
        (a.log_format, c.logs, "format"),
    ]
    for value, section, name in overrides:
        if value is not None:
            setattr(section, name, value)
    if a.redis_url:
        c.replicas = c.replicas or ReplicasConfig()
        c.replicas.redis_url = a.redis_url
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


async def serve(config: GatewayConfig, source: ConfigSource | None = None) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully; SIGHUP reloads the config from `source`."""
    app = build_app(config, source=source)
    role = WorkerRole.from_env()  # one of `--workers N` (gateway/workers.py), or None
    registry = app[STATE].metrics.registry
    if role is not None:
        app[METRICS_BODY] = all_workers_exposition(role, registry)
    runner = app_runner(
        app, handler_cancellation=True, shutdown_timeout=config.timeouts.shutdown, access_log=None
    )
    await runner.setup()
    own_metrics: web.AppRunner | None = None
    try:
        site = web.TCPSite(runner, config.listen.host, config.listen.port, backlog=2048,
                           reuse_port=role is not None)
        await site.start()
        host, port = runner.addresses[0][:2]
        url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
        ready = {"url": url, "models": [p.model for p in config.pools]}
        stop = asyncio.Event()
        freeze_startup_heap()
        if role is not None:
            own_metrics = await own_metrics_site(role, registry)
            announce_ready(f"{READY_PREFIX} {orjson.dumps(ready).decode()}")
            watcher = asyncio.create_task(watch_parent(role, stop))
        else:
            print(f"{READY_PREFIX} {orjson.dumps(ready).decode()}", flush=True)
        log.info("kvgate listening on %s", url)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, app[RELOADER].trigger, "SIGHUP")
        await stop.wait()
        if role is not None:
            watcher.cancel()
        log.info("shutting down: finishing in-flight requests (up to %.0f s)", config.timeouts.shutdown)
    finally:
        await runner.cleanup()
        if own_metrics is not None:
            await own_metrics.cleanup()


def run_workers(args: argparse.Namespace, config: GatewayConfig) -> int:
    """`--workers N`: the supervisor of N workers (gateway/workers.py); they need replica sync."""
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, not {args.workers}")
    if config.replicas is None:
        raise ValueError(f"--workers {args.workers} needs --redis-url (or a replicas: section): the "
                         "workers share prefix learning and load through Redis as replicas do")
    check_replicas()  # the redis extra: its one-line hint now, not once per worker
    argv = getattr(args, "command_argv", None) or sys.argv[1:]
    return supervise(argv, args.workers, config.listen.host, config.listen.port)


Runner = Callable[[Coroutine[Any, Any, Any]], Any]


def loop_runner() -> Runner:
    """uvloop.run where uvloop is installed (not on every platform), else asyncio.run."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


def startup_config(args: argparse.Namespace, runner: Runner) -> GatewayConfig:
    """The config of `serve` and `epp`: quick start without --model asks the first backend its model."""
    if not args.config and args.backend and not args.model:
        args.model = runner(discover_model(parse_backend(args.backend[0])[0]))
    return config_from_args(args)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format=TEXT_FORMAT)
    runner = loop_runner()
    try:
        config = startup_config(args, runner)
        if args.workers != 1:
            return run_workers(args, config)
        listener = setup_logging(args.log_level, config.logs.format)  # off the event loop from here on
        try:
            runner(serve(config, ConfigSource(lambda: config_from_args(args), args.config)))
        finally:
            listener.stop()
    except (ValueError, PolicyError, OSError, aiohttp.ClientError) as exc:
        print(f"kvgate serve: {exc}", file=sys.stderr)
        return 2
    return 0

"""`kvgate epp`: the gateway's routing behind Envoy, as its ext_proc endpoint picker.

Takes every `kvgate serve` flag (the same config, pools and policies; `--host`/`--port` are the HTTP
listener for /metrics, /health, /ready) plus the gRPC listener Envoy's ext_proc filter connects to.
Once both listen, stdout gets one line `KVGATE_EPP_READY {"grpc": "HOST:PORT", "url": "http://..."}`.
Needs the `epp` extra (grpcio, xds-protos): without it, one line says so (gateway.cli).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import aiohttp
import orjson

from gateway import serve_cli
from gateway.access_log import TEXT_FORMAT, setup_logging
from gateway.epp.server import DEFAULT_GRPC_PORT, RunningEpp, serve_epp
from gateway.reload import ConfigSource
from router.registry import PolicyError

READY_PREFIX = "KVGATE_EPP_READY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    serve_cli.add_arguments(parser)
    parser.description = ("serve the gateway's routing to Envoy as an ext_proc endpoint picker "
                          f"(Gateway API Inference Extension). {serve_cli.PRECEDENCE}")
    add = serve_cli._EnvFlags(parser, os.environ).add
    epp = parser.add_argument_group("endpoint picker (Envoy ext_proc)")
    add(epp, "--grpc-host", "gRPC listen address for Envoy", shown="--host")
    add(epp, "--grpc-port", "gRPC listen port for Envoy, 0 for any free one", type=int,
        default=DEFAULT_GRPC_PORT)
    add(epp, "--fallbacks", "pods listed after the pick, for Envoy's retries", type=int, default=2)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format=TEXT_FORMAT)
    runner = serve_cli.loop_runner()
    try:
        config = serve_cli.startup_config(args, runner)
        if args.fallbacks < 0:
            raise ValueError("--fallbacks must be 0 or more")
        if args.workers != 1:
            raise ValueError("--workers is for kvgate serve: run more kvgate epp replicas (with "
                             "--redis-url) behind Envoy instead")
        listener = setup_logging(args.log_level, config.logs.format)
        grpc_host = args.grpc_host or config.listen.host
        try:
            source = ConfigSource(lambda: serve_cli.config_from_args(args), args.config)
            runner(serve_epp(config, grpc_host=grpc_host, grpc_port=args.grpc_port,
                             fallbacks=args.fallbacks, ready=_print_ready, source=source))
        finally:
            listener.stop()
    except (ValueError, PolicyError, OSError, aiohttp.ClientError, RuntimeError) as exc:
        print(f"kvgate epp: {exc}", file=sys.stderr)
        return 2
    return 0


def _print_ready(where: RunningEpp) -> None:
    print(f"{READY_PREFIX} {orjson.dumps({'grpc': where.grpc, 'url': where.url}).decode()}", flush=True)

"""`kvgate sim`: run simulated vLLM pod(s) until SIGINT/SIGTERM.

Each pod prints one line when it listens, so launchers learn OS-chosen ports:
    KVGATE_SIM_READY {"url": ..., "model": ..., "kv_events": ..., "kv_events_replay": ..., "role": ...,
                      "engine_id": ..., "topic": ...}
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import types
import typing
from dataclasses import MISSING, fields
from typing import Any

import orjson

from bench.sim.config import ROLES, SimConfig
from bench.sim.fleet import FLEET_TOPIC, READY_PREFIX, SimFleet, SimFleetProcess


def _arg_type(name: str) -> Any:
    hint = typing.get_type_hints(SimConfig)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and args:
        hint = args[0]
    if typing.get_origin(hint) is typing.Literal:
        return str
    return hint if hint in (int, float, str, bool) else str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (0: the OS chooses)")
    parser.add_argument("--pods", type=int, default=1, help="pods to run")
    parser.add_argument(
        "--processes", action="store_true",
        help="with --pods N: one `kvgate sim` process per pod (uses more cores) instead of one process",
    )
    parser.add_argument(
        "--port-base", type=int, default=None,
        help="with --pods N: ports port-base .. port-base+N-1, 0: the OS chooses each (default: --port)",
    )
    parser.add_argument("--log-level", default="WARNING", help="Python logging level")
    parser.add_argument(
        "--exit-with-stdin", action="store_true",
        help="stop when stdin reaches EOF (launchers pass a pipe, so pods never outlive them)",
    )
    for f in fields(SimConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not MISSING else None
        kind = _arg_type(f.name)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif f.name == "lora_modules":
            parser.add_argument(flag, nargs="+", default=[], metavar="NAME[=PATH]", help=help_text)
        elif f.name == "role":
            parser.add_argument(flag, choices=ROLES, default=default, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=default, help=help_text)


def config_from_args(args: argparse.Namespace) -> SimConfig:
    config = SimConfig(**{f.name: getattr(args, f.name) for f in fields(SimConfig)})
    config.validate()
    return config


async def serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    options = {f.name: getattr(config, f.name) for f in fields(SimConfig)}
    if args.pods > 1 and config.kv_events_endpoint and config.kv_events_topic == "":
        options["kv_events_topic"] = FLEET_TOPIC
    port_base = args.port if args.port_base is None else args.port_base
    if args.pods > 1 and config.engine_id:
        raise ValueError("--engine-id names one pod; leave it out with --pods")
    fleet: SimFleet | SimFleetProcess
    if args.processes and args.pods > 1:
        fleet = SimFleetProcess(args.pods, host=args.host, port_base=port_base, **options)
    else:
        fleet = SimFleet(args.pods, host=args.host, port_base=port_base, **options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if args.exit_with_stdin:
        fd = sys.stdin.fileno()

        def on_stdin() -> None:
            if not os.read(fd, 4096):  # EOF: the launcher is gone
                loop.remove_reader(fd)
                stop.set()

        loop.add_reader(fd, on_stdin)
    async with fleet:
        for info in fleet.ready_infos():
            sys.stdout.write(READY_PREFIX + orjson.dumps(info).decode() + "\n")
        sys.stdout.flush()
        await stop.wait()
    return 0


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        import uvloop

        run_loop = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        run_loop = asyncio.run
    try:
        return run_loop(serve(args))
    except ValueError as exc:
        print(f"kvgate sim: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.sim.cli`, as launchers run pods: the same options and help as `kvgate sim`."""
    from gateway.cli import HelpFormatter

    parser = argparse.ArgumentParser(
        prog="kvgate sim", description="run simulated vLLM pod(s)", formatter_class=HelpFormatter
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""The `kvgate` command: one subcommand per job, each module imported only when it runs.

A subcommand whose optional dependencies are not installed (`kvgate sim` without the `sim` extra,
`kvgate bench` without `bench`, `kvgate epp` without `epp`) prints one line naming the extra to
install and exits with 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, help). Each module exposes add_arguments(parser) and run(args) -> int.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "sim": ("bench.sim.cli", "run simulated vLLM pod(s)"),
    "serve": ("gateway.serve_cli", "run the gateway"),
    "epp": ("gateway.epp.cli", "run the gateway's routing as an Envoy endpoint picker (ext_proc)"),
    "bench": ("bench.cli", "compare routing policies on a simulated fleet"),
}
# Top-level modules of the optional dependencies -> the pyproject extra that installs them (the first
# extra listing them; tests/test_cli_optional_deps.py keeps this in step with pyproject.toml).
OPTIONAL_MODULES: dict[str, str] = {
    "msgpack": "sim",
    "numpy": "bench",
    "matplotlib": "bench",
    "locust": "bench",
    "kubernetes_asyncio": "kubernetes",
    "redis": "redis",
    "grpc": "epp",  # grpcio
    "envoy": "epp",  # xds-protos: Envoy's generated protobufs
    "grpc_health": "epp",  # grpcio-health-checking
}
EXIT_USAGE = 2


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends `(default: X)` only where X means something to a user: not for an unset (None) default,
    an empty list or a flag that only switches something on; such options state their default in their
    help text. `--x/--no-x` switches show theirs."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        switch = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)
        if default is None or default == [] or switch:
            return action.help
        if default == "" and action.help and "%(default)" not in action.help:
            return action.help + " (default: '')"
        return super()._get_help_string(action)


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """The one-line message for an optional dependency that is not installed; None for anything else."""
    top = (exc.name or "").partition(".")[0]
    extra = OPTIONAL_MODULES.get(top)
    if extra is None:
        return None
    return f"needs the optional package {top!r}: pip install 'kvgate[{extra}]'"


def subcommand_parser(name: str, module: object) -> argparse.ArgumentParser:
    """The argument parser of subcommand `name`, filled by its module's add_arguments."""
    parser = argparse.ArgumentParser(
        prog=f"kvgate {name}", description=SUBCOMMANDS[name][1], formatter_class=HelpFormatter
    )
    module.add_arguments(parser)  # type: ignore[attr-defined]
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="kvgate", description="KV-cache-aware inference gateway")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv[:1] or ["--help"])
        return EXIT_USAGE
    name = argv[0]
    try:
        module = importlib.import_module(SUBCOMMANDS[name][0])
        args = subcommand_parser(name, module).parse_args(argv[1:])
        args.command_argv = argv  # e.g. `kvgate serve --workers N` starts its workers with the same line
        return int(module.run(args) or 0)
    except ModuleNotFoundError as exc:
        message = missing_extra(exc)
        if message is None:
            raise
        print(f"kvgate {name}: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

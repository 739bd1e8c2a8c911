"""The `kvgate` command: one subcommand per job, each module imported only when it runs."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, help). Each module exposes add_arguments(parser) and run(args) -> int.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "sim": ("bench.sim.cli", "run simulated vLLM pod(s)"),
    "serve": ("gateway.serve_cli", "run the gateway"),
    "bench": ("bench.cli", "compare routing policies on a simulated fleet"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="kvgate", description="KV-cache-aware inference gateway")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv[:1] or ["--help"])
        return 2
    name = argv[0]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    cmd_parser = argparse.ArgumentParser(
        prog=f"kvgate {name}",
        description=SUBCOMMANDS[name][1],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

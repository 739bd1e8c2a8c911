"""`kvgate serve|sim|bench --help` shows a real default and a help line for every flag; every serve flag
also reads a KVGATE_* environment variable, named in its help line."""

from __future__ import annotations

import argparse
import importlib
import os

import pytest

from gateway import serve_cli
from gateway.cli import SUBCOMMANDS, HelpFormatter, main, subcommand_parser

COMMANDS = ("serve", "sim", "bench")


@pytest.fixture(autouse=True)
def no_kvgate_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own KVGATE_* settings must not leak into what these tests see."""
    for name in list(os.environ):
        if name.startswith(serve_cli.ENV_PREFIX):
            monkeypatch.delenv(name)


def flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every option of `parser` except -h."""
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def serve_parser(environ: dict[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvgate serve", formatter_class=HelpFormatter)
    serve_cli.add_arguments(parser, environ)
    return parser


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_a_line_and_a_real_default_for_every_flag(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "None" not in text
    parser = subcommand_parser(command, importlib.import_module(SUBCOMMANDS[command][0]))
    formatter = HelpFormatter(parser.prog)
    for action in flags(parser):
        name = action.option_strings[-1]
        assert action.help, f"{name} has no help text"
        assert name in text
        switch = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)
        if not switch:  # a flag that only turns something on is off by default: nothing to state
            assert "default" in formatter._get_help_string(action), f"{name} does not state its default"


def test_every_serve_flag_names_its_variable() -> None:
    actions = flags(serve_parser({}))
    assert len(actions) >= 20
    for action in actions:
        assert f"env {serve_cli.env_name(action.option_strings[0])})" in action.help
    assert serve_cli.env_name("--kv-events-replay") == "KVGATE_KV_EVENTS_REPLAY"


def test_variables_set_the_flags_and_the_command_line_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # one help line per flag, unwrapped
    env = {
        "KVGATE_PORT": "9001",
        "KVGATE_POLICY": "cache_aware",
        "KVGATE_MODEL": "m",
        "KVGATE_HEALTH_INTERVAL": "0.5",
        "KVGATE_BACKEND": "http://a:1  http://b:2#role=prefill,version=v1",
    }
    parser = serve_parser(env)
    args = parser.parse_args([])
    assert (args.port, args.policy, args.model, args.health_interval) == (9001, "cache_aware", "m", 0.5)
    assert args.backend == ["http://a:1", "http://b:2#role=prefill,version=v1"]
    config = serve_cli.config_from_args(args)
    assert (config.listen.port, config.health.interval) == (9001, 0.5)
    assert config.pools[0].policy.name == "cache_aware"
    endpoints = config.pools[0].endpoints
    assert [(e.url, e.role) for e in endpoints] == [("http://a:1", "both"), ("http://b:2", "prefill")]
    help_text = parser.format_help()
    assert "(default: 9001; env KVGATE_PORT)" in help_text
    # a flag on the command line replaces its variable, a repeated one as a whole
    args = parser.parse_args(["--port", "9002", "--backend", "http://c:3"])
    assert (args.port, args.backend, args.policy) == (9002, ["http://c:3"], "cache_aware")


def test_without_variables_repeated_flags_accumulate_and_defaults_stay_unset() -> None:
    args = serve_parser({}).parse_args(["--backend", "http://a:1", "--backend", "http://b:2"])
    assert args.backend == ["http://a:1", "http://b:2"]
    assert (args.port, args.policy, args.kv_events) == (None, "least_request", [])


def test_an_empty_variable_counts_as_unset() -> None:
    args = serve_parser({"KVGATE_PORT": "", "KVGATE_BACKEND": " "}).parse_args([])
    assert (args.port, args.backend) == (None, [])


@pytest.mark.parametrize(
    ("name", "value"), [("KVGATE_PORT", "eighty"), ("KVGATE_POLICY", "fastest"), ("KVGATE_RETRIES", "1.5")]
)
def test_a_bad_variable_is_a_usage_error_naming_it(name: str, value: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        serve_parser({name: value})
    assert exit_info.value.code == 2
    assert f"{name}={value!r}" in capsys.readouterr().err

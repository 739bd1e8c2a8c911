"""The shipped JSON Schema of the config file is the one the structs generate, the example config
validates against it, and the schema and the decoder agree on what they refuse."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from gateway.config import config_from_mapping
from gateway.config_schema import config_schema

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "config" / "kvgate.schema.json"
EXAMPLE = ROOT / "config" / "kvgate.example.yaml"
REGENERATE = "make schemas (python -m gateway.config_schema > config/kvgate.schema.json, and the chart's)"


def example() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE.read_text())


def test_the_shipped_schema_is_the_generated_one() -> None:
    stale = f"config/kvgate.schema.json is not what the structs generate: {REGENERATE}"
    assert json.loads(SHIPPED.read_text()) == config_schema(), stale


def test_the_example_config_validates_against_the_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(config_schema())
    jsonschema.validate(example(), config_schema(), cls=jsonschema.Draft202012Validator)
    config_from_mapping(example())


def _set(data: dict[str, Any], path: list[str], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(data)
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


POOL = next(iter(yaml.safe_load(EXAMPLE.read_text())["pools"]))


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (["listen", "prot"], 80),  # a typo
        (["timeouts", "read"], "600"),  # a string for a number
        (["forwarded", "mode"], "sometimes"),  # not one of the choices
        (["pools", POOL, "endpoints", 0, "role"], "master"),
        (["pools", POOL, "policy", "nmae"], "x"),
        (["pools"], {}),  # no pool
        (["seed"], 1.5),
    ],
)
def test_schema_and_decoder_refuse_the_same_mistakes(path: list[Any], value: Any) -> None:
    bad = _set(example(), path, value)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, config_schema(), cls=jsonschema.Draft202012Validator)
    with pytest.raises(ValueError):
        config_from_mapping(bad)


def test_the_schema_carries_the_bounds_the_decoder_enforces() -> None:
    defs = config_schema()["$defs"]
    assert defs["Health"]["properties"]["eject_after"]["minimum"] == 1
    assert defs["Health"]["properties"]["interval"]["exclusiveMinimum"] == 0
    assert defs["Listen"]["properties"]["port"]["maximum"] == 65535
    assert defs["Retries"]["properties"]["on_status"]["items"]["minimum"] == 100
    validator = jsonschema.Draft202012Validator(config_schema())
    bad = {"pools": {"m": {"endpoints": [{"url": "http://a"}]}}, "health": {"eject_after": 0}}
    assert [e.json_path for e in validator.iter_errors(bad)] == ["$.health.eject_after"]

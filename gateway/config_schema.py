"""The JSON Schema of the YAML config file, generated from the typed structs in gateway.config.

The structs are the one declaration; this module turns them into the shape an editor or a CI linter
checks a `kvgate.yaml` against (`# yaml-language-server: $schema=...`): `pools` is a mapping of model name to
pool settings (the struct's `model` comes from the key), every object rejects unknown keys as the
decoder does, and each key's trailing comment in gateway/config.py (or the structs beside it) becomes its
description. config/kvgate.schema.json is this output; a test keeps the two, and the example config,
in step.

    python -m gateway.config_schema > config/kvgate.schema.json

The Helm chart's values.schema.json embeds this schema: after a config change `make schemas` writes
both (scripts/helm_values_schema.py for the chart's; tests/test_helm_chart.py checks it).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import typing
from typing import Any

import msgspec
import orjson

from gateway.config import GatewayConfig

SCHEMA_ID = "https://kvgate.dev/schemas/kvgate.schema.json"
_FIELD = re.compile(r"^    (\w+): [^#\n]*?(?:#\s*(.+))?$")  # a field at class level, maybe a comment


def config_schema() -> dict[str, Any]:
    """The schema of a config file (a mapping), as a JSON-compatible dict."""
    schema = msgspec.json.schema(GatewayConfig)
    defs: dict[str, Any] = schema["$defs"]
    classes = _dataclasses(GatewayConfig)
    for name, definition in defs.items():
        if definition.get("type") == "object":
            definition["additionalProperties"] = False
            if not definition.get("required", True):
                definition.pop("required")
            cls = classes.get(name)
            if cls is not None:
                _describe(definition, cls)
    pool = defs["PoolSpec"]
    pool["properties"].pop("model")
    pool["required"] = [r for r in pool.get("required", []) if r != "model"]
    if not pool["required"]:
        pool.pop("required")
    root = defs.pop("GatewayConfig")
    root["properties"]["pools"] = {
        "description": "model name (as clients send it) -> the pods serving it and how to choose among them",
        "type": "object",
        "minProperties": 1,
        "additionalProperties": {"$ref": "#/$defs/PoolSpec"},
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        **root,
        "title": "kvgate configuration",
        "$defs": dict(sorted(defs.items())),
    }


def _dataclasses(root: type) -> dict[str, type]:
    """Every dataclass reachable from `root`'s fields, by name."""
    found: dict[str, type] = {}
    todo = [root]
    while todo:
        cls = todo.pop()
        if cls.__name__ in found:
            continue
        found[cls.__name__] = cls
        for hint in typing.get_type_hints(cls).values():
            stack = [hint]
            while stack:
                h = stack.pop()
                if dataclasses.is_dataclass(h) and isinstance(h, type):
                    todo.append(h)
                stack.extend(typing.get_args(h))
    return found


def _describe(definition: dict[str, Any], cls: type) -> None:
    """Each property's description: the comment lines just above its field, then its trailing comment."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return
    properties = definition.get("properties", {})
    above: list[str] = []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").strip())
            continue
        match = _FIELD.match(line)
        if match and match.group(1) in properties:
            parts = [*above, (match.group(2) or "").strip()]
            text = " ".join(p for p in parts if p)
            prop = properties[match.group(1)]
            if text and "description" not in prop:
                prop["description"] = text
        above = []


def main() -> int:
    sys.stdout.write(orjson.dumps(config_schema(), option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0

if __name__ == "__main__":
    raise SystemExit(main())

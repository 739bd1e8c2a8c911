"""The JSON Schema of the Helm chart's values (config/helm/kvgate/values.schema.json), which Helm checks
every install and upgrade against, so a typo or a wrong type fails `helm install` naming the key.

The chart's own values are declared here; `config` and each item of `pools` are the gateway config's
schema (gateway.config_schema, generated from the typed structs), so a gateway config that the decoder
would refuse at startup is already refused by Helm. tests/test_helm_chart.py keeps the file in step:

    python scripts/helm_values_schema.py > config/helm/kvgate/values.schema.json
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import orjson

from gateway.config_schema import config_schema

# Prometheus' duration, as the ServiceMonitor CRD checks it
DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"


def _obj(properties: dict[str, Any], description: str = "", **extra: Any) -> dict[str, Any]:
    """A closed object: keys other than `properties` are refused (a typo fails the install)."""
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if description:
        schema["description"] = description
    return {**schema, **extra}


def _int(minimum: int = 0, maximum: int | None = None, description: str = "") -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer", "minimum": minimum}
    if maximum is not None:
        schema["maximum"] = maximum
    if description:
        schema["description"] = description
    return schema


STR = {"type": "string"}
BOOL = {"type": "boolean"}
PORT = _int(1, 65535)
STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECTS = {"type": "array", "items": {"type": "object"}}
PULL_POLICY = {"enum": ["Always", "IfNotPresent", "Never"]}
# Kubernetes' ResourceRequirements (the rendered manifests are checked against the API schemas)
RESOURCES = _obj(
    {
        "requests": {"type": "object", "additionalProperties": {"type": ["string", "number"]}},
        "limits": {"type": "object", "additionalProperties": {"type": ["string", "number"]}},
        "claims": OBJECTS,
    }
)
PROBE = _obj(
    {
        key: _int(1 if key in ("periodSeconds", "successThreshold", "failureThreshold") else 0)
        for key in (
            "initialDelaySeconds",
            "periodSeconds",
            "timeoutSeconds",
            "successThreshold",
            "failureThreshold",
            "terminationGracePeriodSeconds",
        )
    },
    "timing of the probe; its httpGet is the chart's",
)


def chart_values_schema() -> dict[str, Any]:
    gateway = config_schema()
    defs: dict[str, Any] = copy.deepcopy(gateway["$defs"])
    pool = copy.deepcopy(defs["PoolSpec"])
    pool["title"] = "Pool"
    pool["description"] = (
        "One model's pool: `model` and the pool keys of the gateway config. Without `endpoints` the "
        "chart fills them (discovery.enabled, else vllm.enabled)."
    )
    pool["properties"] = {"model": {"type": "string", "minLength": 1}, **pool["properties"]}
    pool["required"] = ["model"]
    defs["Pool"] = pool
    config = {k: v for k, v in gateway.items() if k not in ("$schema", "$id", "$defs", "required")}
    config["properties"] = {k: v for k, v in config["properties"].items() if k != "pools"}
    config["title"] = "Config"
    config["description"] = (
        "the gateway config (config/kvgate.example.yaml) but `pools`, which the chart writes"
    )
    defs["Config"] = config
    vllm = _obj(
        {
            "enabled": BOOL,
            "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 52},
            "replicas": _int(0),
            "image": _obj(
                {"repository": {"type": "string", "minLength": 1}, "tag": STR, "pullPolicy": PULL_POLICY}
            ),
            "model": {"type": "string", "minLength": 1},
            "port": PORT,
            "role": {"enum": ["prefill", "decode", "both"]},
            "kvEvents": _obj({"enabled": BOOL, "port": PORT, "replayPort": PORT}),
            "extraArgs": {"type": "array", "items": STR},
            "env": OBJECTS,
            "resources": RESOURCES,
            "terminationGracePeriodSeconds": _int(0),
            "nodeSelector": STRINGS,
            "tolerations": OBJECTS,
        },
        "the example vLLM StatefulSet (vllm.enabled), or the vLLM container of mode: sidecar",
    )
    properties = {
        "global": {"type": "object", "description": "Helm's values shared with parent charts"},
        "mode": {"enum": ["gateway", "sidecar"]},
        "image": _obj(
            {"repository": {"type": "string", "minLength": 1}, "tag": STR, "pullPolicy": PULL_POLICY},
            "the kvgate image (the repository's Dockerfile); an empty tag is the chart's appVersion",
        ),
        "imagePullSecrets": {"type": "array", "items": _obj({"name": STR}, required=["name"])},
        "nameOverride": {"type": "string", "maxLength": 63},
        "fullnameOverride": {"type": "string", "maxLength": 63},
        "pools": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/Pool"}},
        "config": {"$ref": "#/$defs/Config"},
        "replicas": _int(0, description="gateway replicas, unless autoscaling.enabled"),
        "podDisruptionBudget": _obj(
            {
                "enabled": BOOL,
                "minAvailable": {"oneOf": [_int(0), {"type": "string", "pattern": "^[0-9]+%$"}]},
            }
        ),
        "autoscaling": _obj(
            {
                "enabled": BOOL,
                "minReplicas": _int(1),
                "maxReplicas": _int(1),
                "targetCPUUtilizationPercentage": _int(1),
            }
        ),
        "resources": RESOURCES,
        "readinessProbe": PROBE,
        "livenessProbe": PROBE,
        "terminationGracePeriodSeconds": {
            "oneOf": [_int(0), {"type": "null"}],
            "description": "null: config.timeouts.shutdown + 10 s",
        },
        "extraArgs": {"type": "array", "items": STR, "description": "more `kvgate serve` flags"},
        "env": OBJECTS,
        "podAnnotations": STRINGS,
        "podLabels": STRINGS,
        "nodeSelector": STRINGS,
        "tolerations": OBJECTS,
        "affinity": {"type": "object"},
        "topologySpreadConstraints": OBJECTS,
        "service": _obj(
            {
                "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                "port": PORT,
                "annotations": STRINGS,
            }
        ),
        "prometheusAnnotations": BOOL,
        "serviceMonitor": _obj(
            {
                "enabled": BOOL,
                "interval": {"type": "string", "pattern": DURATION},
                "scrapeTimeout": {"type": "string", "pattern": DURATION.replace("^(0|", "^(|0|")},
                "labels": STRINGS,
            }
        ),
        "discovery": _obj(
            {"enabled": BOOL, "kubernetes": {"$ref": "#/$defs/KubernetesDiscovery"}},
            "RBAC to watch pods, and pools without endpoints use discovery: kubernetes with these keys",
        ),
        "vllm": vllm,
        "sidecar": _obj({"resources": RESOURCES, "config": {"$ref": "#/$defs/Config"}}),
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "kvgate Helm chart values",
        **_obj(properties),
        "$defs": dict(sorted(defs.items())),
    }


def main() -> int:
    sys.stdout.write(orjson.dumps(chart_values_schema(), option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""JSON Schemas of the custom resources kvgate ships (config/k8s), which kubernetes-validate does not
know: written here from the CRDs' published openAPIV3Schema, narrowed to the fields kvgate's manifests
use (anything else fails, as an unknown field would under `kubectl apply --validate=strict`).

    inference.networking.k8s.io/v1 InferencePool   (Gateway API Inference Extension)
    gateway.networking.k8s.io/v1   HTTPRoute       (Gateway API), rules routing to an InferencePool
"""

from __future__ import annotations

from typing import Any

_NAME = {"type": "string", "minLength": 1, "maxLength": 253}
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
_LABEL_VALUE = {"type": "string", "maxLength": 63,
                "pattern": r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"}
_DURATION = {"type": "string", "pattern": r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"}


def _object(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": False}


_METADATA = _object({
    "name": _NAME,
    "namespace": _NAME,
    "labels": {"type": "object", "additionalProperties": _LABEL_VALUE},
    "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
}, ("name",))

INFERENCE_POOL_V1 = _object({
    "apiVersion": {"const": "inference.networking.k8s.io/v1"},
    "kind": {"const": "InferencePool"},
    "metadata": _METADATA,
    "spec": _object({
        "selector": _object({"matchLabels": {"type": "object", "minProperties": 1, "maxProperties": 64,
                                             "additionalProperties": _LABEL_VALUE}}, ("matchLabels",)),
        "targetPorts": {"type": "array", "minItems": 1, "maxItems": 8, "uniqueItems": True,
                        "items": _object({"number": _PORT}, ("number",))},
        "appProtocol": {"enum": ["http", "kubernetes.io/h2c"]},
        "endpointPickerRef": _object({
            "group": {"type": "string", "maxLength": 253},
            "kind": {"type": "string", "minLength": 1, "maxLength": 63},
            "name": _NAME,
            "port": _object({"number": _PORT}, ("number",)),
            "failureMode": {"enum": ["FailOpen", "FailClose"]},
        }, ("name", "port")),  # port: required when kind is Service (the default)
    }, ("selector", "targetPorts")),
}, ("apiVersion", "kind", "metadata", "spec"))

HTTP_ROUTE_V1 = _object({
    "apiVersion": {"const": "gateway.networking.k8s.io/v1"},
    "kind": {"const": "HTTPRoute"},
    "metadata": _METADATA,
    "spec": _object({
        "parentRefs": {"type": "array", "maxItems": 32, "items": _object({
            "group": {"type": "string"}, "kind": {"type": "string"}, "namespace": _NAME, "name": _NAME,
            "sectionName": _NAME, "port": _PORT,
        }, ("name",))},
        "hostnames": {"type": "array", "items": {"type": "string"}},
        "rules": {"type": "array", "maxItems": 16, "items": _object({
            "matches": {"type": "array", "maxItems": 64, "items": _object({
                "path": _object({"type": {"enum": ["Exact", "PathPrefix", "RegularExpression"]},
                                 "value": {"type": "string", "maxLength": 1024}}),
                "method": {"enum": ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS",
                                    "TRACE", "PATCH"]},
            })},
            "backendRefs": {"type": "array", "maxItems": 16, "items": _object({
                "group": {"type": "string"}, "kind": {"type": "string"}, "name": _NAME,
                "namespace": _NAME, "port": _PORT, "weight": {"type": "integer", "minimum": 0},
            }, ("name",))},
            "timeouts": _object({"request": _DURATION, "backendRequest": _DURATION}),
        })},
    }),
}, ("apiVersion", "kind", "metadata", "spec"))

# (apiVersion, kind) -> schema: the only custom resources the manifest test accepts
CUSTOM_RESOURCES: dict[tuple[str, str], dict[str, Any]] = {
    ("inference.networking.k8s.io/v1", "InferencePool"): INFERENCE_POOL_V1,
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): HTTP_ROUTE_V1,
}

"""A Kubernetes Pod object (the API's JSON, as a mapping) -> the endpoint it serves, or why it serves none.

Pure functions over the raw object, so they are tested alone and the watcher works on what the API
sends without building client models. A pod serves when it is Running, its Ready condition is True,
it is not terminating (no deletionTimestamp: Kubernetes still lists a pod being deleted, Ready or
not, for its grace period) and it has a pod IP. Its role, version and model come from labels, its
KV-events endpoint from an annotation or a port (config.KubernetesDiscovery).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, get_args

from router.discovery.config import KubernetesDiscovery
from router.endpoint import Role

ROLES: tuple[str, ...] = get_args(Role)
_NOT_LABEL_SAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True, slots=True)
class PodEndpoint:
    """What one serving pod contributes to its pool. Compared whole: a pod whose IP, port, role,
    version or KV-events endpoint changes is a different endpoint (removed, then added)."""

    uid: str
    name: str  # namespace/name, for logs
    url: str
    role: Role
    version: str
    kv_events: str | None
    kv_events_replay: str | None


def skip_reason(pod: Mapping[str, Any], k: KubernetesDiscovery, model: str) -> str | None:
    """Why `pod` serves nothing now (None: it serves)."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    if meta.get("deletionTimestamp"):
        return "terminating"
    if status.get("phase") != "Running":
        return f"phase {status.get('phase') or 'unknown'}"
    if not is_ready(status):
        return "not ready"
    if not status.get("podIP"):
        return "no pod IP"
    labels = meta.get("labels") or {}
    role = labels.get(k.role_label, "both")
    if role not in ROLES:
        return f"label {k.role_label}={role!r} is not one of {list(ROLES)}"
    if k.model_label is not None and k.model_label in labels:
        value = labels[k.model_label]
        if value != model and value.lower() != label_safe(model).lower() and value != k.model_label_value:
            return f"label {k.model_label}={value!r} is another model"
    if http_port(pod, k) is None:
        return f"no container port named {k.port_name!r}"
    return None


def pod_endpoint(pod: Mapping[str, Any], k: KubernetesDiscovery, model: str) -> PodEndpoint | None:
    """The endpoint `pod` serves, or None when it serves none (skip_reason says why)."""
    if skip_reason(pod, k, model) is not None:
        return None
    meta = pod["metadata"]
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    ip = pod["status"]["podIP"]
    port = http_port(pod, k)
    return PodEndpoint(
        uid=str(meta.get("uid") or pod_key(pod)),
        name=pod_key(pod),
        url=f"http://{host(ip)}:{port}",
        role=labels.get(k.role_label, "both"),
        version=labels.get(k.version_label, ""),
        kv_events=zmq_endpoint(annotations.get(k.kv_events_annotation), k.kv_events_port, ip),
        kv_events_replay=zmq_endpoint(
            annotations.get(k.kv_events_replay_annotation), k.kv_events_replay_port, ip
        ),
    )


def pod_key(pod: Mapping[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def is_ready(status: Mapping[str, Any]) -> bool:
    for cond in status.get("conditions") or ():
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def http_port(pod: Mapping[str, Any], k: KubernetesDiscovery) -> int | None:
    """The named container port when configured (None if the pod declares none by that name), else `port`."""
    if k.port_name is None:
        return k.port
    for container in (pod.get("spec") or {}).get("containers") or ():
        for p in container.get("ports") or ():
            if p.get("name") == k.port_name and isinstance(p.get("containerPort"), int):
                return int(p["containerPort"])
    return None


def zmq_endpoint(annotation: str | None, port: int | None, ip: str) -> str | None:
    """A pod's ZMQ endpoint from its annotation (`tcp://*:5557` as given to vLLM, `tcp://HOST:5557`, or a
    bare port; a wildcard host means the pod IP), else from the configured port; None when neither
    gives one (an annotation in another form is ignored)."""
    if annotation:
        value = annotation.strip()
        if value.isdigit():
            return f"tcp://{host(ip)}:{int(value)}"
        m = re.fullmatch(r"tcp://(\*|0\.0\.0\.0|\[::\]|[^:/\s]+|\[[0-9A-Fa-f:.]+\]):(\d{1,5})", value)
        if m:
            h = host(ip) if m[1] in ("*", "0.0.0.0", "[::]") else m[1]
            return f"tcp://{h}:{int(m[2])}"
    if port is not None:
        return f"tcp://{host(ip)}:{port}"
    return None


def host(ip: str) -> str:
    """An IP as a URL host: IPv6 in brackets."""
    return f"[{ip}]" if ":" in ip else ip


def label_safe(value: str) -> str:
    """`value` as Kubernetes allows it in a label value (63 characters of [A-Za-z0-9._-], alphanumeric at
    both ends): `meta-llama/Llama-3.1-8B-Instruct` -> `meta-llama-Llama-3.1-8B-Instruct`."""
    return _NOT_LABEL_SAFE.sub("-", value)[:63].strip("-._")

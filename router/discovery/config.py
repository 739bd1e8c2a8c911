"""The config of `discovery: kubernetes` (one per pool), decoded by gateway.config with the rest of the file.

Declared here, beside the code that reads it, so the router imports nothing from the gateway; see
config/kvgate.example.yaml for every key with an example.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# llm-d's label for a pod's part in prefill/decode disaggregation (values prefill, decode, both)
LLMD_ROLE_LABEL = "llm-d.ai/role"


@dataclass(slots=True)
class KubernetesDiscovery:
    """Which pods serve the pool, how to reach them, and how to talk to the API server."""

    label_selector: str = ""  # required: e.g. "app=vllm,llm-d.ai/inferenceServing=true"
    namespace: str | None = None  # None: the gateway's own namespace in-cluster, else the context's
    # the pod's HTTP port: a named container port (wins when the pod declares it), else `port`
    port: int = 8000
    port_name: str | None = None
    # KV events (precise index): the annotation's value (a ZMQ endpoint as given to vLLM, `*` standing
    # for the pod IP, or a bare port) wins; else tcp://POD_IP:kv_events_port when that is set
    kv_events_annotation: str = "kvgate.io/kv-events"
    kv_events_replay_annotation: str = "kvgate.io/kv-events-replay"
    kv_events_port: int | None = None
    kv_events_replay_port: int | None = None
    role_label: str = LLMD_ROLE_LABEL  # prefill | decode | both; absent: both
    version_label: str = "app.kubernetes.io/version"  # absent: ""
    # when set, a pod carrying this label with a value other than the pool's model is skipped; the
    # value may be the model, its label-safe form (`/` -> `-`, any case) or `model_label_value`
    model_label: str | None = None
    model_label_value: str | None = None  # the label value naming the pool's model, when not derived
    # credentials: `auto` is in-cluster when KUBERNETES_SERVICE_HOST is set, else the kubeconfig
    auth: Literal["auto", "in-cluster", "kubeconfig"] = "auto"
    kubeconfig: str | None = None  # None: $KUBECONFIG or ~/.kube/config
    context: str | None = None  # None: the kubeconfig's current context
    # server-side watch timeout (each watch asks for this to 2x it, as client-go does, then resumes)
    watch_timeout_s: float = 300.0
    request_timeout_s: float = 10.0  # a list request, and connecting a watch
    backoff_initial_s: float = 0.5  # after a failed list or watch, doubling up to backoff_max_s
    backoff_max_s: float = 30.0
    initial_sync_timeout_s: float = 10.0  # startup waits this long for the first list, then serves on


def validate_kubernetes(k: KubernetesDiscovery, where: str) -> None:
    """Cross-field checks; ValueError naming the key."""
    if not k.label_selector.strip():
        raise ValueError(f"{where}.label_selector: required (the pods of the pool, e.g. 'app=vllm')")
    ports = {"port": k.port, "kv_events_port": k.kv_events_port,
             "kv_events_replay_port": k.kv_events_replay_port}
    for key, port in ports.items():
        if port is not None and not 1 <= port <= 65535:
            raise ValueError(f"{where}.{key}: {port} is not a TCP port")
    if k.port_name is not None and not k.port_name:
        raise ValueError(f"{where}.port_name: must not be empty")
    if k.auth == "in-cluster" and (k.kubeconfig or k.context):
        raise ValueError(f"{where}: kubeconfig and context do not apply to auth: in-cluster")
    positive = {
        "watch_timeout_s": k.watch_timeout_s,
        "request_timeout_s": k.request_timeout_s,
        "backoff_initial_s": k.backoff_initial_s,
        "initial_sync_timeout_s": k.initial_sync_timeout_s,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ValueError(f"{where}.{key}: must be positive")
    if k.backoff_max_s < k.backoff_initial_s:
        raise ValueError(f"{where}.backoff_max_s: must be at least backoff_initial_s")

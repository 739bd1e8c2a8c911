"""What kvgate ships works: the example config and every Kubernetes ConfigMap build a gateway, every
manifest is valid against the Kubernetes API schemas, and the Dockerfile runs the gateway as it should.
(The Grafana dashboard is checked by a real Prometheus: tests/e2e/test_dashboard_prometheus.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from crd_schemas import CUSTOM_RESOURCES, INFERENCE_POOL_V1
from prometheus_client import CollectorRegistry

from gateway.app import build_app
from gateway.config import config_from_mapping, load_config

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "config" / "k8s" / "kvgate.yaml"
EPP = ROOT / "config" / "k8s" / "kvgate-epp.yaml"


def test_example_and_k8s_configs_build_a_gateway() -> None:
    build_app(load_config(str(ROOT / "config" / "kvgate.example.yaml")), registry=CollectorRegistry())
    docs = list(yaml.safe_load_all(K8S.read_text()))
    kinds = {d["kind"] for d in docs}
    assert kinds == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}
    configmap = next(d for d in docs if d["kind"] == "ConfigMap")
    cfg = config_from_mapping(yaml.safe_load(configmap["data"]["kvgate.yaml"]))
    build_app(cfg, registry=CollectorRegistry())
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert cfg.listen.port == container["ports"][0]["containerPort"]


def _k8s_documents() -> list[tuple[str, dict]]:
    return [
        (f"{path.name}: {doc['kind']}/{doc['metadata']['name']}", doc)
        for path in sorted((ROOT / "config" / "k8s").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc is not None
    ]


def test_every_kubernetes_manifest_is_valid_against_the_api_schemas() -> None:
    """Strict: an unknown field (a typo in a probe, a misplaced key) fails, as `kubectl apply` would.
    The custom resources (InferencePool, HTTPRoute) against schemas written from their CRDs
    (tests/support/crd_schemas.py); any other kind against the Kubernetes API's."""
    docs = _k8s_documents()
    assert len(docs) >= 6
    for where, doc in docs:
        custom = CUSTOM_RESOURCES.get((doc["apiVersion"], doc["kind"]))
        try:
            if custom is not None:
                jsonschema.validate(doc, custom)
            else:
                kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
            raise AssertionError(f"{where}: {exc.message} at {list(exc.path)}") from None


def test_the_crd_schemas_refuse_what_the_crds_refuse() -> None:
    pool = next(d for _, d in _k8s_documents() if d["kind"] == "InferencePool")
    jsonschema.validate(pool, CUSTOM_RESOURCES[("inference.networking.k8s.io/v1", "InferencePool")])
    for broken in ({"selector": pool["spec"]["selector"]},  # targetPorts required
                   {**pool["spec"], "targetPort": 8000},  # unknown field
                   {**pool["spec"], "endpointPickerRef": {"name": "x", "port": {"number": 70000}}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**pool, "spec": broken}, INFERENCE_POOL_V1)


def test_the_epp_manifest_wires_pool_picker_and_gateway_to_the_same_pods_and_ports() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(EPP.read_text())}
    pool = docs[("InferencePool", "vllm-llama")]["spec"]
    cfg = config_from_mapping(yaml.safe_load(docs[("ConfigMap", "kvgate-epp")]["data"]["kvgate.yaml"]))
    build_app(cfg, registry=CollectorRegistry())
    (spec,) = cfg.pools
    assert spec.kubernetes is not None
    selector = ",".join(f"{k}={v}" for k, v in pool["selector"]["matchLabels"].items())
    assert spec.kubernetes.label_selector == selector
    vllm = next(d for d in yaml.safe_load_all((ROOT / "config" / "k8s" / "vllm.yaml").read_text())
                if d["kind"] == "StatefulSet")
    (vllm_container,) = vllm["spec"]["template"]["spec"]["containers"]
    named = {p["name"]: p["containerPort"] for p in vllm_container["ports"]}
    assert [p["number"] for p in pool["targetPorts"]] == [named[spec.kubernetes.port_name]]
    container = docs[("Deployment", "kvgate-epp")]["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[0] == "epp"
    grpc_port = int(args[args.index("--grpc-port") + 1])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": cfg.listen.port, "grpc": grpc_port}
    service = docs[("Service", pool["endpointPickerRef"]["name"])]
    (grpc,) = [p for p in service["spec"]["ports"] if p["targetPort"] == "grpc"]
    assert grpc["port"] == pool["endpointPickerRef"]["port"]["number"]
    route = docs[("HTTPRoute", "vllm-llama")]["spec"]["rules"][0]["backendRefs"][0]
    assert (route["kind"], route["name"]) == ("InferencePool", "vllm-llama")


def test_every_shipped_gateway_config_builds_and_listens_where_its_pod_says() -> None:
    docs = _k8s_documents()
    configmaps = [(w, d) for w, d in docs if d["kind"] == "ConfigMap" and "kvgate.yaml" in d["data"]]
    assert len(configmaps) >= 2  # the gateway tier and the sidecar
    containers = [
        c
        for _, d in _k8s_documents()
        if d["kind"] in ("Deployment", "StatefulSet")
        for c in d["spec"]["template"]["spec"]["containers"]
        if c["name"] == "kvgate"
    ]
    ports = {c["ports"][0]["containerPort"] for c in containers}
    for where, doc in configmaps:
        cfg = config_from_mapping(yaml.safe_load(doc["data"]["kvgate.yaml"]))
        build_app(cfg, registry=CollectorRegistry())
        assert cfg.listen.port in ports, where
    for c in containers:
        assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert c["livenessProbe"]["httpGet"]["path"] == "/health"


def test_dockerfile_runs_as_non_root_with_a_healthcheck_on_a_pinned_base() -> None:
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=python:(\S+)$", text, re.M)
    assert base and re.match(r"3\.\d+\.\d+-slim-\w+$", base.group(1)), "base image pinned to a patch release"
    assert re.search(r"^USER 10001$", text, re.M)
    health = re.search(r"^HEALTHCHECK .*\n\s+CMD .*'(http://127\.0\.0\.1:(\d+)(/\S*?))'", text, re.M)
    assert health, "HEALTHCHECK probes the gateway"
    assert health.group(3) == "/health"
    assert f'"--port", "{health.group(2)}"' in text  # the port the CMD serves on
    for label in ("title", "version", "licenses"):
        assert f"org.opencontainers.image.{label}=" in text
    for copied in re.findall(r"^COPY (?!--from)(\S+) ", text, re.M):
        assert (ROOT / copied).exists(), copied
    (extras,) = re.findall(r"'\.\[([a-z,]+)\]'", text)
    assert "bench" not in extras.split(",")  # the runtime image carries no benchmark extras
    assert "kubernetes" in extras.split(",")  # config/k8s/kvgate-discovery.yaml runs on this image

"""What kvgate ships works: the example config and every Kubernetes ConfigMap build a gateway, every
manifest is valid against the Kubernetes API schemas, and the Dockerfile runs the gateway as it should.
(The Grafana dashboard is checked by a real Prometheus: tests/e2e/test_dashboard_prometheus.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import yaml
from prometheus_client import CollectorRegistry

from gateway.app import build_app
from gateway.config import config_from_mapping, load_config

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "config" / "k8s" / "kvgate.yaml"


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
    """Strict: an unknown field (a typo in a probe, a misplaced key) fails, as `kubectl apply` would."""
    docs = _k8s_documents()
    assert len(docs) >= 6
    for where, doc in docs:
        try:
            kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{where}: {exc.message} at {list(exc.path)}") from None


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

"""The Helm chart (config/helm/kvgate) lints strictly, renders with every value set an operator is likely
to use, and every object it renders is valid: built-in kinds against the Kubernetes API schemas (strict,
kubernetes-validate, as tests/test_shipped_config.py checks config/k8s), the ServiceMonitor against the
Prometheus Operator's CRD schema. The rendered gateway config builds a gateway, and values.schema.json
refuses bad values before anything renders.

Rendering is Helm's own Go engine (helm-python-sdk, Helm v4 as a shared library): what `helm install`
would send, without a cluster.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from fake_kube_api import parse_selector, running_pod
from helm_python.chart import Chart, lint
from helm_python.errors import HelmRenderError, HelmValuesError
from prometheus_client import CollectorRegistry

from gateway.app import build_app
from gateway.config import GatewayConfig, config_from_mapping
from gateway.reload import LIVE_SECTIONS
from router.discovery.pods import label_safe, pod_endpoint

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "config" / "helm" / "kvgate"
SERVICEMONITOR_SCHEMA = ROOT / "tests" / "fixtures" / "prometheus-operator" / "servicemonitor-v1.schema.json"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
RELEASE = "kvgate"
NAMESPACE = "llm"
UNLISTED_POOL = [{"model": MODEL, "policy": {"name": "cache_aware", "params": {"index": "precise"}}}]

# name -> values an operator passes with -f; each is rendered, linted and validated
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "discovery": {"discovery": {"enabled": True}, "pools": UNLISTED_POOL},
    "servicemonitor": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}, "scrapeTimeout": "10s"}
    },
    "hpa": {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6}},
    "vllm": {"vllm": {"enabled": True, "replicas": 2}, "pools": UNLISTED_POOL},
    "vllm-discovered": {"vllm": {"enabled": True}, "discovery": {"enabled": True}, "pools": UNLISTED_POOL},
    "sidecar": {"mode": "sidecar", "serviceMonitor": {"enabled": True}, "autoscaling": {"enabled": True}},
    "everything": {
        "image": {"repository": "registry.example/kvgate", "tag": "0.1.0-rc1"},
        "imagePullSecrets": [{"name": "registry"}],
        "replicas": 3,
        "config": {"admission": {"order": "fair"}, "logs": {"format": "text"}, "timeouts": {"shutdown": 50}},
        "extraArgs": ["--log-level", "debug"],
        "env": [{"name": "KVGATE_ACCESS_LOG", "value": "false"}],
        "podAnnotations": {"team": "inference"},
        "podLabels": {"tier": "gateway"},
        "nodeSelector": {"pool": "cpu"},
        "tolerations": [
            {"key": "dedicated", "operator": "Equal", "value": "gateway", "effect": "NoSchedule"}
        ],
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "kvgate"}},
            }
        ],
        "service": {"type": "LoadBalancer", "port": 8000, "annotations": {"a": "b"}},
        "podDisruptionBudget": {"minAvailable": "50%"},
        "prometheusAnnotations": False,
    },
}
GATEWAY = {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "Pod"}  # Pod: the helm test
RBAC = {"ServiceAccount", "Role", "RoleBinding"}
EXPECTED_KINDS = {
    "defaults": GATEWAY,
    "discovery": GATEWAY | RBAC,
    "servicemonitor": GATEWAY | {"ServiceMonitor"},
    "hpa": GATEWAY | {"HorizontalPodAutoscaler"},
    "vllm": GATEWAY | {"StatefulSet"},
    "vllm-discovered": GATEWAY | {"StatefulSet"} | RBAC,
    "sidecar": GATEWAY | {"ServiceMonitor", "HorizontalPodAutoscaler"},
    "everything": GATEWAY,
}


@pytest.fixture(scope="module")
def chart() -> Any:
    with Chart.load(str(CHART)) as loaded:
        yield loaded


def render(chart: Any, values: dict[str, Any]) -> list[dict[str, Any]]:
    """The objects `helm install RELEASE CHART -n NAMESPACE -f values` would create (tests included)."""
    out = chart.render(values=copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [
        doc
        for path, text in sorted(out.items())
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc is not None
    ]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = by_kind(docs, kind)
    return doc


def gateway_config(docs: list[dict[str, Any]]) -> GatewayConfig:
    return config_from_mapping(yaml.safe_load(one(docs, "ConfigMap")["data"]["kvgate.yaml"]))


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def test_lint_is_clean_in_strict_mode_for_every_value_set() -> None:
    for name, values in VALUE_SETS.items():
        report = lint(str(CHART), copy.deepcopy(values), strict=True, namespace=NAMESPACE)
        # severity 1 is informational ("icon is recommended"); warnings fail under strict
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not report["errors"] and not problems, (name, report)


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_the_chart_renders_the_objects_of_its_mode(chart: Any, name: str) -> None:
    kinds = {d["kind"] for d in render(chart, VALUE_SETS[name])}
    assert kinds == EXPECTED_KINDS[name]


def _strict_crd_schema(node: Any) -> Any:
    """The CRD schema as `kubectl apply --validate=strict` applies it: an object's unknown fields are
    errors (the API server would prune them), unless the schema keeps unknown fields."""
    if isinstance(node, list):
        return [_strict_crd_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict_crd_schema(v) for k, v in node.items()}
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


SERVICEMONITOR = _strict_crd_schema(json.loads(SERVICEMONITOR_SCHEMA.read_text()))


def validate_object(doc: dict[str, Any]) -> None:
    """Raise AssertionError naming the object and the path of whatever Kubernetes would refuse."""
    where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    try:
        if doc["apiVersion"] == "monitoring.coreos.com/v1":
            jsonschema.validate(doc, SERVICEMONITOR, cls=jsonschema.Draft7Validator)
            # the CRD's schema leaves metadata to the API server: check it as any object's ObjectMeta
            meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}
            kubernetes_validate.validate(meta, kubernetes_validate.latest_version(), strict=True)
        else:
            kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
        raise AssertionError(f"{where}: {exc.message} at {list(exc.path)}") from None


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_rendered_object_is_valid_against_the_api_schemas(chart: Any, name: str) -> None:
    for doc in render(chart, VALUE_SETS[name]):
        validate_object(doc)


def test_the_servicemonitor_check_refuses_what_the_crd_refuses(chart: Any) -> None:
    (monitor,) = by_kind(render(chart, VALUE_SETS["servicemonitor"]), "ServiceMonitor")
    validate_object(monitor)
    typo = copy.deepcopy(monitor)
    typo["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(AssertionError, match="intervall"):
        validate_object(typo)
    wrong = copy.deepcopy(monitor)
    wrong["spec"]["endpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(AssertionError, match="interval"):
        validate_object(wrong)


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_the_rendered_gateway_config_builds_a_gateway_listening_where_its_pod_says(
    chart: Any, name: str
) -> None:
    docs = render(chart, VALUE_SETS[name])
    cfg = gateway_config(docs)
    build_app(cfg, registry=CollectorRegistry())
    pod = container(one(docs, "Deployment"), "kvgate")
    assert pod["ports"] == [{"name": "http", "containerPort": cfg.listen.port}]
    assert cfg.listen.host == "0.0.0.0"
    assert pod["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert pod["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert pod["args"][:3] == ["serve", "--config", "/etc/kvgate/kvgate.yaml"]
    (mount,) = [m for m in pod["volumeMounts"] if m["mountPath"] == "/etc/kvgate"]
    assert "subPath" not in mount  # a subPath mount never sees a ConfigMap update: no live reload
    volumes = {v["name"]: v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mount["name"]]["configMap"]["name"] == one(docs, "ConfigMap")["metadata"]["name"]
    service = next(s for s in by_kind(docs, "Service") if s["metadata"]["name"] == RELEASE)
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert parse_selector(",".join(f"{k}={v}" for k, v in service["spec"]["selector"].items()))(
        one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    )
    grace = one(docs, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > cfg.timeouts.shutdown  # in-flight streams drain on SIGTERM


def test_defaults_are_the_gateway_tier_of_config_k8s(chart: Any) -> None:
    docs = render(chart, {})
    shipped = next(
        d
        for d in yaml.safe_load_all((ROOT / "config" / "k8s" / "kvgate.yaml").read_text())
        if d["kind"] == "ConfigMap"
    )
    assert gateway_config(docs) == config_from_mapping(yaml.safe_load(shipped["data"]["kvgate.yaml"]))
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    pod = deployment["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False and "serviceAccountName" not in pod
    kvgate = container(deployment, "kvgate")
    assert kvgate["image"] == "kvgate:0.1.0"
    assert kvgate["resources"] == {"requests": {"cpu": "1", "memory": "512Mi"}, "limits": {"memory": "2Gi"}}
    security = kvgate["securityContext"]
    assert (security["runAsNonRoot"], security["runAsUser"], security["readOnlyRootFilesystem"]) == (
        True,
        10001,
        True,
    )
    assert security["allowPrivilegeEscalation"] is False
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "8080" and annotations["prometheus.io/path"] == "/metrics"


def _checksum(chart: Any, values: dict[str, Any]) -> str:
    return one(render(chart, values), "Deployment")["spec"]["template"]["metadata"]["annotations"][
        "checksum/config"
    ]


def test_a_change_the_gateway_reloads_live_keeps_the_pods_any_other_rolls_them(chart: Any) -> None:
    base = _checksum(chart, {})
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    assert _checksum(chart, {}) == base
    assert _checksum(chart, {"replicas": 5, "podLabels": {"x": "y"}}) == base
    # applied by the running gateways when the mounted ConfigMap changes (gateway/reload.py)
    assert gateway_config(render(chart, VALUE_SETS["vllm"])) != gateway_config(render(chart, {}))
    assert _checksum(chart, VALUE_SETS["vllm"]) == base  # 2 pods instead of 3
    assert _checksum(chart, {"config": {"retries": {"max_retries": 3}}}) == base
    assert _checksum(chart, {"config": {"aliases": {"llama": MODEL}}}) == base
    # sections that need a restart
    assert _checksum(chart, {"config": {"timeouts": {"read": 300}}}) != base
    assert _checksum(chart, {"config": {"admission": {"order": "fifo"}}}) != base
    # no polling of the file: every change rolls the pods
    for interval, rolls in ((0, True), (0.5, False)):  # the boundary: any polling reloads live
        polling = {"config": {"reload": {"interval": interval}}}
        changed = _checksum(chart, {**polling, **VALUE_SETS["vllm"]}) != _checksum(chart, polling)
        assert changed is rolls, interval


def test_the_charts_live_sections_are_the_gateways() -> None:
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    (omitted,) = re.findall(r'omit \$cfg ((?:"\w+" ?)+)', helpers)
    assert set(re.findall(r'"(\w+)"', omitted)) == LIVE_SECTIONS


def test_discovery_watches_the_vllm_pods_with_only_pod_read_rights(chart: Any) -> None:
    docs = render(chart, VALUE_SETS["vllm-discovered"])
    (spec,) = gateway_config(docs).pools
    assert spec.discovery == "kubernetes" and spec.kubernetes is not None and not spec.endpoints
    template = one(docs, "StatefulSet")["spec"]["template"]
    assert parse_selector(spec.kubernetes.label_selector)(template["metadata"]["labels"])
    ep = pod_endpoint(running_pod(template, NAMESPACE), spec.kubernetes, spec.model)
    assert ep is not None
    assert (ep.url, ep.role) == ("http://10.0.0.5:8000", "both")
    assert (ep.kv_events, ep.kv_events_replay) == ("tcp://10.0.0.5:5557", "tcp://10.0.0.5:5558")
    read_pods = {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
    assert one(docs, "Role")["rules"] == [read_pods]
    account = one(docs, "ServiceAccount")["metadata"]["name"]
    binding = one(docs, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    assert binding["roleRef"]["name"] == one(docs, "Role")["metadata"]["name"]
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == account


def test_a_pools_own_kubernetes_keys_win_over_the_discovery_defaults(chart: Any) -> None:
    pools = [{"model": MODEL, "kubernetes": {"label_selector": "app=mine", "model_label": "llm-d.ai/model"}}]
    (spec,) = gateway_config(render(chart, {"discovery": {"enabled": True}, "pools": pools})).pools
    assert spec.kubernetes is not None
    assert (spec.kubernetes.label_selector, spec.kubernetes.model_label) == ("app=mine", "llm-d.ai/model")
    assert (spec.kubernetes.port_name, spec.kubernetes.kv_events_port) == ("http", 5557)  # the defaults


def test_the_example_vllm_fleet_is_the_pools_endpoints_with_kv_events(chart: Any) -> None:
    docs = render(chart, VALUE_SETS["vllm"])
    (spec,) = gateway_config(docs).pools
    statefulset = one(docs, "StatefulSet")
    name = statefulset["metadata"]["name"]
    assert statefulset["spec"]["serviceName"] == name
    headless = next(s for s in by_kind(docs, "Service") if s["metadata"]["name"] == name)
    assert headless["spec"]["clusterIP"] == "None"
    assert [e.url for e in spec.endpoints] == [f"http://{name}-{n}.{name}:8000" for n in range(2)]
    assert [e.kv_events for e in spec.endpoints] == [f"tcp://{name}-{n}.{name}:5557" for n in range(2)]
    assert [e.kv_events_replay for e in spec.endpoints] == [f"tcp://{name}-{n}.{name}:5558" for n in range(2)]
    vllm = container(statefulset, "vllm")
    assert {p["name"]: p["containerPort"] for p in vllm["ports"]} == {"http": 8000, "kv-events": 5557,
                                                                       "kv-replay": 5558}  # fmt: skip
    (events,) = [a for a in vllm["args"] if a.startswith("--kv-events-config=")]
    assert json.loads(events.split("=", 1)[1]) == {
        "enable_kv_cache_events": True, "publisher": "zmq",
        "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558",
    }  # fmt: skip
    assert vllm["args"][0] == MODEL and "--enable-prefix-caching" in vllm["args"]
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert labels["llm-d.ai/role"] == "both" and labels["llm-d.ai/model"] == label_safe(MODEL)


def test_the_default_pool_matches_the_example_vllm_fleet_with_its_defaults(chart: Any) -> None:
    docs = render(chart, {"vllm": {"enabled": True}})
    (spec,) = gateway_config(docs).pools
    assert one(docs, "StatefulSet")["spec"]["replicas"] == len(spec.endpoints) == 3
    assert spec.endpoints[0].url == "http://vllm-0.vllm:8000"


def test_the_model_label_is_what_discovery_matches_for_any_model_name(chart: Any) -> None:
    model = "org/Model:v2@main"
    docs = render(chart, {"vllm": {"enabled": True, "model": model}, "pools": [{"model": model}]})
    labels = one(docs, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert labels["llm-d.ai/model"] == label_safe(model)


def test_sidecar_mode_puts_kvgate_in_each_vllm_pod_in_front_of_localhost(chart: Any) -> None:
    docs = render(chart, VALUE_SETS["sidecar"])
    deployment = one(docs, "Deployment")
    assert [c["name"] for c in deployment["spec"]["template"]["spec"]["containers"]] == ["vllm", "kvgate"]
    cfg = gateway_config(docs)
    (spec,) = cfg.pools
    assert spec.model == MODEL and [e.url for e in spec.endpoints] == ["http://127.0.0.1:8000"]
    assert spec.policy.name == "round_robin" and cfg.scrape.interval == 0
    vllm = container(deployment, "vllm")
    assert "--host=127.0.0.1" in vllm["args"] and "--port=8000" in vllm["args"]
    assert "ports" not in vllm  # only kvgate is reachable from outside the pod
    kvgate = container(deployment, "kvgate")
    assert kvgate["resources"]["requests"] == {"cpu": "250m", "memory": "256Mi"}
    assert (
        one(docs, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"]
        == deployment["metadata"]["name"]
    )
    assert "replicas" not in deployment["spec"]  # the HPA owns it
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= 60  # vLLM's own drain


def test_the_servicemonitor_scrapes_the_gateway_service(chart: Any) -> None:
    docs = render(chart, VALUE_SETS["servicemonitor"])
    monitor = one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    service = one(docs, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"] == [
        {
            "port": service["spec"]["ports"][0]["name"],
            "path": "/metrics",
            "interval": "15s",
            "scrapeTimeout": "10s",
        }
    ]


def test_the_hpa_owns_the_gateway_replicas(chart: Any) -> None:
    docs = render(chart, VALUE_SETS["hpa"])
    hpa = one(docs, "HorizontalPodAutoscaler")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 6)
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": RELEASE}
    assert "replicas" not in one(docs, "Deployment")["spec"]


def test_everything_set_reaches_the_objects(chart: Any) -> None:
    values = VALUE_SETS["everything"]
    docs = render(chart, values)
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    kvgate = container(deployment, "kvgate")
    assert deployment["spec"]["replicas"] == 3
    assert kvgate["image"] == "registry.example/kvgate:0.1.0-rc1"
    assert kvgate["args"][3:] == ["--log-level", "debug"] and kvgate["env"] == values["env"]
    assert pod["imagePullSecrets"] == [{"name": "registry"}] and pod["nodeSelector"] == {"pool": "cpu"}
    assert pod["tolerations"] == values["tolerations"]
    assert pod["topologySpreadConstraints"] == values["topologySpreadConstraints"]
    assert pod["terminationGracePeriodSeconds"] == 60  # timeouts.shutdown 50 + 10
    meta = deployment["spec"]["template"]["metadata"]
    assert meta["labels"]["tier"] == "gateway" and meta["annotations"]["team"] == "inference"
    assert not any(k.startswith("prometheus.io/") for k in meta["annotations"])
    cfg = gateway_config(docs)
    assert cfg.admission is not None and cfg.logs.format == "text"
    service = one(docs, "Service")
    assert service["spec"]["type"] == "LoadBalancer" and service["spec"]["ports"][0]["port"] == 8000
    assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == "50%"


def test_a_listen_port_moves_the_container_port_probes_and_scrape_annotation(chart: Any) -> None:
    docs = render(chart, {"config": {"listen": {"port": 9090}}})
    assert gateway_config(docs).listen.port == 9090
    deployment = one(docs, "Deployment")
    assert container(deployment, "kvgate")["ports"][0]["containerPort"] == 9090
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "9090"


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"replicas": -1}, "/replicas"),
        ({"replicas": "two"}, "/replicas"),
        ({"replicas": 1.5}, "/replicas"),
        ({"mode": "daemonset"}, "/mode"),
        ({"image": {"tag": 1}}, "/image/tag"),
        ({"imagee": {}}, "imagee"),  # a typo at the top
        ({"service": {"port": 0}}, "/service/port"),
        ({"service": {"port": 65536}}, "/service/port"),
        ({"autoscaling": {"minReplicas": 0}}, "/autoscaling/minReplicas"),
        ({"serviceMonitor": {"interval": "15 seconds"}}, "/serviceMonitor/interval"),
        ({"readinessProbe": {"httpGet": {"path": "/"}}}, "/readinessProbe"),  # the chart's own
        ({"config": {"listen": {"prot": 80}}}, "/config/listen"),  # the gateway config's schema
        ({"config": {"timeouts": {"read": "600"}}}, "/config/timeouts/read"),
        ({"config": {"pools": {}}}, "/config"),  # pools come from `pools`
        ({"pools": []}, "/pools"),
        ({"pools": [{"policy": {"name": "cache_aware"}}]}, "/pools/0"),  # no model
        ({"pools": [{"model": MODEL, "policy": {"nmae": "x"}}]}, "/pools/0/policy"),
        ({"pools": [{"model": MODEL, "endpoints": [{"url": "http://a", "role": "x"}]}]}, "/endpoints/0"),
        ({"discovery": {"kubernetes": {"label_selectr": "a=b"}}}, "/discovery/kubernetes"),
        ({"vllm": {"replicas": -1}}, "/vllm/replicas"),
        ({"vllm": {"role": "master"}}, "/vllm/role"),
        ({"terminationGracePeriodSeconds": -5}, "/terminationGracePeriodSeconds"),
    ],
)  # fmt: skip
def test_values_schema_refuses_a_bad_value_naming_it(chart: Any, values: dict[str, Any], where: str) -> None:
    with pytest.raises(HelmValuesError, match=re.escape(where)):
        chart.render(values=values, name=RELEASE, namespace=NAMESPACE)
    report = lint(str(CHART), values, strict=True)
    assert any(where in e for e in report["errors"]), report


@pytest.mark.parametrize(
    "values",
    [
        {"replicas": 0},  # the boundary: scaled to zero is allowed, -1 is not
        {"service": {"port": 1}},
        {"service": {"port": 65535}},
        {"autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 1}},
        {"terminationGracePeriodSeconds": 0},
    ],
)
def test_values_schema_accepts_the_boundaries(chart: Any, values: dict[str, Any]) -> None:
    for doc in render(chart, values):
        validate_object(doc)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"pools": UNLISTED_POOL}, "lists no endpoints: give them, or set discovery.enabled or vllm.enabled"),
        ({"pools": [{"model": MODEL, "endpoints": [{"url": "http://a"}]}] * 2}, "pools[1]: model"),
        ({"mode": "sidecar", "discovery": {"enabled": True}}, "mode: sidecar puts kvgate in each vLLM pod"),
        ({"autoscaling": {"enabled": True, "minReplicas": 4, "maxReplicas": 3}}, "maxReplicas"),
    ],
)
def test_values_the_schema_cannot_judge_fail_the_render_with_a_reason(
    chart: Any, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(HelmRenderError, match=re.escape(message)):
        chart.render(values=values, name=RELEASE, namespace=NAMESPACE)


def _values_schema_module() -> Any:
    spec = importlib.util.spec_from_file_location(
        "helm_values_schema", ROOT / "scripts" / "helm_values_schema.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shipped_values_schema_is_the_generated_one(chart: Any) -> None:
    stale = (
        "config/helm/kvgate/values.schema.json is not what the gateway config's structs generate: "
        "make schemas (python scripts/helm_values_schema.py > config/helm/kvgate/values.schema.json)"
    )
    assert (
        json.loads((CHART / "values.schema.json").read_text())
        == _values_schema_module().chart_values_schema()
    ), stale
    chart.validate_schema(yaml.safe_load((CHART / "values.yaml").read_text()))


def test_chart_image_and_package_agree_on_version_port_and_user() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert meta["appVersion"] == version
    assert f'org.opencontainers.image.version="{version}"' in dockerfile
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert re.search(rf"^EXPOSE {values['config']['listen']['port']}$", dockerfile, re.M)
    assert re.search(r"^USER 10001$", dockerfile, re.M)  # the chart's runAsUser


def test_the_readmes_helm_values_install(chart: Any) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("With Helm, the same from values") :]
    start = section.index("```yaml") + len("```yaml")
    values = yaml.safe_load(section[start : section.index("```", start)])
    docs = render(chart, values)
    for doc in docs:
        validate_object(doc)
    (spec,) = gateway_config(docs).pools
    assert spec.discovery == "kubernetes" and {d["kind"] for d in docs} >= {"Role", "ServiceMonitor"}

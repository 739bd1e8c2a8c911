"""Kubernetes discovery: pod -> endpoint translation (pure), its config, and the pod watcher driven by the
real kubernetes_asyncio client through a kubeconfig at a fake API server (tests/support/fake_kube_api.py).

The watcher's contract: only Running, Ready, not-terminating pods with an IP are endpoints; watches
resume from the last resourceVersion (bookmarks advance it); 410 Gone lists again and diffs without
emptying the pool (pods present before and after keep their Endpoint object); errors back off and
change nothing.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fake_kube_api import FakeKubeApi, parse_selector, running_pod, self_signed_tls
from helpers import eventually
from prometheus_client import CollectorRegistry

from gateway.config import config_from_mapping
from router.discovery.config import KubernetesDiscovery, validate_kubernetes
from router.discovery.kubernetes import KubePodSource, PodWatcher, WatchedPool, check_credentials, watch_pools
from router.discovery.metrics import DiscoveryMetrics
from router.discovery.pods import label_safe, pod_endpoint, skip_reason, zmq_endpoint
from router.endpoint import Endpoint

ROOT = Path(__file__).resolve().parents[2]
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
SELECTOR = "app=vllm"
pytestmark = pytest.mark.timeout(30)


def pod(**over: Any) -> dict[str, Any]:
    """A serving pod as the API returns it; `over` patches metadata/status/labels/annotations."""
    p: dict[str, Any] = {
        "metadata": {"name": "vllm-0", "namespace": "llm", "uid": "u-0", "resourceVersion": "7",
                     "labels": {"app": "vllm"}, "annotations": {}},
        "spec": {"containers": [{"name": "vllm", "ports": [{"name": "http", "containerPort": 8000},
                                                          {"name": "metrics", "containerPort": 9000}]}]},
        "status": {"phase": "Running", "podIP": "10.1.2.3",
                   "conditions": [{"type": "PodScheduled", "status": "True"},
                                  {"type": "Ready", "status": "True"}]},
    }  # fmt: skip
    for key in ("labels", "annotations"):
        p["metadata"][key].update(over.pop(key, {}))
    p["metadata"].update(over.pop("metadata", {}))
    p["status"].update(over.pop("status", {}))
    assert not over, over
    return p


# ---- translation ------------------------------------------------------------------------------


def test_a_running_ready_pod_serves_at_its_ip_with_role_and_version_from_labels() -> None:
    k = KubernetesDiscovery(label_selector=SELECTOR, port=8000, version_label="app.kubernetes.io/version")
    spec = pod_endpoint(pod(labels={"llm-d.ai/role": "decode", "app.kubernetes.io/version": "v2"}), k, MODEL)
    assert spec is not None
    assert (spec.uid, spec.name, spec.url) == ("u-0", "llm/vllm-0", "http://10.1.2.3:8000")
    assert (spec.role, spec.version, spec.kv_events, spec.kv_events_replay) == ("decode", "v2", None, None)


def test_no_role_label_is_both_and_no_version_label_is_empty() -> None:
    spec = pod_endpoint(pod(), KubernetesDiscovery(label_selector=SELECTOR), MODEL)
    assert spec is not None and (spec.role, spec.version) == ("both", "")


@pytest.mark.parametrize(
    ("patch", "reason"),
    [
        ({"status": {"phase": "Pending"}}, "phase Pending"),
        ({"status": {"phase": "Succeeded"}}, "phase Succeeded"),
        ({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}, "not ready"),
        ({"status": {"conditions": [{"type": "PodScheduled", "status": "True"}]}}, "not ready"),
        ({"status": {"conditions": [{"type": "Ready", "status": "Unknown"}]}}, "not ready"),
        ({"metadata": {"deletionTimestamp": "2026-12-02T00:00:00Z"}}, "terminating"),  # still Ready
        ({"status": {"podIP": ""}}, "no pod IP"),
        ({"labels": {"llm-d.ai/role": "router"}}, "label llm-d.ai/role='router'"),
    ],
)
def test_pods_that_serve_nothing_say_why(patch: dict[str, Any], reason: str) -> None:
    k = KubernetesDiscovery(label_selector=SELECTOR)
    p = pod(**copy.deepcopy(patch))
    assert pod_endpoint(p, k, MODEL) is None
    assert (skip_reason(p, k, MODEL) or "").startswith(reason)


def test_a_named_port_is_looked_up_in_the_containers_and_its_absence_skips_the_pod() -> None:
    spec = pod_endpoint(pod(), KubernetesDiscovery(label_selector=SELECTOR, port_name="metrics"), MODEL)
    assert spec is not None and spec.url == "http://10.1.2.3:9000"
    k = KubernetesDiscovery(label_selector=SELECTOR, port_name="grpc")
    assert pod_endpoint(pod(), k, MODEL) is None
    assert skip_reason(pod(), k, MODEL) == "no container port named 'grpc'"


def test_an_ipv6_pod_ip_is_bracketed_in_urls_and_zmq_endpoints() -> None:
    k = KubernetesDiscovery(label_selector=SELECTOR, kv_events_port=5557)
    spec = pod_endpoint(pod(status={"podIP": "fd00::7"}), k, MODEL)
    assert spec is not None
    assert (spec.url, spec.kv_events) == ("http://[fd00::7]:8000", "tcp://[fd00::7]:5557")


@pytest.mark.parametrize(
    ("annotation", "port", "expected"),
    [
        ("tcp://*:5557", None, "tcp://10.1.2.3:5557"),  # as given to vLLM's --kv-events-config
        ("tcp://0.0.0.0:5557", None, "tcp://10.1.2.3:5557"),
        ("5559", 5557, "tcp://10.1.2.3:5559"),  # the annotation wins over the port
        ("tcp://kv-relay.llm:6000", None, "tcp://kv-relay.llm:6000"),
        ("ipc:///tmp/kv", 5557, "tcp://10.1.2.3:5557"),  # another form: ignored, the port applies
        ("ipc:///tmp/kv", None, None),
        (None, 5557, "tcp://10.1.2.3:5557"),
        (None, None, None),
    ],
)
def test_the_kv_events_endpoint_comes_from_the_annotation_else_the_port(
    annotation: str | None, port: int | None, expected: str | None
) -> None:
    assert zmq_endpoint(annotation, port, "10.1.2.3") == expected


def test_kv_events_and_replay_annotations_reach_the_endpoint() -> None:
    k = KubernetesDiscovery(label_selector=SELECTOR)
    p = pod(annotations={"kvgate.io/kv-events": "tcp://*:5557", "kvgate.io/kv-events-replay": "tcp://*:5558"})
    spec = pod_endpoint(p, k, MODEL)
    assert spec is not None
    assert (spec.kv_events, spec.kv_events_replay) == ("tcp://10.1.2.3:5557", "tcp://10.1.2.3:5558")


@pytest.mark.parametrize(
    ("value", "serves"),
    [
        (MODEL, True),
        ("meta-llama-Llama-3.1-8B-Instruct", True),
        ("meta-llama-llama-3.1-8b-instruct", True),
        ("llama-8b", True),  # model_label_value
        ("qwen-2.5-7b", False),
        (None, True),
    ],
)
def test_a_model_label_must_name_the_pools_model_or_its_label_safe_form(value: str | None,
                                                                        serves: bool) -> None:
    k = KubernetesDiscovery(label_selector=SELECTOR, model_label="llm-d.ai/model",
                            model_label_value="llama-8b")
    labels = {"llm-d.ai/model": value} if value is not None else {}
    assert (pod_endpoint(pod(labels=labels), k, MODEL) is not None) is serves


def test_label_safe_keeps_63_label_characters_alphanumeric_at_both_ends() -> None:
    assert label_safe("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama-Llama-3.1-8B-Instruct"
    assert label_safe("org/" + "x" * 70) == "org-" + "x" * 59
    assert label_safe("/m/") == "m"


# ---- config -----------------------------------------------------------------------------------


def pool_config(**kube: Any) -> dict[str, Any]:
    return {"pools": {MODEL: {"discovery": "kubernetes", "kubernetes": {"label_selector": SELECTOR, **kube}}}}


def test_a_kubernetes_pool_decodes_without_endpoints() -> None:
    cfg = config_from_mapping(pool_config(namespace="llm", port_name="http", kv_events_port=5557))
    (spec,) = cfg.pools
    assert spec.discovery == "kubernetes" and spec.endpoints == []
    assert spec.kubernetes == KubernetesDiscovery(
        label_selector=SELECTOR, namespace="llm", port_name="http", kv_events_port=5557
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"pools": {MODEL: {"discovery": "kubernetes"}}}, f"pools.{MODEL}.kubernetes: required"),
        ({"pools": {MODEL: {"discovery": "dns", "kubernetes": {}}}}, f"pools.{MODEL}.discovery: 'dns'"),
        ({"pools": {MODEL: {"endpoints": [{"url": "http://a:1"}], "kubernetes": {"label_selector": "a"}}}},
         f"pools.{MODEL}.kubernetes: applies only with discovery: kubernetes"),
        (pool_config(label_selector=" "), f"pools.{MODEL}.kubernetes.label_selector: required"),
        (pool_config(labelSelector="x"), f"pools.{MODEL}.kubernetes: unknown keys ['labelSelector']"),
        (pool_config(port="http"), f"pools.{MODEL}.kubernetes.port: expected int"),
        (pool_config(port=0), f"pools.{MODEL}.kubernetes.port: 0 is not a TCP port"),
        (pool_config(kv_events_port=65536), f"pools.{MODEL}.kubernetes.kv_events_port: 65536 is not"),
        (pool_config(auth="token"), f"pools.{MODEL}.kubernetes.auth: 'token' is not one of"),
        (pool_config(auth="in-cluster", kubeconfig="/k"),
         f"pools.{MODEL}.kubernetes: kubeconfig and context do not apply to auth: in-cluster"),
        (pool_config(watch_timeout_s=0), f"pools.{MODEL}.kubernetes.watch_timeout_s: must be positive"),
        (pool_config(backoff_initial_s=2, backoff_max_s=1),
         f"pools.{MODEL}.kubernetes.backoff_max_s: must be at least"),
        ({"pools": {MODEL: {}}}, f"pools.{MODEL}.endpoints: at least one endpoint is needed"),
    ],
)
def test_bad_discovery_config_names_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        config_from_mapping(data)


def test_the_example_configs_discovery_block_lists_every_key_at_its_default() -> None:
    lines = [line.strip() for line in (ROOT / "config" / "kvgate.example.yaml").read_text().splitlines()]
    start = lines.index(next(line for line in lines if line.startswith("# discovery: kubernetes")))
    block = [lines[start][2:]]
    for line in lines[start + 1:]:
        if not line.startswith(("# kubernetes:", "#   ")):
            break
        block.append(line[2:])
    data = yaml.safe_load("\n".join(block))
    (spec,) = config_from_mapping({"pools": {MODEL: data}}).pools
    assert spec.discovery == "kubernetes"
    assert set(data["kubernetes"]) == {f.name for f in dataclasses.fields(KubernetesDiscovery)}
    assert spec.kubernetes == KubernetesDiscovery(label_selector=data["kubernetes"]["label_selector"])


def test_the_shipped_discovery_manifest_finds_the_shipped_vllm_pods_with_only_pod_read_rights() -> None:
    k8s = ROOT / "config" / "k8s"
    docs = {d["kind"]: d for d in yaml.safe_load_all((k8s / "kvgate-discovery.yaml").read_text())}
    vllm = next(d for d in yaml.safe_load_all((k8s / "vllm.yaml").read_text()) if d["kind"] == "StatefulSet")
    cfg = config_from_mapping(yaml.safe_load(docs["ConfigMap"]["data"]["kvgate.yaml"]))
    (spec,) = cfg.pools
    assert spec.kubernetes is not None and spec.policy.params["index"] == "precise"
    template = vllm["spec"]["template"]
    assert parse_selector(spec.kubernetes.label_selector)(template["metadata"]["labels"])
    ep = pod_endpoint(running_pod(template, "llm"), spec.kubernetes, spec.model)
    assert ep is not None
    assert (ep.url, ep.role) == ("http://10.0.0.5:8000", "both")
    assert (ep.kv_events, ep.kv_events_replay) == ("tcp://10.0.0.5:5557", "tcp://10.0.0.5:5558")
    read_pods = {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
    assert docs["Role"]["rules"] == [read_pods]
    account = docs["ServiceAccount"]["metadata"]["name"]
    assert docs["RoleBinding"]["subjects"] == [{"kind": "ServiceAccount", "name": account}]
    assert docs["RoleBinding"]["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
    assert docs["Deployment"]["spec"]["template"]["spec"]["serviceAccountName"] == account


def test_the_readmes_discovery_example_decodes() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Kubernetes discovery"):]
    snippet = section[section.index("```yaml") + 7: section.index("```", section.index("```yaml") + 7)]
    (spec,) = config_from_mapping(yaml.safe_load(snippet)).pools
    assert spec.discovery == "kubernetes" and spec.kubernetes is not None
    assert spec.kubernetes.port_name == "http" and spec.kubernetes.kv_events_port == 5557


def test_port_boundaries_1_and_65535_are_valid() -> None:
    for port in (1, 65535):
        validate_kubernetes(KubernetesDiscovery(label_selector=SELECTOR, port=port, kv_events_port=port), "k")


def test_a_discovered_pool_may_configure_pd_before_any_prefill_pod_exists() -> None:
    data = pool_config()
    data["pools"][MODEL]["pd"] = {"threshold_tokens": 128}
    (spec,) = config_from_mapping(data).pools
    assert spec.pd is not None and spec.pd.threshold_tokens == 128


def test_missing_credentials_fail_naming_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=rf"^p\.kubeconfig: {missing} does not exist$"):
        check_credentials(KubernetesDiscovery(label_selector=SELECTOR, kubeconfig=str(missing)), "p")
    with pytest.raises(ValueError, match=r"^p\.auth: in-cluster, but .*/token does not exist"):
        check_credentials(KubernetesDiscovery(label_selector=SELECTOR, auth="in-cluster"), "p")
    # auto names no file: loading credentials is part of connecting (retried, logged), not a startup check
    monkeypatch.setenv("KUBECONFIG", str(missing))
    check_credentials(KubernetesDiscovery(label_selector=SELECTOR), "p")


def test_the_fake_api_servers_label_selectors() -> None:
    labels = {"app": "vllm", "tier": "gpu"}
    cases = {
        "app=vllm": True, "app==vllm": True, "app!=vllm": False, "app=vllm,tier=cpu": False,
        "tier in (gpu, tpu)": True, "tier notin (gpu)": False, "app": True, "!app": False, "!zone": True,
        "app=vllm,tier in (cpu,gpu),!zone": True, "": True,
    }  # fmt: skip
    for selector, expected in cases.items():
        assert parse_selector(selector)(labels) is expected, selector
    with pytest.raises(ValueError):
        parse_selector("app=(")


# ---- the watcher over the fake API server -----------------------------------------------------


class Pool:
    """Stands in for gateway.pools.Pool: applies update(added, removed) and records each call."""

    def __init__(self) -> None:
        self.endpoints: list[Endpoint] = []
        self.updates: list[tuple[list[str], list[str]]] = []

    def update(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        gone = set(removed)
        assert gone <= set(self.endpoints), "removed an endpoint the pool does not have"
        self.endpoints = [ep for ep in self.endpoints if ep not in gone] + list(added)
        self.updates.append(([ep.url for ep in added], [ep.url for ep in removed]))

    def urls(self) -> set[str]:
        return {ep.url for ep in self.endpoints}

    def by_url(self, url: str) -> Endpoint:
        return next(ep for ep in self.endpoints if ep.url == url)


class Harness:
    def __init__(self, api: FakeKubeApi, watcher: PodWatcher, pool: Pool, registry: CollectorRegistry,
                 sleeps: list[float]) -> None:
        self.api, self.watcher, self.pool, self.registry, self.sleeps = api, watcher, pool, registry, sleeps

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, {"pool": MODEL, **labels}) or 0.0


def add(api: FakeKubeApi, i: int, **kw: Any) -> None:
    api.add_pod(f"vllm-{i}", labels={"app": "vllm", **kw.pop("labels", {})}, ports={"http": 8000 + i}, **kw)


def url(i: int) -> str:
    return f"http://127.0.0.1:{8000 + i}"


@pytest.fixture
async def api() -> AsyncIterator[FakeKubeApi]:
    server = await FakeKubeApi(namespace="llm").start()
    yield server
    await server.stop()


@pytest.fixture
async def harness(api: FakeKubeApi, tmp_path: Path) -> AsyncIterator[Any]:
    tasks: list[asyncio.Task[None]] = []
    sources: list[KubePodSource] = []

    async def start(**settings: Any) -> Harness:
        defaults = {"port_name": "http", "backoff_initial_s": 0.01, "backoff_max_s": 0.05,
                    "watch_timeout_s": 30}  # fmt: skip
        kubeconfig = str(api.write_kubeconfig(tmp_path / "kubeconfig"))
        k = KubernetesDiscovery(label_selector=SELECTOR, kubeconfig=kubeconfig, **{**defaults, **settings})
        source = KubePodSource(k)
        sources.append(source)
        pool, registry, sleeps = Pool(), CollectorRegistry(), []

        async def sleep(delay: float) -> None:
            sleeps.append(delay)
            await asyncio.sleep(delay)

        watcher = PodWatcher(MODEL, k, source, pool.update, DiscoveryMetrics(registry), sleep=sleep)
        tasks.append(asyncio.create_task(watcher.run()))
        await asyncio.wait_for(watcher.synced.wait(), 10)
        return Harness(api, watcher, pool, registry, sleeps)

    yield start
    for task in tasks:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    for source in sources:
        await source.close()


async def watching(h: Harness, n: int = 1) -> None:
    await eventually(lambda: h.api.open_watches >= n, within=5, what="the watch to be open")


async def test_the_kubeconfigs_context_gives_namespace_and_token(api: FakeKubeApi, harness) -> None:
    api.add_pod("vllm-0", namespace="other", labels={"app": "vllm"}, ports={"http": 8000})
    h = await harness()
    assert h.watcher.source.namespace == "llm"
    assert h.pool.endpoints == []  # the pod in namespace "other" is not the pool's
    assert api.requests[0].namespace == "llm" and api.requests[0].query["labelSelector"] == SELECTOR


async def test_in_cluster_auth_uses_the_service_account_over_tls(tmp_path: Path, monkeypatch) -> None:
    from kubernetes_asyncio.config import incluster_config

    from router.discovery import kubernetes

    tls, ca = self_signed_tls(tmp_path)
    server = await FakeKubeApi(token="sa-token", namespace="serving", tls=tls).start()
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("sa-token")
    (account / "namespace").write_text("serving\n")
    (account / "ca.crt").write_bytes(ca.read_bytes())
    monkeypatch.setattr(kubernetes, "SERVICE_ACCOUNT", str(account))
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(account / "token"))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(account / "ca.crt"))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(server.port))
    server.add_pod("vllm-0", labels={"app": "vllm"}, ports={"http": 8000})
    k = KubernetesDiscovery(label_selector=SELECTOR, port_name="http")  # auth auto: in a pod
    check_credentials(k, "p")
    source = KubePodSource(k)
    try:
        pods = await source.list()
        assert source.namespace == "serving" and [p["metadata"]["name"] for p in pods.items] == ["vllm-0"]
        assert server.requests[0].namespace == "serving"
    finally:
        await source.close()
        await server.stop()


async def test_a_wrong_token_is_an_error_that_is_retried_and_changes_nothing(api, tmp_path) -> None:
    add(api, 0)
    path = api.write_kubeconfig(tmp_path / "kc")
    path.write_text(path.read_text().replace("fake-token", "stolen"))
    k = KubernetesDiscovery(label_selector=SELECTOR, kubeconfig=str(path), port_name="http",
                            backoff_initial_s=0.01, backoff_max_s=0.02)  # fmt: skip
    source = KubePodSource(k)
    pool, registry = Pool(), CollectorRegistry()
    watcher = PodWatcher(MODEL, k, source, pool.update, DiscoveryMetrics(registry))
    task = asyncio.create_task(watcher.run())
    try:
        errors = {"pool": MODEL, "reason": "error"}
        await eventually(lambda: (registry.get_sample_value("kvgate_discovery_watch_restarts_total", errors)
                                  or 0) >= 3, within=5, what="the list to be retried")  # fmt: skip
        assert pool.endpoints == [] and not watcher.synced.is_set()
        assert all(r.query.get("watch") is None for r in api.requests)  # no watch without a list
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await source.close()


async def test_credentials_that_appear_later_are_picked_up_by_the_retries(api, tmp_path, monkeypatch) -> None:
    add(api, 0)
    later = tmp_path / "later-kubeconfig"
    monkeypatch.setenv("KUBECONFIG", str(later))  # auth auto, no kubeconfig named: $KUBECONFIG
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    k = KubernetesDiscovery(label_selector=SELECTOR, port_name="http", backoff_initial_s=0.01,
                            backoff_max_s=0.02)  # fmt: skip
    source, pool, registry = KubePodSource(k), Pool(), CollectorRegistry()
    watcher = PodWatcher(MODEL, k, source, pool.update, DiscoveryMetrics(registry))
    task = asyncio.create_task(watcher.run())
    try:
        errors = {"pool": MODEL, "reason": "error"}
        await eventually(lambda: (registry.get_sample_value("kvgate_discovery_watch_restarts_total", errors)
                                  or 0) >= 2, within=5, what="failed connects")  # fmt: skip
        assert api.requests == []
        api.write_kubeconfig(later)
        await eventually(lambda: pool.urls() == {url(0)}, within=5, what="the pod once credentials exist")
        assert source.namespace == "llm"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await source.close()


async def test_startup_waits_for_the_first_list_only_up_to_its_timeout(api, tmp_path) -> None:
    add(api, 0)
    k = KubernetesDiscovery(label_selector=SELECTOR, port_name="http", initial_sync_timeout_s=0.3,
                            kubeconfig=str(api.write_kubeconfig(tmp_path / "kc")))  # fmt: skip
    pools = [Pool(), Pool()]
    patient = dataclasses.replace(k, initial_sync_timeout_s=10)
    watched = [WatchedPool(MODEL, patient, pools[0].update), WatchedPool("other", k, pools[1].update)]
    registry = CollectorRegistry()
    async with watch_pools(watched[:1], DiscoveryMetrics(registry)):  # an API server that answers
        assert pools[0].urls() == {url(0)}  # listed before the block runs
    await eventually(lambda: api.open_watches == 0, within=5, what="the watch to end with the block")
    api.pause()  # one that does not answer: startup goes on after initial_sync_timeout_s
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with watch_pools(watched[1:], DiscoveryMetrics(CollectorRegistry())) as (watcher,):
        assert 0.3 <= loop.time() - started < 2.0
        assert pools[1].endpoints == [] and not watcher.synced.is_set()
        api.resume()
        await eventually(lambda: pools[1].urls() == {url(0)}, within=5, what="the pool to fill later")


async def test_the_first_list_adds_the_serving_pods_only(api: FakeKubeApi, harness) -> None:
    add(api, 0)
    add(api, 1, ready=False)
    add(api, 2, phase="Pending", ip=None)
    add(api, 3, labels={"app": "other"})
    add(api, 4, labels={"llm-d.ai/role": "prefill", "app.kubernetes.io/version": "v1"})
    h = await harness()
    assert h.pool.urls() == {url(0), url(4)}
    assert len(h.pool.updates) == 1  # one update for the whole list
    prefill = h.pool.by_url(url(4))
    assert (prefill.role, prefill.version, prefill.model) == ("prefill", "v1", MODEL)
    assert prefill.labels == {"pod": "llm/vllm-4"}
    assert h.metric("kvgate_discovery_endpoints") == 2
    assert h.watcher.resource_version == str(api.rv)


async def test_pods_join_when_ready_and_leave_when_not_ready_terminating_or_deleted(api, harness) -> None:
    add(api, 0)
    add(api, 1, ready=False)
    add(api, 2)
    add(api, 3)
    h = await harness()
    await watching(h)
    assert h.pool.urls() == {url(0), url(2), url(3)}
    api.set_ready("vllm-1", True)
    await eventually(lambda: url(1) in h.pool.urls(), within=5, what="vllm-1 to join once Ready")
    api.set_ready("vllm-0", False)
    await eventually(lambda: url(0) not in h.pool.urls(), within=5, what="vllm-0 to leave when NotReady")
    api.terminate("vllm-2")  # still Ready, but being deleted
    await eventually(lambda: url(2) not in h.pool.urls(), within=5, what="vllm-2 to leave when terminating")
    api.delete_pod("vllm-3")
    await eventually(lambda: url(3) not in h.pool.urls(), within=5, what="vllm-3 to leave when deleted")
    assert h.pool.urls() == {url(1)}
    api.delete_pod("vllm-2")  # the deletion of a pod already out changes nothing
    api.set_ready("vllm-0", True)
    await eventually(lambda: url(0) in h.pool.urls(), within=5, what="vllm-0 to come back")
    assert h.pool.updates[-2:] == [([], [url(3)]), ([url(0)], [])]
    assert h.metric("kvgate_discovery_endpoints") == 2
    assert h.metric("kvgate_discovery_watch_restarts_total", reason="error") == 0


async def test_a_pod_whose_role_or_version_label_changes_is_removed_and_added_again(api, harness) -> None:
    add(api, 0, labels={"llm-d.ai/role": "both"})
    h = await harness()
    await watching(h)
    before = h.pool.by_url(url(0))
    api.relabel("vllm-0", {"llm-d.ai/role": "decode"})
    await eventually(lambda: h.pool.endpoints and h.pool.endpoints[0].role == "decode", within=5,
                     what="the decode endpoint")  # fmt: skip
    after = h.pool.by_url(url(0))
    assert after is not before and h.pool.updates[-1] == ([url(0)], [url(0)])
    api.relabel("vllm-0", {"app.kubernetes.io/version": "v2"})
    await eventually(lambda: h.pool.endpoints[0].version == "v2", within=5, what="the v2 endpoint")
    assert h.pool.by_url(url(0)) is not after
    n = len(h.pool.updates)
    api.relabel("vllm-0", {"unrelated": "x"})  # a change that leaves the endpoint as it was
    api.relabel("vllm-0", {"app": "retired"})  # leaves the selector: the watch says DELETED
    await eventually(lambda: not h.pool.endpoints, within=5, what="the pod to leave the selector")
    assert len(h.pool.updates) == n + 1


async def test_a_bookmark_advances_the_resource_version_a_resumed_watch_starts_from(api, harness) -> None:
    add(api, 0)
    h = await harness()
    await watching(h)
    for i in range(5):  # changes elsewhere in the cluster move the resourceVersion on
        api.add_pod(f"db-{i}", labels={"app": "postgres"})
    assert h.watcher.resource_version != str(api.rv)
    api.bookmark()
    await eventually(lambda: h.watcher.resource_version == str(api.rv), within=5, what="the bookmark")
    assert h.metric("kvgate_discovery_watch_events_total", type="BOOKMARK") == 1
    api.compact()  # history gone, but the bookmark's RV is not older than what is kept
    api.end_watches()
    await eventually(lambda: len(api.watch_requests()) == 2 and api.open_watches == 1, within=5,
                     what="the resumed watch")  # fmt: skip
    assert api.watch_requests()[-1].query["resourceVersion"] == str(api.rv)
    assert api.watch_requests()[-1].query["allowWatchBookmarks"] == "True"
    assert len(api.list_requests()) == 1  # resumed, not listed again
    assert h.metric("kvgate_discovery_watch_restarts_total", reason="resume") == 1
    assert h.metric("kvgate_discovery_watch_restarts_total", reason="relist") == 0
    assert h.pool.urls() == {url(0)}


async def test_without_a_bookmark_a_stale_resource_version_gets_410_and_a_relist(api, harness) -> None:
    add(api, 0)
    h = await harness()
    await watching(h)
    for i in range(5):
        api.add_pod(f"db-{i}", labels={"app": "postgres"})
    api.compact()
    api.end_watches()
    await eventually(lambda: len(api.list_requests()) == 2, within=5, what="the relist after 410")
    assert h.metric("kvgate_discovery_watch_restarts_total", reason="relist") == 1
    assert h.metric("kvgate_discovery_watch_events_total", type="ERROR") == 1
    await eventually(lambda: api.open_watches == 1, within=5, what="the new watch")
    assert api.watch_requests()[-1].query["resourceVersion"] == str(api.rv)
    assert h.pool.urls() == {url(0)} and len(h.pool.updates) == 1  # nothing changed: no update at all


async def test_a_dropped_watch_resumes_from_its_resource_version_and_misses_nothing(api, harness) -> None:
    for i in range(3):
        add(api, i)
    h = await harness()
    await watching(h)
    held = list(h.pool.endpoints)
    rv = h.watcher.resource_version
    api.pause()  # the API server is out of reach: the reconnect waits
    api.drop_watches()
    await eventually(lambda: api.held == 1, within=5, what="the reconnect to be waiting")
    api.set_ready("vllm-1", False)
    add(api, 3)
    assert h.pool.endpoints == held  # a broken watch changes nothing
    api.resume()
    await eventually(lambda: h.pool.urls() == {url(0), url(2), url(3)}, within=5, what="the missed events")
    assert api.watch_requests()[1].query["resourceVersion"] == rv
    assert len(api.list_requests()) == 1
    assert h.pool.by_url(url(0)) is held[0] and h.pool.by_url(url(2)) is held[2]
    assert h.metric("kvgate_discovery_watch_restarts_total", reason="error") == 1


async def test_a_410_relist_diffs_keeping_the_pods_present_before_and_after(api, harness) -> None:
    for i in range(4):
        add(api, i)
    h = await harness()
    await watching(h)
    held = {ep.url: ep for ep in h.pool.endpoints}
    n = len(h.pool.updates)
    api.pause()
    api.drop_watches()
    await eventually(lambda: api.held == 1, within=5, what="the reconnect to be waiting")
    api.delete_pod("vllm-0")
    api.set_ready("vllm-1", False)
    api.relabel("vllm-2", {"llm-d.ai/role": "decode"})
    add(api, 4)
    add(api, 5, ready=False)
    api.compact()  # the watcher's resourceVersion is now older than the history kept
    api.resume()
    await eventually(lambda: len(api.list_requests()) == 2 and api.open_watches == 1, within=5,
                     what="the relist and the new watch")  # fmt: skip
    assert h.pool.urls() == {url(2), url(3), url(4)}
    assert h.pool.by_url(url(3)) is held[url(3)]  # untouched pod: same Endpoint, index state and all
    assert h.pool.by_url(url(2)) is not held[url(2)] and h.pool.by_url(url(2)).role == "decode"
    added, removed = h.pool.updates[n]
    assert len(h.pool.updates) == n + 1  # the whole diff in one update
    assert sorted(added) == [url(2), url(4)] and sorted(removed) == [url(0), url(1), url(2)]
    assert h.metric("kvgate_discovery_watch_restarts_total", reason="relist") == 1


async def test_api_errors_back_off_doubling_and_never_empty_the_pool(api, harness) -> None:
    add(api, 0)
    add(api, 1)
    h = await harness(backoff_initial_s=0.01, backoff_max_s=0.04)
    await watching(h)
    held = list(h.pool.endpoints)
    api.fail_next(6, status=500)
    api.drop_watches()
    await eventually(lambda: api.open_watches == 1 and len(h.sleeps) >= 7, within=10,
                     what="the watch to be back after six failures")  # fmt: skip
    d = h.sleeps
    bounds = [(0.005, 0.01), (0.01, 0.02)] + [(0.02, 0.04)] * 5  # initial x 2^n in [d/2, d], capped
    for delay, (lo, hi) in zip(d, bounds, strict=True):
        assert lo <= delay <= hi, d
    assert h.pool.endpoints == held
    assert h.metric("kvgate_discovery_watch_restarts_total", reason="error") == 7
    add(api, 2)  # the restored watch delivers again, and the next failure starts from the initial delay
    await eventually(lambda: url(2) in h.pool.urls(), within=5, what="vllm-2")
    api.drop_watches()
    await eventually(lambda: len(h.sleeps) == 8, within=5, what="one more backoff")
    assert 0.005 <= h.sleeps[-1] <= 0.01


async def test_an_api_server_answering_410_to_every_watch_is_relisted_with_backoff(api, harness) -> None:
    add(api, 0)
    h = await harness(backoff_initial_s=0.01, backoff_max_s=0.04)
    await watching(h)
    held = list(h.pool.endpoints)
    api.oldest_rv = api.rv + 1_000_000  # every watch from now on: 410 Gone
    api.end_watches()
    await eventually(lambda: len(h.sleeps) >= 4, within=10, what="backoffs between relists")
    assert h.sleeps[0] <= 0.01 and h.sleeps[2] >= 0.02  # the first relist is immediate, then doubling
    assert len(api.list_requests()) >= 5 and h.pool.endpoints == held
    assert h.metric("kvgate_discovery_watch_restarts_total", reason="relist") >= 5
    api.oldest_rv = 0
    await eventually(lambda: api.open_watches == 1, within=5, what="a watch accepted again")
    n = len(h.sleeps)
    add(api, 1)
    await eventually(lambda: url(1) in h.pool.urls(), within=5, what="events again")
    assert len(h.sleeps) == n


async def test_the_connected_gauge_follows_the_watch(api, harness) -> None:
    h = await harness()
    await watching(h)
    await eventually(lambda: h.metric("kvgate_discovery_watch_connected") == 1, within=5, what="connected")
    api.pause()
    api.drop_watches()
    await eventually(lambda: api.held == 1, within=5, what="the reconnect to wait")
    assert h.metric("kvgate_discovery_watch_connected") == 0
    api.resume()
    await eventually(lambda: h.metric("kvgate_discovery_watch_connected") == 1, within=5, what="reconnected")


async def test_a_watch_ending_at_its_timeout_is_resumed_with_a_jittered_timeout(api, harness) -> None:
    add(api, 0)
    h = await harness(watch_timeout_s=1)
    await eventually(lambda: len(api.watch_requests()) >= 2, within=10, what="a watch to time out")
    timeouts = [int(r.query["timeoutSeconds"]) for r in api.watch_requests()]
    assert all(1 <= t <= 2 for t in timeouts), timeouts
    assert h.metric("kvgate_discovery_watch_restarts_total", reason="resume") >= 1
    assert h.metric("kvgate_discovery_watch_restarts_total", reason="error") == 0
    assert h.pool.urls() == {url(0)}


async def test_a_pod_ip_taken_over_by_a_new_pod_replaces_the_stale_endpoint(api, harness) -> None:
    add(api, 0)
    h = await harness()
    await watching(h)
    api.pause()
    api.drop_watches()
    await eventually(lambda: api.held == 1, within=5, what="the reconnect to be waiting")
    api.delete_pod("vllm-0")
    api.add_pod("vllm-0b", labels={"app": "vllm"}, ports={"http": 8000})  # same IP and port
    api.compact()
    api.resume()
    await eventually(lambda: [ep.labels["pod"] for ep in h.pool.endpoints] == ["llm/vllm-0b"], within=5,
                     what="the new pod alone")  # fmt: skip
    assert h.pool.updates[-1] == ([url(0)], [url(0)])


# ---- the CLI ----------------------------------------------------------------------------------

BLOCKER = """\
import sys


class _Blocker:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] == "kubernetes_asyncio":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _Blocker)
"""


def serve(tmp_path: Path, config: dict[str, Any], block: bool) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "kvgate.yaml"
    path.write_text(yaml.safe_dump({"listen": {"port": 0}, **config}))
    env = dict(os.environ)
    if block:
        (tmp_path / "sitecustomize.py").write_text(BLOCKER)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--config", str(path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)  # fmt: skip


def test_without_the_extra_serve_says_in_one_line_what_to_install(tmp_path: Path) -> None:
    result = serve(tmp_path, pool_config(kubeconfig=str(tmp_path / "kc")), block=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "kvgate serve: needs the optional package 'kubernetes_asyncio': pip install 'kvgate[kubernetes]'"
    )


def test_a_missing_kubeconfig_fails_serve_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "kc"
    result = serve(tmp_path, pool_config(kubeconfig=str(missing)), block=False)
    assert result.returncode == 2, result.stderr
    expected = f"kvgate serve: pools.{MODEL}.kubernetes.kubeconfig: {missing} does not exist"
    assert result.stderr.strip() == expected

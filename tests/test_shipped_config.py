"""What kvgate ships under config/ works: the example config and the Kubernetes ConfigMap build a gateway,
and every metric the Grafana dashboard queries is one the gateway (or a vLLM pod) really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry

from bench.sim.fleet import SimFleet
from gateway.app import build_app
from gateway.config import config_from_mapping, load_config

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "config" / "grafana" / "kvgate-dashboard.json"
K8S = ROOT / "config" / "k8s" / "kvgate.yaml"
PROMQL_NAME = re.compile(r"\b((?:kvgate|vllm)[:_][a-z_:]+)")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def test_example_and_k8s_configs_build_a_gateway() -> None:
    build_app(load_config(str(ROOT / "config" / "kvgate.example.yaml")), registry=CollectorRegistry())
    docs = list(yaml.safe_load_all(K8S.read_text()))
    kinds = {d["kind"] for d in docs}
    assert kinds == {"ConfigMap", "Deployment", "Service"}
    configmap = next(d for d in docs if d["kind"] == "ConfigMap")
    cfg = config_from_mapping(yaml.safe_load(configmap["data"]["kvgate.yaml"]))
    build_app(cfg, registry=CollectorRegistry())
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert cfg.listen.port == container["ports"][0]["containerPort"]


def _dashboard_metric_names() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    names = set()
    for panel in dash["panels"]:
        for target in panel["targets"]:
            names.update(PROMQL_NAME.findall(target["expr"]))
    return names


async def test_dashboard_queries_only_exported_metrics() -> None:
    async with SimFleet(2, model="m", prefill_tps=1e6, itl_ms=0.5) as fleet:
        cfg = config_from_mapping(
            {
                "scrape": {"interval": 0.05},
                "pools": {
                    "m": {
                        "policy": {"name": "cache_aware"},
                        "endpoints": [{"url": u} for u in fleet.urls],
                    }
                },
            }
        )
        app = build_app(cfg, registry=CollectorRegistry())
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            async with aiohttp.ClientSession() as s:
                body = {"model": "m", "prompt": "one two three " * 40, "max_tokens": 2}
                for _ in range(2):
                    async with s.post(f"{url}/v1/completions", json=body) as r:
                        assert r.status == 200
                async with s.get(f"{url}/metrics") as r:
                    gateway_text = await r.text()
                async with s.get(f"{fleet.urls[0]}/metrics") as r:
                    pod_text = await r.text()
        finally:
            await runner.cleanup()
    exported = set(re.findall(r"^# TYPE (\S+) (\S+)", gateway_text + pod_text, re.M))
    series = set()
    for name, kind in exported:
        series.add(name)
        if kind == "counter":
            series.add(f"{name}_total")
        if kind == "histogram":
            series.update(name + s for s in HISTOGRAM_SUFFIXES)
    wanted = _dashboard_metric_names()
    assert wanted, "the dashboard queries no metric"
    missing = sorted(n for n in wanted if n not in series and n.removesuffix("_total") not in series)
    assert not missing, f"dashboard queries metrics nobody exports: {missing}"

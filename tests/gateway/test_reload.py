"""Live reload in process (gateway/reload.py): a real gateway on 127.0.0.1 in front of fake pods, its
config file rewritten and reloaded explicitly (`Reloader.reload`, `Reloader.poll_files`) instead of
waiting for a signal or the poll period."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web
from fake_kube_api import FakeKubeApi
from gateway_fakes import FakePod
from helpers import eventually
from prometheus_client import CollectorRegistry

from gateway.app import build_app
from gateway.config import EndpointSpec, load_config
from gateway.pools import Pool
from gateway.reload import RELOADER, ConfigSource, Reloader, WatchedFiles, diff_endpoints
from gateway.runner import app_runner
from gateway.state import STATE
from router.endpoint import Endpoint

Data = dict[str, Any]


def config_data(urls: list[str], policy: Data | None = None, **sections: Any) -> Data:
    data: Data = {
        "pools": {"m": {"policy": policy or {"name": "round_robin"},
                        "endpoints": [{"url": u} for u in urls]}},
        "health": {"interval": 5.0, "timeout": 1.0},
        "scrape": {"interval": 0},
        "logs": {"access": False},
        "reload": {"interval": 0},
        "seed": 1,
    }
    data.update(sections)
    return data


@dataclass
class Live:
    url: str
    app: web.Application
    registry: CollectorRegistry
    path: Path

    @property
    def reloader(self) -> Reloader:
        return self.app[RELOADER]

    def write(self, data: Data | str) -> None:
        self.path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))

    async def reload(self, data: Data | str) -> bool:
        self.write(data)
        return await self.reloader.reload("test")

    def pool(self, model: str = "m") -> Pool:
        return self.app[STATE].pools.by_model[model]

    def endpoint(self, url: str, model: str = "m") -> Endpoint:
        return next(ep for ep in self.pool(model).endpoints if ep.url == url)

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Callable[[Data], Awaitable[Live]]]:
    runners: list[web.AppRunner] = []

    async def start(data: Data) -> Live:
        path = tmp_path / "kvgate.yaml"
        path.write_text(yaml.safe_dump(data))
        registry = CollectorRegistry()
        source = ConfigSource(lambda: load_config(str(path)), str(path))
        app = build_app(load_config(str(path)), registry=registry, source=source)
        runner = app_runner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return Live(f"http://127.0.0.1:{runner.addresses[0][1]}", app, registry, path)

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def pods() -> AsyncIterator[Callable[..., Awaitable[list[FakePod]]]]:
    made: list[FakePod] = []

    async def make(n: int, **fields: Any) -> list[FakePod]:
        new = [FakePod(name=f"pod{len(made) + i}", **fields) for i in range(n)]
        for pod in new:
            await pod.start()
        made.extend(new)
        return new

    yield make
    for pod in made:
        await pod.stop()


async def complete(http: aiohttp.ClientSession, gw: Live, prompt: str = "hello", model: str = "m",
                   key: str | None = None) -> tuple[int, str]:  # fmt: skip
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": model, "prompt": prompt, "max_tokens": 2}
    async with http.post(f"{gw.url}/v1/completions", json=body, headers=headers) as resp:
        await resp.read()
        return resp.status, resp.headers.get("x-kvgate-endpoint", "")


async def served_by(http: aiohttp.ClientSession, gw: Live, n: int, model: str = "m") -> set[str]:
    urls = set()
    for _ in range(n):
        status, url = await complete(http, gw, model=model)
        assert status == 200
        urls.add(url)
    return urls


# ---- the endpoint diff ------------------------------------------------------------------------


def test_the_endpoint_diff_keeps_reweights_replaces_adds_and_removes() -> None:
    keep, heavy, role, gone = (Endpoint(f"http://p{i}", "m") for i in range(4))
    configured = {ep.url: ep for ep in (keep, heavy, role, gone)}
    diff = diff_endpoints(configured, [
        EndpointSpec("http://p0"), EndpointSpec("http://p1", weight=3.0),
        EndpointSpec("http://p2", role="prefill"), EndpointSpec("http://p9"),
    ], "m")  # fmt: skip
    assert diff.kept["http://p0"] is keep and diff.kept["http://p1"] is heavy
    assert diff.reweighted == [(heavy, 3.0)] and heavy.weight == 1.0  # applied at commit
    assert [ep.url for ep in diff.added] == ["http://p2", "http://p9"]
    assert diff.kept["http://p2"].role == "prefill"
    assert diff.removed == [role, gone]
    assert not diff_endpoints(configured, [EndpointSpec(url) for url in configured], "m")


# ---- endpoints --------------------------------------------------------------------------------


async def test_a_reload_adding_a_backend_sends_it_traffic_and_keeps_the_running_ones(live, pods, client):
    p0, p1 = await pods(2)
    gw = await live(config_data([p0.url]))
    pool, ep0 = gw.pool(), gw.endpoint(p0.url)
    assert await served_by(client, gw, 2) == {p0.url}
    assert await gw.reload(config_data([p0.url, p1.url]))
    assert await served_by(client, gw, 4) == {p0.url, p1.url}
    assert gw.pool() is pool and gw.endpoint(p0.url) is ep0  # same routing: nothing rebuilt
    assert gw.metric("kvgate_config_reloads_total", result="ok") == 1


async def test_a_removed_backend_takes_no_new_request_while_its_stream_in_flight_completes(
    live, pods, client
):
    pods_ = await pods(2, chunks=20, chunk_delay=0.03)
    gw = await live(config_data([p.url for p in pods_]))
    body = {"model": "m", "prompt": "hi", "stream": True}
    async with client.post(f"{gw.url}/v1/completions", json=body) as resp:
        assert resp.status == 200
        busy = next(p for p in pods_ if p.url == resp.headers["x-kvgate-endpoint"])
        other = next(p for p in pods_ if p is not busy)
        assert await gw.reload(config_data([other.url]))
        assert busy.running == 1  # still streaming
        seen = len(busy.seen)
        assert await served_by(client, gw, 4) == {other.url}
        data = await resp.read()
    assert data.count(b"data: {") == 20 and data.endswith(b"data: [DONE]\n\n")
    assert len(busy.seen) == seen and busy.finished == 1 and busy.cancelled == 0
    assert gw.metric("kvgate_requests_total", model="m", endpoint=busy.url, status="200") == 1


async def test_a_removed_pods_blocks_leave_the_prefix_index_and_a_kept_pod_keeps_its_state(
    live, pods, client
):
    p0, p1 = await pods(2)
    policy = {"name": "cache_aware", "params": {"index": "approximate"}}
    gw = await live(config_data([p0.url, p1.url], policy))
    for i in range(8):
        status, _ = await complete(client, gw, f"prompt {i} " + "shared words " * 40)
        assert status == 200
    pool = gw.pool()
    cache, policy_obj = pool.prefix_cache, pool.policy
    assert cache is not None
    e0, e1 = gw.endpoint(p0.url), gw.endpoint(p1.url)
    assert set(cache.index.pods()) == {e0, e1}
    ledger = policy_obj.ledgers[e0]  # type: ignore[attr-defined]
    held = cache.index.match(cache.keys_for(probe_of("prompt 0 " + "shared words " * 40)), [e0, e1])
    assert await gw.reload(config_data([p0.url], policy))
    assert gw.pool() is pool and pool.prefix_cache is cache and pool.policy is policy_obj
    assert set(cache.index.pods()) == {e0}  # p1's blocks are gone, p0's stay
    after = cache.index.match(cache.keys_for(probe_of("prompt 0 " + "shared words " * 40)), [e0])
    assert after.get(e0, 0) == held.get(e0, 0)
    assert policy_obj.ledgers[e0] is ledger and e1 not in policy_obj.ledgers  # type: ignore[attr-defined]
    assert await served_by(client, gw, 3) == {p0.url}


def probe_of(prompt: str) -> Any:
    from router.policy import RouteRequest

    return RouteRequest("probe", "m", "/v1/completions", {"model": "m", "prompt": prompt}, {})


async def test_a_weight_change_is_applied_in_place(live, pods, client):
    p0, p1 = await pods(2)
    policy = {"name": "session"}
    gw = await live(config_data([p0.url, p1.url], policy))
    ep1 = gw.endpoint(p1.url)

    async def sessions_on_p1() -> int:
        on_p1 = 0
        for i in range(40):
            body, headers = {"model": "m", "prompt": "x"}, {"x-session-id": f"s{i}"}
            async with client.post(f"{gw.url}/v1/completions", json=body, headers=headers) as resp:
                assert resp.status == 200
                on_p1 += resp.headers["x-kvgate-endpoint"] == p1.url
        return on_p1

    assert await sessions_on_p1() < 32  # equal weights: about half each
    data = config_data([p0.url, p1.url], policy)
    data["pools"]["m"]["endpoints"][1]["weight"] = 50.0
    assert await gw.reload(data)
    assert gw.endpoint(p1.url) is ep1 and ep1.weight == 50.0
    assert await sessions_on_p1() >= 36  # p1 now holds ~98% of the ring


async def test_a_new_endpoint_that_is_down_joins_ejected(live, pods, client):
    p0, down = await pods(2)
    down.healthy = False
    gw = await live(config_data([p0.url]))
    assert await gw.reload(config_data([p0.url, down.url]))
    assert not gw.endpoint(down.url).healthy  # checked once before it joined
    assert await served_by(client, gw, 3) == {p0.url}


# ---- pools, aliases, policies -----------------------------------------------------------------


async def test_pools_and_aliases_are_added_and_removed(live, pods, client):
    p0, p1 = await pods(2)
    gw = await live(config_data([p0.url]))
    data = config_data([p0.url])
    data["pools"]["n"] = {"endpoints": [{"url": p1.url}]}
    data["aliases"] = {"enn": "n"}
    assert await gw.reload(data)
    assert await served_by(client, gw, 2, model="n") == {p1.url}
    assert await served_by(client, gw, 2, model="enn") == {p1.url}
    async with client.get(f"{gw.url}/v1/models") as resp:
        assert {m["id"] for m in orjson.loads(await resp.read())["data"]} == {"m", "n", "enn"}
    assert await gw.reload(config_data([p1.url]))  # pool n and its alias gone; m now on p1
    assert (await complete(client, gw, model="n"))[0] == 404
    assert await served_by(client, gw, 2) == {p1.url}


async def test_a_policy_change_builds_a_new_pool_and_requests_in_flight_finish_on_the_old_one(
    live, pods, client
):
    p0, p1 = await pods(2, chunks=10, chunk_delay=0.03)
    gw = await live(config_data([p0.url, p1.url]))
    old = gw.pool()
    eps = list(old.endpoints)
    body = {"model": "m", "prompt": "hi", "stream": True}
    async with client.post(f"{gw.url}/v1/completions", json=body) as resp:
        assert resp.status == 200
        assert await gw.reload(config_data([p0.url, p1.url], {"name": "least_request"}))
        new = gw.pool()
        assert new is not old and new.policy_name == "least_request" and new.endpoints == eps
        assert await served_by(client, gw, 2) <= {p0.url, p1.url}
        data = await resp.read()
    assert data.endswith(b"data: [DONE]\n\n")
    assert gw.metric("kvgate_routing_decisions_total", policy="least_request", reason="least_request") >= 2
    assert all(ep.in_flight == 0 for ep in eps)  # the old pool's bookkeeping ran to its end


async def test_a_policy_param_change_keeps_the_prefix_cache_unless_the_cache_settings_change(
    live, pods, client
):
    p0, p1 = await pods(2)
    urls = [p0.url, p1.url]
    gw = await live(config_data(urls, {"name": "cache_aware", "params": {"index": "approximate"}}))
    await complete(client, gw, "warm " * 50)
    cache, policy = gw.pool().prefix_cache, gw.pool().policy
    assert cache is not None and len(cache.index) > 0
    assert await gw.reload(config_data(urls, {"name": "cache_aware", "params": {"tie_fraction": 0.2}}))
    assert gw.pool().policy is not policy and gw.pool().prefix_cache is cache  # the index is kept
    assert gw.pool().policy.tie_fraction == 0.2  # type: ignore[attr-defined]
    assert await gw.reload(config_data(urls, {"name": "weighted"}))  # another policy, same cache settings
    assert gw.pool().prefix_cache is cache
    assert await gw.reload(config_data(urls, {"name": "weighted", "params": {"capacity": 100}}))
    assert gw.pool().prefix_cache is not cache and len(gw.pool().prefix_cache.index) == 0  # type: ignore[union-attr]
    assert await served_by(client, gw, 2) <= set(urls)


# ---- what is rejected, what needs a restart ---------------------------------------------------


BAD = {
    "yaml": ("pools: {m: [unclosed", "ParserError: while parsing a flow sequence in"),
    "unknown key": ({"retires": {"max_retries": 1}}, "unknown keys ['retires']"),
    "validation": ({"health": {"interval": 1.0, "timeout": 2.0}}, "health.timeout must not exceed"),
    "bad weight": ({"weight": -1}, "pools.m.endpoints[0].weight: must be > 0"),
    "policy param": ({"policy": {"name": "cache_aware", "params": {"nope": 1}}}, "pools.m.policy: "),
    "unknown policy": ({"policy": {"name": "fastest"}}, "pools.m.policy: unknown policy 'fastest'"),
    "missing keys file": ({"auth": {"api_keys_file": "/nonexistent/keys"}}, "/nonexistent/keys"),
}


def bad_config(kind: str, url: str) -> Data | str:
    change, _ = BAD[kind]
    if isinstance(change, str):
        return change
    data = config_data([url])
    if "weight" in change:
        data["pools"]["m"]["endpoints"][0]["weight"] = change["weight"]
    elif "policy" in change:
        data["pools"]["m"]["policy"] = change["policy"]
    else:
        data.update(change)
    return data


@pytest.mark.parametrize("kind", sorted(BAD))
async def test_a_bad_config_is_rejected_naming_the_key_and_the_old_one_keeps_serving(
    kind, live, pods, client, caplog
):
    p0, p1 = await pods(2)
    gw = await live(config_data([p0.url]))
    pool = gw.pool()
    caplog.set_level(logging.INFO, logger="kvgate.reload")
    bad = bad_config(kind, p1.url)  # it would also move the pool to p1
    assert not await gw.reload(bad)
    rejected = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(rejected) == 1 and BAD[kind][1] in rejected[0], rejected
    assert gw.pool() is pool and await served_by(client, gw, 3) == {p0.url}
    assert gw.metric("kvgate_config_reloads_total", result="rejected") == 1
    assert gw.metric("kvgate_config_last_reload_successful") == 0
    before = gw.metric("kvgate_config_last_reload_success_timestamp_seconds")
    assert await gw.reload(config_data([p1.url]))  # a fixed config applies
    assert await served_by(client, gw, 2) == {p1.url}
    assert gw.metric("kvgate_config_last_reload_successful") == 1
    assert gw.metric("kvgate_config_last_reload_success_timestamp_seconds") >= before


async def test_sections_that_need_a_restart_keep_their_value_and_are_logged(live, pods, client, caplog):
    p0, p1 = await pods(2)
    gw = await live(config_data([p0.url]))
    caplog.set_level(logging.INFO, logger="kvgate.reload")
    data = config_data([p0.url, p1.url], listen={"host": "127.0.0.2", "port": 1},
                       health={"interval": 2.0, "timeout": 1.0}, retries={"max_retries": 0})  # fmt: skip
    assert await gw.reload(data)
    config = gw.app[STATE].config
    assert (config.listen.host, config.listen.port, config.health.interval) == ("127.0.0.1", 8080, 5.0)
    assert config.retries.max_retries == 0  # live
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert "health changed: needs a restart" in messages and "listen changed: needs a restart" in messages
    assert "retries changed" in messages and "pool m: endpoints +1 -0" in messages
    assert await served_by(client, gw, 4) == {p0.url, p1.url}


# ---- API keys ---------------------------------------------------------------------------------


async def test_api_keys_rotate_when_the_keys_file_changes_and_auth_can_turn_off(live, pods, client, tmp_path):
    (p0,) = await pods(1)
    keys = tmp_path / "keys"
    keys.write_text("old-key\n")
    data = config_data([p0.url], auth={"api_keys_file": str(keys)}, reload={"interval": 60})
    gw = await live(data)
    assert (await complete(client, gw, key="old-key"))[0] == 200
    assert (await complete(client, gw, key="new-key"))[0] == 401
    keys.write_text("# rotated\nnew-key\n")
    await gw.reloader.poll_files()  # the poll's round, now: no signal, no waiting for the period
    await eventually(lambda: gw.metric("kvgate_config_reloads_total", result="ok") == 1, what="the reload")
    assert (await complete(client, gw, key="old-key"))[0] == 401
    assert (await complete(client, gw, key="new-key"))[0] == 200
    await gw.reloader.poll_files()  # nothing changed since: no reload
    assert gw.metric("kvgate_config_reloads_total", result="ok") == 1
    assert await gw.reload(config_data([p0.url]))  # no auth section: open
    assert (await complete(client, gw))[0] == 200


# ---- file watching ----------------------------------------------------------------------------


def test_watched_files_see_content_changes_not_touches(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("a: 1\n")
    files = WatchedFiles()
    files.watch([str(path)])
    assert files.changed() == []
    os.utime(path, (1, 1))  # stat changed, content not
    assert files.changed() == []
    path.write_text("a: 2\n")
    assert files.changed() == [str(path)]
    assert files.changed() == []
    path.unlink()
    assert files.changed() == [str(path)]  # gone: a change (the reload then reports why)
    path.write_text("a: 2\n")
    assert files.changed() == [str(path)]


def test_watched_files_follow_a_configmap_symlink_swap_with_the_same_mtime(tmp_path: Path) -> None:
    """A ConfigMap volume: kvgate.yaml -> ..data/kvgate.yaml, ..data -> ..<timestamp>; an update
    writes a new timestamped dir and swaps `..data` atomically."""
    mount = tmp_path / "cm"
    mount.mkdir()
    first = mount / "..2026_01_01"
    first.mkdir()
    (first / "kvgate.yaml").write_text("a: 1\n")
    (mount / "..data").symlink_to(first.name)
    (mount / "kvgate.yaml").symlink_to("..data/kvgate.yaml")
    files = WatchedFiles()
    path = str(mount / "kvgate.yaml")
    files.watch([path])
    second = mount / "..2026_01_02"
    second.mkdir()
    (second / "kvgate.yaml").write_text("a: 9\n")  # same size
    st = os.stat(first / "kvgate.yaml")
    os.utime(second / "kvgate.yaml", ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same mtime
    (mount / "..data_tmp").symlink_to(second.name)
    os.replace(mount / "..data_tmp", mount / "..data")
    assert files.changed() == [path]


async def test_a_file_edit_is_picked_up_without_a_signal(live, pods, client):
    p0, p1 = await pods(2)
    gw = await live(config_data([p0.url], reload={"interval": 0.05}))
    gw.write(config_data([p1.url], reload={"interval": 0.05}))
    await eventually(lambda: gw.metric("kvgate_config_reloads_total", result="ok") == 1, what="the reload")
    assert await served_by(client, gw, 2) == {p1.url}


# ---- admission, discovery ---------------------------------------------------------------------


async def test_a_pool_added_under_admission_control_is_admitted(live, pods, client):
    p0, p1 = await pods(2)
    admission = {"max_in_flight_per_pod": 4}
    gw = await live(config_data([p0.url], admission=admission))
    data = config_data([p0.url], admission=admission)
    data["pools"]["n"] = {"endpoints": [{"url": p1.url}]}
    assert await gw.reload(data)
    assert await served_by(client, gw, 3, model="n") == {p1.url}
    assert await gw.reload(config_data([p0.url], {"name": "least_request"}, admission=admission))
    assert await served_by(client, gw, 3) == {p0.url}  # the rebuilt pool kept its lane


async def test_a_discovered_pool_keeps_its_pods_across_reloads_that_leave_its_discovery_unchanged(
    live, pods, client, tmp_path
):
    api = await FakeKubeApi(namespace="llm").start()
    try:
        p0, p1, static = await pods(3)
        for i, pod in enumerate((p0, p1)):
            api.add_pod(f"vllm-{i}", labels={"app": "vllm"}, ports={"http": int(pod.url.rsplit(":", 1)[1])},
                        ready=i == 0)  # fmt: skip
        kube = {"label_selector": "app=vllm", "port_name": "http", "backoff_initial_s": 0.02,
                "kubeconfig": str(api.write_kubeconfig(tmp_path / "kc"))}  # fmt: skip

        def data(policy: str, selector: str = "app=vllm", endpoints: list[str] = ()) -> Data:  # type: ignore[assignment]
            d = config_data([], {"name": policy})
            d["pools"]["m"].update(discovery="kubernetes", kubernetes={**kube, "label_selector": selector},
                                   endpoints=[{"url": u} for u in endpoints])  # fmt: skip
            return d

        gw = await live(data("round_robin"))
        discovered = gw.endpoint(p0.url)
        assert await gw.reload(data("least_request", endpoints=[static.url]))  # new policy, same discovery
        assert gw.endpoint(p0.url) is discovered and gw.pool().policy_name == "least_request"
        assert await served_by(client, gw, 4) == {p0.url, static.url}
        api.set_ready("vllm-1", True)  # the watcher feeds the rebuilt pool
        await eventually(lambda: p1.url in {ep.url for ep in gw.pool().endpoints}, what="vllm-1 to join")
        assert await gw.reload(data("least_request", selector="app=none", endpoints=[static.url]))
        assert {ep.url for ep in gw.pool().endpoints} == {static.url}  # a new watch found nothing
        assert await served_by(client, gw, 2) == {static.url}
    finally:
        await api.stop()


# ---- precise index: KV-event subscriptions follow the reload ---------------------------------


async def test_precise_mode_subscribes_a_pod_a_reload_adds_and_drops_one_it_removes(live, client):
    from bench.sim.fleet import SimFleet

    fast = {"model": "m", "prefill_tps": 1e6, "itl_ms": 1.0, "itl_ms_per_seq": 0.0,
            "kv_events_endpoint": "tcp://127.0.0.1:*"}  # fmt: skip
    async with SimFleet(2, **fast) as fleet:
        s0, s1 = fleet.pods
        policy = {"name": "cache_aware", "params": {"index": "precise", "pending_blocks": 0}}

        def data(pods: list[Any]) -> Data:
            d = config_data([p.url for p in pods], policy)
            for spec, pod in zip(d["pools"]["m"]["endpoints"], pods, strict=True):
                spec["kv_events"] = pod.publisher.endpoint
            return d

        gw = await live(data([s0]))
        cache = gw.pool().prefix_cache
        assert cache is not None
        assert await gw.reload(data([s0, s1]))
        e0, e1 = gw.endpoint(s0.url), gw.endpoint(s1.url)
        await eventually(lambda: e1 in cache.trackers, what="the new pod's subscription")
        prompts = [" ".join(f"w{i}x{j}" for j in range(64)) for i in range(12)]

        def held(ep: Endpoint) -> bool:
            return ep in set(cache.index.pods()) and bool(cache.index.keys_of(ep))

        async def both_indexed() -> bool:
            for prompt in prompts:  # new prefixes spread over both pods; their events fill the index
                await complete(client, gw, prompt)
            return held(e0) and held(e1)

        await eventually(both_indexed, within=10, what="events from both pods in the index")
        assert await gw.reload(data([s1]))
        assert e0 not in cache.trackers and not held(e0)  # its blocks left with it
        assert held(e1)
        assert await served_by(client, gw, 3) == {s1.url}


async def test_a_policy_change_with_endpoint_changes_keeps_the_cache_in_step(live, pods, client):
    p0, p1, p2 = await pods(3)
    gw = await live(config_data([p0.url, p1.url], {"name": "cache_aware"}))
    for i in range(6):
        await complete(client, gw, f"group {i} " + "words " * 60)
    cache = gw.pool().prefix_cache
    assert cache is not None
    e0, e1 = gw.endpoint(p0.url), gw.endpoint(p1.url)
    assert set(cache.index.pods()) == {e0, e1}
    assert await gw.reload(config_data([p0.url, p2.url], {"name": "weighted"}))  # same cache settings
    assert gw.pool().prefix_cache is cache and set(cache.index.pods()) == {e0}  # p1 dropped
    assert await served_by(client, gw, 6) == {p0.url, p2.url}
    assert e1.in_flight == 0 and gw.endpoint(p0.url) is e0

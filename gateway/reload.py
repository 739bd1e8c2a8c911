"""Live reload: apply a new config (SIGHUP, or a change of the config file or auth.api_keys_file)
without dropping a request.

One reload, in four steps (`Reloader.reload`):

    prepare   in a thread (a tokenizer load must not stall the event loop): read the config source
              again (YAML, then the same flags and KVGATE_* variables as at startup), the API keys, and
              build every policy, prefix cache and P/D router the changes need. Any error (YAML, an
              unknown key, a validation error, a bad policy parameter, a missing key file) rejects the
              whole config: logged with the key path, counted, and the running config keeps serving.
    start     new prefix caches and policies start (KV-event subscriptions) over the endpoints they
              will serve, and new endpoints get one health check, while the old state serves on.
    commit    in one step on the event loop (no await): endpoint diffs, pools swapped, API keys,
              aliases, retries; a request picks its pool before or after, never half of each.
    retire    policies and prefix caches no pool uses any more close; discovery watchers follow
              their pools' settings.

What changes live: `pools` (pools added and removed; endpoints added, removed, re-weighted, or with a
new role, version or KV-event endpoint; policy name and params; tokenizer, block size, `pd`,
adapters, discovery settings), `aliases`, `auth` (keys rotate at once, auth may turn on or off),
`retries`, `forwarded` and `reload`. Every other section (listen, limits, timeouts, health, scrape,
logs, tracing, admission, seed) needs a restart: a change there is logged and keeps its old value.

What is kept: an endpoint whose URL, role, version and KV-event endpoints are unchanged keeps its
Endpoint object, so its health, in-flight counts, prefix-index entries and learned TTFT rates stay (a
weight change is applied in place). A pool whose policy, tokenizer and block size are unchanged keeps
its Pool, policy and prefix cache; a pool whose policy changed gets a new Pool with a new policy
(and a new prefix cache only when the cache's own settings changed). Requests in flight hold the
Pool and Endpoints they were routed with and finish on them; a removed endpoint takes no new
request, and its blocks leave the prefix index at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway.admission.controller import ADMISSION
from gateway.admission.tenants import tenant_api_keys
from gateway.auth import load_api_keys
from gateway.config import EndpointSpec, GatewayConfig, PoolSpec
from gateway.discovered import PoolWatchers, discovered
from gateway.health import HealthChecker
from gateway.pd_flow import enable_pd
from gateway.periodic import every
from gateway.pools import Pool, build_endpoint, build_pd_router, build_pool, build_routing
from gateway.state import PROXY, SESSION, STATE
from router.discovery import kubernetes as kube_discovery
from router.endpoint import Endpoint
from router.pd import PDRouter
from router.policy import Policy
from router.prefix_cache import PrefixCache
from router.registry import PolicyError

log = logging.getLogger("kvgate.reload")

# GatewayConfig sections applied by a reload; every other one needs a restart.
LIVE_SECTIONS: Final = frozenset({"pools", "aliases", "auth", "retries", "forwarded", "reload"})
RESULTS: Final = ("ok", "rejected")


@dataclass(frozen=True, slots=True)
class ConfigSource:
    """Where the config comes from: `load` reads it again as at startup (blocking: run in a thread;
    raises on a bad config), `path` is the config file to watch (None: quick-start flags)."""

    load: Callable[[], GatewayConfig]
    path: str | None = None


class ReloadMetrics:
    """kvgate_config_* (the names of Prometheus's own prometheus_config_*)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.reloads = Counter(
            "kvgate_config_reloads",
            "Config reloads by result: ok (applied) or rejected (bad config; the running one kept).",
            ["result"], registry=registry,
        )  # fmt: skip
        self.last_success = Gauge(
            "kvgate_config_last_reload_success_timestamp_seconds",
            "Unix time the running config was applied (startup, or the last successful reload).",
            registry=registry,
        )
        self.last_ok = Gauge(
            "kvgate_config_last_reload_successful",
            "1 when the last reload attempt applied its config, 0 when it was rejected.",
            registry=registry,
        )
        for result in RESULTS:
            self.reloads.labels(result)
        self.last_success.set(time.time())
        self.last_ok.set(1)


# ---- what a reload changes: decided from the old and new config alone ---------------------------


@dataclass(slots=True)
class EndpointDiff:
    """A pool's configured endpoints against the new spec, by URL."""

    added: list[Endpoint] = field(default_factory=list)
    removed: list[Endpoint] = field(default_factory=list)
    reweighted: list[tuple[Endpoint, float]] = field(default_factory=list)
    kept: dict[str, Endpoint] = field(default_factory=dict)  # url -> Endpoint, after the reload

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.reweighted)


def diff_endpoints(
    configured: Mapping[str, Endpoint], specs: Sequence[EndpointSpec], model: str
) -> EndpointDiff:
    """Keep the Endpoint of a URL whose role, version and KV-event endpoints are unchanged (a new
    weight is applied in place); replace one where they changed; add and remove the rest."""
    diff = EndpointDiff()
    for spec in specs:
        ep = configured.get(spec.url)
        same = ep is not None and (ep.role, ep.version, ep.kv_events, ep.kv_events_replay) == (
            spec.role, spec.version, spec.kv_events, spec.kv_events_replay)  # fmt: skip
        if ep is not None and same:
            if ep.weight != spec.weight:
                diff.reweighted.append((ep, spec.weight))
            diff.kept[spec.url] = ep
            continue
        if ep is not None:
            diff.removed.append(ep)
        new = diff.kept[spec.url] = build_endpoint(spec, model)
        diff.added.append(new)
    urls = {spec.url for spec in specs}
    diff.removed += [ep for url, ep in configured.items() if url not in urls]
    return diff


_KEEP: Final = object()  # PoolPlan.pd: the pool's P/D router is unchanged


@dataclass(slots=True, eq=False)
class PoolPlan:
    """One pool of the new config: built anew (`fresh`), or the running `old` one with changes."""

    spec: PoolSpec
    old: Pool | None = None
    fresh: Pool | None = None  # a new model: its pool, endpoints and routing built
    policy: Policy | None = None  # a new policy for `old` (None: keep old's)
    cache: PrefixCache | None = None  # the new policy's cache (maybe old's, kept)
    pd: object = _KEEP  # PDRouter | None when the P/D settings changed
    endpoints: EndpointDiff = field(default_factory=EndpointDiff)
    started_with: list[Endpoint] = field(default_factory=list)  # the new policy was started over these

    @property
    def new_cache(self) -> bool:
        return self.policy is not None and self.cache is not None and self.old is not None \
            and self.cache is not self.old.prefix_cache


@dataclass(slots=True)
class Plan:
    config: GatewayConfig  # what will run: the new config, restart-only sections kept from the old
    api_keys: tuple[bytes, ...]
    pools: list[PoolPlan]
    removed: list[Pool]  # pools of models the new config no longer has
    restart_needed: list[str]  # sections whose change was not applied


def effective_config(old: GatewayConfig, new: GatewayConfig) -> tuple[GatewayConfig, list[str]]:
    """`new` with every section that needs a restart kept at its running value, and those sections."""
    kept = {}
    for f in dataclasses.fields(GatewayConfig):
        if f.name not in LIVE_SECTIONS and getattr(old, f.name) != getattr(new, f.name):
            kept[f.name] = getattr(old, f.name)
    return (dataclasses.replace(new, **kept) if kept else new), sorted(kept)


def _routing(spec: PoolSpec) -> tuple[object, ...]:
    return spec.policy, spec.tokenizer, spec.block_size


def _pd_settings(spec: PoolSpec) -> tuple[object, ...]:
    return spec.pd, spec.tokenizer, any(e.role == "prefill" for e in spec.endpoints)


def prepare(
    old: GatewayConfig,
    new: GatewayConfig,
    running: Mapping[str, Pool],
    configured: Mapping[str, Mapping[str, Endpoint]],
    registry: CollectorRegistry,
) -> Plan:
    """Everything the reload needs built (blocking; no event-loop state is touched). ValueError
    naming the key path when the new config cannot run."""
    config, restart = effective_config(old, new)
    api_keys = load_api_keys(config.auth) + tenant_api_keys(config.admission)
    old_specs = {spec.model: spec for spec in old.pools}
    old_discovery = discovered(old.pools)
    plans: list[PoolPlan] = []
    for spec in config.pools:
        where = f"pools.{spec.model}"
        if spec.kubernetes is not None and old_discovery.get(spec.model) != spec.kubernetes:
            kube_discovery.require_client()
            kube_discovery.check_credentials(spec.kubernetes, f"{where}.kubernetes")
        pool, old_spec = running.get(spec.model), old_specs.get(spec.model)
        try:
            if pool is None or old_spec is None:
                plans.append(PoolPlan(spec, fresh=build_pool(spec, registry, config.seed)))
                continue
            plan = PoolPlan(spec, old=pool)
            if _routing(spec) != _routing(old_spec):
                plan.policy, plan.cache = build_routing(spec, registry, config.seed, reuse=pool.prefix_cache)
            if _pd_settings(spec) != _pd_settings(old_spec):
                plan.pd = build_pd_router(spec, [build_endpoint(e, spec.model) for e in spec.endpoints])
        except PolicyError as exc:
            raise ValueError(f"{where}.policy: {exc}") from exc
        plan.endpoints = diff_endpoints(configured.get(spec.model, {}), spec.endpoints, spec.model)
        plans.append(plan)
    models = {spec.model for spec in config.pools}
    removed = [pool for model, pool in running.items() if model not in models]
    return Plan(config, api_keys, plans, removed, restart)


# ---- file watching ------------------------------------------------------------------------------

Fingerprint = tuple[tuple[int, int, int, int], str] | None


def fingerprint(path: str) -> Fingerprint:
    """(device, inode, size, mtime) of the file `path` leads to (symlinks followed, so a ConfigMap's
    `..data` swap shows) and its content's SHA-256; None when it cannot be read."""
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns), digest


class WatchedFiles:
    """The files a reload reads, and whether their content changed since last looked at. A file
    whose stat is unchanged is not read again; one whose stat changed counts only if its content did
    (a touch, or a ConfigMap refresh with the same data, is no change)."""

    def __init__(self) -> None:
        self._seen: dict[str, Fingerprint] = {}
        self._lock = threading.Lock()  # the poll and a reload look from worker threads

    def watch(self, paths: Sequence[str]) -> None:
        """Follow exactly `paths` from now on; a file not followed yet: its content now is the baseline."""
        with self._lock:
            self._seen = {p: self._seen[p] if p in self._seen else fingerprint(p) for p in paths}

    def refresh(self) -> None:
        """The current content of every file is the baseline (a reload is about to read them)."""
        with self._lock:
            self._seen = {p: fingerprint(p) for p in self._seen}

    def changed(self) -> list[str]:
        """The files whose content changed since the last look (blocking: stat and maybe read)."""
        with self._lock:
            return self._changed()

    def _changed(self) -> list[str]:
        out = []
        for path, seen in list(self._seen.items()):
            if seen is not None:
                try:
                    st = os.stat(path)
                    if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == seen[0]:
                        continue
                except OSError:
                    pass
            now = fingerprint(path)
            if (now and now[1]) != (seen and seen[1]):
                out.append(path)
            self._seen[path] = now
        return out


def watched_paths(source: ConfigSource | None, config: GatewayConfig) -> list[str]:
    paths = [source.path] if source is not None and source.path else []
    if source is not None and config.auth.api_keys_file:
        paths.append(config.auth.api_keys_file)
    return paths


# ---- the reloader -------------------------------------------------------------------------------


class Reloader:
    """Applies new configs to a running app (see the module docstring). `reload()` runs one now;
    `trigger()` schedules one (a signal handler, the file poll), coalescing those that come while one
    runs into one more after it."""

    def __init__(self, app: web.Application, source: ConfigSource | None, watchers: PoolWatchers) -> None:
        self.app = app
        self.source = source
        self.watchers = watchers
        state = app[STATE]
        self.metrics = ReloadMetrics(state.metrics.registry)
        self.files = WatchedFiles()
        self.files.watch(watched_paths(source, state.config))
        # model -> url -> Endpoint, of the endpoints the config lists (discovered ones are not here)
        self.configured: dict[str, dict[str, Endpoint]] = {
            pool.model: {ep.url: ep for ep in pool.endpoints} for pool in state.pools
        }
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._again: str | None = None
        self._poll: asyncio.Task[None] | None = None
        self._poll_interval = 0.0
        self._closed = False

    # ---- triggers -----------------------------------------------------------------------------

    def trigger(self, cause: str) -> None:
        if self._closed:  # shutting down: nothing new starts
            return
        if self._task is not None and not self._task.done():
            self._again = cause
            return
        self._task = asyncio.get_running_loop().create_task(self._run(cause), name="config reload")

    async def _run(self, cause: str | None) -> None:
        while cause is not None:
            self._again = None
            await self.reload(cause)
            cause = self._again

    async def poll_files(self) -> None:
        """One look at the watched files; a change triggers a reload."""
        changed = await asyncio.to_thread(self.files.changed)
        if changed:
            log.info("config reload: %s changed", ", ".join(changed))
            self.trigger("file change")

    def follow_interval(self, interval: float) -> None:
        """(Re)start the file poll at `interval` seconds (0 or nothing to watch: stopped)."""
        if interval == self._poll_interval and (self._poll is not None or interval <= 0):
            return
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None
        self._poll_interval = interval
        if interval > 0 and self.source is not None and self.source.path:
            self._poll = asyncio.get_running_loop().create_task(every(interval, self.poll_files),
                                                                name="config file poll")

    async def close(self) -> None:
        self._closed = True
        for task in (self._poll, self._task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # ---- one reload ---------------------------------------------------------------------------

    async def reload(self, cause: str = "request", config: GatewayConfig | None = None) -> bool:
        """Load the config (or take `config`) and apply it; False when it was rejected."""
        async with self._lock:
            state = self.app[STATE]
            try:
                plan = await asyncio.to_thread(self._prepare, config)
            except ValueError as exc:  # decoding and validation errors name the key path
                return self._rejected(cause, str(exc))
            except (OSError, yaml.YAMLError, ModuleNotFoundError) as exc:
                return self._rejected(cause, f"{type(exc).__name__}: {exc}")
            except Exception as exc:  # a bug, not the config's fault: still keep serving the old one
                log.exception("config reload (%s): failed", cause)
                return self._rejected(cause, f"{type(exc).__name__}: {exc}")
            try:
                await self._start(plan)
            except Exception as exc:
                await self._close_unused(plan)
                log.exception("config reload (%s): starting the new policies failed", cause)
                return self._rejected(cause, f"{type(exc).__name__}: {exc}")
            old, old_keys = state.config, state.api_keys
            retired = self._commit(plan)
            for section in plan.restart_needed:
                log.warning("config reload (%s): %s changed: needs a restart (keeps its running value)",
                            cause, section)
            summary = self._summary(old, plan, old_keys != plan.api_keys)
            log.info("config reload (%s): applied: %s", cause, summary)
            self.metrics.reloads.labels("ok").inc()
            self.metrics.last_ok.set(1)
            self.metrics.last_success.set(time.time())
            await self._retire(retired)
            try:
                await self.watchers.sync(state.config.pools)
            except Exception:  # the pools are swapped in; a watcher that cannot start is logged
                log.exception("config reload (%s): starting a pod watcher failed", cause)
            self.files.watch(watched_paths(self.source, state.config))
            self.follow_interval(state.config.reload.interval)
            return True

    def _rejected(self, cause: str, reason: str) -> bool:
        reason = " ".join(reason.split())  # a YAML error's lines (where, what) on one log line
        log.error("config reload (%s) rejected, the running config keeps serving: %s", cause, reason)
        self.metrics.reloads.labels("rejected").inc()
        self.metrics.last_ok.set(0)
        return False

    def _prepare(self, config: GatewayConfig | None) -> Plan:
        """In a thread: read the sources and build what the new config needs."""
        if config is None:
            if self.source is None:
                raise ValueError("no config source to reload from")
            self.files.refresh()  # a change from here on triggers another reload
            config = self.source.load()
        state = self.app[STATE]
        return prepare(state.config, config, dict(state.pools.by_model), self.configured,
                       state.metrics.registry)

    async def _start(self, plan: Plan) -> None:
        """Start new caches and policies over the endpoints they will serve; check new endpoints once."""
        new_eps: list[Endpoint] = []
        for p in plan.pools:
            if p.fresh is not None:
                if p.fresh.prefix_cache is not None:
                    await p.fresh.prefix_cache.start(p.fresh.endpoints)
                await p.fresh.policy.start(p.fresh.endpoints)
                new_eps += p.fresh.endpoints
                continue
            assert p.old is not None
            new_eps += p.endpoints.added
            if p.policy is not None:
                gone = set(p.endpoints.removed)
                p.started_with = [ep for ep in p.old.endpoints if ep not in gone] + p.endpoints.added
                if p.new_cache:
                    assert p.cache is not None
                    await p.cache.start(p.started_with)
                await p.policy.start(p.started_with)
        await self._check_health(new_eps)

    async def _check_health(self, endpoints: list[Endpoint]) -> None:
        """One active check of each new endpoint, so a dead one joins ejected (as at startup)."""
        session = self.app.get(SESSION)
        if not endpoints or session is None:
            return
        state = self.app[STATE]
        cfg = state.config.health
        checker = HealthChecker(session, lambda: endpoints, state.health, timeout=cfg.timeout,
                                path=cfg.path, metrics=state.metrics)
        results = await asyncio.gather(*(checker.check(ep) for ep in endpoints))
        for ep, result in zip(endpoints, results, strict=True):
            state.health.check_result(ep, result)

    def _commit(self, plan: Plan) -> list[Policy | PrefixCache]:
        """Swap the new state in, in one step (no await); what no pool uses any more, to close."""
        state = self.app[STATE]
        retired: list[Policy | PrefixCache] = []
        pools: list[Pool] = []
        for p in plan.pools:
            if p.fresh is not None:
                pools.append(p.fresh)
                self.configured[p.spec.model] = {ep.url: ep for ep in p.fresh.endpoints}
                continue
            assert p.old is not None
            pools.append(self._commit_pool(p, retired))
            self.configured[p.spec.model] = p.endpoints.kept
        for pool in plan.removed:
            self.configured.pop(pool.model, None)
            retired.append(pool.policy)
            if pool.prefix_cache is not None:
                retired.append(pool.prefix_cache)
        state.pools.replace(pools, plan.config.aliases)
        state.config = plan.config
        state.api_keys = plan.api_keys
        proxy = self.app.get(PROXY)
        if proxy is not None:
            proxy.max_retries = plan.config.retries.max_retries
            proxy.retry_statuses = frozenset(plan.config.retries.on_status)
        pd_models = [pool.model for pool in pools if pool.pd is not None]
        if pd_models:
            enable_pd(self.app, pd_models)
        admission = self.app.get(ADMISSION)
        if admission is not None:
            admission.pools_changed(state.pools, {spec.model: spec.tokenizer for spec in plan.config.pools})
            admission.keys_checked = bool(plan.api_keys)
        return retired

    def _commit_pool(self, p: PoolPlan, retired: list[Policy | PrefixCache]) -> Pool:
        old, diff, spec = p.old, p.endpoints, p.spec
        assert old is not None
        for ep, weight in diff.reweighted:
            ep.weight = weight
        if p.policy is None:  # same routing: the running pool, changed in place
            pool = old
            if diff.added or diff.removed:
                pool.update_endpoints(diff.added, diff.removed)
        else:
            gone = set(diff.removed)
            final = [ep for ep in old.endpoints if ep not in gone] + diff.added
            pool = Pool(spec.model, spec.policy.name, p.policy, final, old.pd, p.cache,
                        adapters=old.adapters, learned_adapters=old.learned_adapters)
            # discovery may have changed the old pool while the new policy started
            started, now = set(p.started_with), set(final)
            joined = [ep for ep in final if ep not in started]
            left = [ep for ep in p.started_with if ep not in now]
            if joined or left:
                p.policy.endpoints_changed(joined, left)
            if p.cache is not None:
                if p.new_cache:
                    if joined or left:
                        p.cache.endpoints_changed(joined, left)
                elif diff.added or diff.removed:  # the kept cache followed the old pool until now
                    p.cache.endpoints_changed(diff.added, diff.removed)
            old.endpoints = final  # retries of requests in flight on the old pool skip removed pods
            retired.append(old.policy)
            if old.prefix_cache is not None and old.prefix_cache is not p.cache:
                retired.append(old.prefix_cache)
        if p.pd is not _KEEP:
            pool.pd = p.pd if isinstance(p.pd, PDRouter) else None
        pool.adapters = frozenset(spec.adapters)
        if diff.reweighted:
            pool.policy.endpoints_reweighted([ep for ep, _ in diff.reweighted])
        return pool

    async def _retire(self, retired: Sequence[Policy | PrefixCache]) -> None:
        for item in retired:
            try:
                await item.close()
            except Exception:
                log.exception("config reload: closing a retired %s failed", type(item).__name__)

    async def _close_unused(self, plan: Plan) -> None:
        """A failed start: close what was built for the plan and never served."""
        items: list[Policy | PrefixCache] = []
        for p in plan.pools:
            if p.fresh is not None:
                items.append(p.fresh.policy)
                if p.fresh.prefix_cache is not None:
                    items.append(p.fresh.prefix_cache)
            elif p.policy is not None:
                items.append(p.policy)
                if p.new_cache and p.cache is not None:
                    items.append(p.cache)
        await self._retire(items)

    @staticmethod
    def _summary(old: GatewayConfig, plan: Plan, keys_changed: bool) -> str:
        parts = []
        added = [p.spec.model for p in plan.pools if p.fresh is not None]
        if added:
            parts.append(f"pools added {added}")
        if plan.removed:
            parts.append(f"pools removed {[pool.model for pool in plan.removed]}")
        for p in plan.pools:
            d = p.endpoints
            if d:
                parts.append(f"pool {p.spec.model}: endpoints +{len(d.added)} -{len(d.removed)}"
                             f" reweighted {len(d.reweighted)}")
            if p.policy is not None and p.old is not None:
                kept = "kept" if p.cache is not None and not p.new_cache else "new"
                cache = f", prefix cache {kept}" if p.cache is not None else ""
                parts.append(f"pool {p.spec.model}: policy {p.old.policy_name} -> {p.spec.policy.name}"
                             f" (rebuilt{cache})")
        if keys_changed:
            parts.append("API keys changed")
        for section in ("aliases", "retries", "forwarded", "reload"):
            if getattr(old, section) != getattr(plan.config, section):
                parts.append(f"{section} changed")
        return "; ".join(parts) or "no change"


RELOADER = web.AppKey("kvgate_reloader", Reloader)


async def reload_ctx(app: web.Application) -> AsyncIterator[None]:
    """The file poll of app[RELOADER] (SIGHUP calls its `trigger`): the config file and the API keys
    file every reload.interval seconds, when the app has a config source with a file. Last in
    cleanup_ctx, so no reload runs while the rest is torn down."""
    reloader = app[RELOADER]
    reloader.follow_interval(app[STATE].config.reload.interval)
    yield
    await reloader.close()

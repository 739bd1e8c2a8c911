"""Kubernetes discovery: list a pool's pods, then watch them, and keep the pool's endpoints in step.

One `PodWatcher` per `discovery: kubernetes` pool, on the `kubernetes_asyncio` client (the
`kubernetes` extra; imported only when such a pool exists, so a missing package fails at startup with
the CLI's one-line hint). The protocol is the reflector's of client-go:

1. List the pods matching the label selector; the list's resourceVersion is where the watch starts.
2. Watch from that resourceVersion with `allowWatchBookmarks`: every event (and every BOOKMARK, which
   carries only a newer resourceVersion) advances it. Each watch asks for a server-side timeout of
   `watch_timeout_s` to twice that (so many gateways do not reconnect in step).
3. When a watch ends or drops, watch again from the last resourceVersion (`resume`; nothing is
   listed again). A failed request waits a backoff (doubling, jittered, up to `backoff_max_s`) first.
4. 410 Gone (that resourceVersion is older than the API server keeps) lists again and diffs the list
   against the endpoints the watcher holds (`relist`): a pod present before and after keeps its
   Endpoint object, so its prefix-index state and load accounting survive. 410s again and again,
   with no event between them, back off like errors.

A pod is known by its uid: one deleted and created again under the same name (a StatefulSet's) is a
new endpoint, as its vLLM starts with an empty cache; an IP:port taken over by a new pod replaces
the stale endpoint holding it.

An API server that is slow, down or answering errors changes nothing: the pool keeps every endpoint
it had until the API server says a pod went away. Changes go to the pool through `update(added,
removed)` (gateway/pools.py `Pool.update_endpoints`, which tells the prefix cache and the policy).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from router.discovery.config import KubernetesDiscovery
from router.discovery.metrics import DiscoveryMetrics
from router.discovery.pods import PodEndpoint, pod_endpoint, pod_key, skip_reason
from router.endpoint import Endpoint

log = logging.getLogger("kvgate.discovery")

CLIENT_MODULE = "kubernetes_asyncio"
SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
# The longest watch line accepted: one object is at most etcd's request limit (1.5 MiB) on the API server.
MAX_LINE_BYTES = 4 << 20

EndpointUpdate = Callable[[Sequence[Endpoint], Sequence[Endpoint]], None]
Sleep = Callable[[float], Awaitable[None]]


class Gone(Exception):
    """410 Gone: the resourceVersion asked for is older than the API server's history."""


class ApiError(Exception):
    """A list or watch request the API server refused or that broke (retried after a backoff)."""


@dataclass(slots=True)
class PodList:
    items: list[dict[str, Any]]
    resource_version: str


class EventStream(Protocol):
    """An open watch: the raw events (`{"type", "object"}`) until the server ends it (iterating raises
    ApiError or the transport's errors when it breaks); `aclose` lets go of the connection."""

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]: ...

    async def aclose(self) -> None: ...


class PodSource(Protocol):
    """Lists and watches one pool's pods (KubePodSource; tests may pass another)."""

    async def list(self) -> PodList: ...

    async def watch(self, resource_version: str, timeout_s: int) -> EventStream:
        """Open a watch from `resource_version`; raises Gone, ApiError or the transport's errors when
        the API server does not accept it."""
        ...

    async def close(self) -> None: ...


def require_client() -> None:
    """Import the client now: ModuleNotFoundError (named kubernetes_asyncio) when the extra is missing."""
    importlib.import_module(CLIENT_MODULE)


def uses_in_cluster(k: KubernetesDiscovery) -> bool:
    if k.auth == "auto":
        return k.kubeconfig is None and bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    return k.auth == "in-cluster"


def check_credentials(k: KubernetesDiscovery, where: str) -> None:
    """Fail at startup (ValueError naming the key) when credentials the config names are not there: a
    `kubeconfig` file, or the service account of `auth: in-cluster`. (With `auto` and no kubeconfig
    named, loading them is part of connecting: retried, and logged, like any API trouble.)"""
    if k.auth == "in-cluster":
        token = os.path.join(SERVICE_ACCOUNT, "token")
        if not os.path.exists(token):
            raise ValueError(f"{where}.auth: in-cluster, but {token} does not exist (not in a pod?)")
    elif k.kubeconfig is not None and not os.path.exists(os.path.expanduser(k.kubeconfig)):
        raise ValueError(f"{where}.kubeconfig: {os.path.expanduser(k.kubeconfig)} does not exist")


class KubePodSource:
    """The pods of one namespace and label selector through kubernetes_asyncio's CoreV1Api.

    Responses are read raw (`_preload_content=False`) and decoded with orjson: the watcher works on the
    API's JSON, and a watch line is split by this class, so no object is too long for a readline."""

    def __init__(self, k: KubernetesDiscovery) -> None:
        self.k = k
        self.namespace = ""  # resolved by connect()
        self._api: Any = None
        self._api_client: Any = None

    async def connect(self) -> None:
        """Load the credentials (in-cluster or kubeconfig) and resolve the namespace, once: the first
        list does it, and a failure is retried with the next one."""
        if self._api is not None:
            return
        from kubernetes_asyncio import client, config

        k = self.k
        conf = client.Configuration()
        if uses_in_cluster(k):
            config.load_incluster_config(client_configuration=conf)
            namespace = k.namespace or _read(os.path.join(SERVICE_ACCOUNT, "namespace")) or "default"
        else:
            # read $KUBECONFIG now (the client reads it once, at import)
            path = k.kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
            await config.load_kube_config(config_file=path, context=k.context, client_configuration=conf)
            namespace = k.namespace or _context_namespace(config, path, k.context) or "default"
        self._api_client = client.ApiClient(configuration=conf)
        self._api = client.CoreV1Api(self._api_client)
        self.namespace = namespace

    async def list(self) -> PodList:
        await self.connect()
        resp = await self._api.list_namespaced_pod(
            self.namespace,
            label_selector=self.k.label_selector,
            _preload_content=False,
            _request_timeout=self.k.request_timeout_s,
        )
        try:
            body = await resp.read()
            if resp.status != 200:
                raise _status_error(resp.status, body)
        finally:
            resp.release()
        data = orjson.loads(body)
        rv = (data.get("metadata") or {}).get("resourceVersion", "")
        return PodList(list(data.get("items") or ()), str(rv))

    async def watch(self, resource_version: str, timeout_s: int) -> EventStream:
        # the server ends the watch after timeout_s: one still open request_timeout_s later is dead (a
        # total timeout: every client version takes a number, and a watch cannot outlive it anyway)
        timeout = timeout_s + self.k.request_timeout_s
        resp = await self._api.list_namespaced_pod(
            self.namespace,
            label_selector=self.k.label_selector,
            watch=True,
            resource_version=resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout_s,
            _preload_content=False,
            _request_timeout=timeout,
        )
        if resp.status != 200:
            try:
                raise _status_error(resp.status, await resp.read())
            finally:
                resp.release()
        return _WatchStream(resp)

    async def close(self) -> None:
        if self._api_client is not None:
            await self._api_client.close()


class _WatchStream:
    """A watch response read as JSON lines, split here (no readline limit on an object's size)."""

    def __init__(self, resp: Any) -> None:
        self._resp = resp

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        buf = bytearray()
        async for chunk in self._resp.content.iter_any():
            buf += chunk
            while (end := buf.find(b"\n")) >= 0:
                line = bytes(buf[:end])
                del buf[: end + 1]
                if line.strip():
                    yield _event(line)
            if len(buf) > MAX_LINE_BYTES:
                raise ApiError(f"a watch line longer than {MAX_LINE_BYTES} bytes")
        if buf.strip():
            yield _event(bytes(buf))

    async def aclose(self) -> None:
        self._resp.close()  # a watch not read to its end: the connection cannot be reused


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _context_namespace(config: Any, path: str, context: str | None) -> str | None:
    contexts, active = config.list_kube_config_contexts(config_file=path)
    chosen = next((c for c in contexts if c.get("name") == context), None) if context else active
    return ((chosen or {}).get("context") or {}).get("namespace")


def _status_error(status: int, body: bytes) -> Exception:
    try:
        message = str(orjson.loads(body).get("message", ""))
    except (orjson.JSONDecodeError, AttributeError):
        message = body[:200].decode("utf-8", "replace")
    if status == 410:
        return Gone(message)
    return ApiError(f"HTTP {status}: {message}")


def _event(line: bytes) -> dict[str, Any]:
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ApiError(f"a watch line is not JSON: {line[:100]!r}") from exc
    if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
        raise ApiError(f"a watch line is not an event: {line[:100]!r}")
    return event


class PodWatcher:
    """Keeps one pool's discovered endpoints equal to its serving pods (see the module docstring)."""

    def __init__(
        self,
        model: str,
        settings: KubernetesDiscovery,
        source: PodSource,
        update: EndpointUpdate,
        metrics: DiscoveryMetrics,
        *,
        rng: random.Random | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.model = model
        self.k = settings
        self.source = source
        self.update = update
        self.metrics = metrics
        self.rng = rng or random.Random()
        self.sleep = sleep
        self.resource_version: str | None = None
        self.synced = asyncio.Event()  # set by the first successful list
        self._known: dict[str, tuple[PodEndpoint, Endpoint]] = {}  # pod uid -> what it serves
        self._failures = 0  # consecutive failed requests
        self._gone = 0  # consecutive 410s with no event in between
        metrics.init_pool(model)

    @property
    def endpoints(self) -> list[Endpoint]:
        return [ep for _, ep in self._known.values()]

    async def run(self) -> None:
        """List, then watch and resume, until cancelled; never raises (errors are retried)."""
        while True:
            try:
                if self.resource_version is None:
                    await self.relist()
                await self.watch_once()
                self._restart("resume")
            except Gone as exc:
                log.info("pool %s: pod watch: 410 Gone (%s): listing again", self.model, exc)
                self.resource_version = None
                self._restart("relist")
                self._gone += 1
                if self._gone > 1:  # 410 again, with no event since the last list: do not spin
                    await self.sleep(self._backoff(self._gone - 1))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the API server or the network: keep what we have, retry
                self.metrics.connected.labels(self.model).set(0)
                self._failures += 1
                delay = self._backoff(self._failures)
                log.warning("pool %s: pod %s failed (%s: %s); retrying in %.1f s", self.model,
                            "list" if self.resource_version is None else "watch", type(exc).__name__,
                            exc, delay)
                self._restart("error")
                await self.sleep(delay)

    async def relist(self) -> None:
        """List the pods and make the endpoints match them, changing only what differs."""
        pods = await self.source.list()
        self._failures = 0
        desired: dict[str, PodEndpoint] = {}
        for pod in pods.items:
            spec = pod_endpoint(pod, self.k, self.model)
            if spec is not None:
                desired[spec.uid] = spec
        removed = [uid for uid, (spec, _) in self._known.items() if desired.get(uid) != spec]
        added = [spec for uid, spec in desired.items() if uid not in self._known or uid in removed]
        self._apply(added, removed)
        self.resource_version = pods.resource_version
        self.synced.set()

    async def watch_once(self) -> None:
        """One watch from the current resourceVersion, applying its events, until it ends."""
        assert self.resource_version is not None
        timeout = max(1, int(self.k.watch_timeout_s * (1.0 + self.rng.random())))
        events = await self.source.watch(self.resource_version, timeout)
        self._failures = 0
        self.metrics.connected.labels(self.model).set(1)
        try:
            async for event in events:
                self.on_event(event)
        finally:
            self.metrics.connected.labels(self.model).set(0)
            await events.aclose()

    def on_event(self, event: Mapping[str, Any]) -> None:
        """Apply one watch event; advance the resourceVersion. An ERROR event raises (Gone for 410)."""
        kind = str(event.get("type", ""))
        obj = event["object"]
        self.metrics.events.labels(self.model, kind).inc()
        if kind == "ERROR":
            code, message = obj.get("code"), obj.get("message", "")
            if code == 410:
                raise Gone(message)
            raise ApiError(f"watch ERROR event {code}: {message}")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        self._gone = 0
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            self._pod_changed(obj, deleted=kind == "DELETED")
        elif kind != "BOOKMARK":
            log.warning("pool %s: pod watch: ignoring an event of type %r", self.model, kind)
        if rv:
            self.resource_version = str(rv)

    def _pod_changed(self, pod: Mapping[str, Any], *, deleted: bool) -> None:
        uid = str((pod.get("metadata") or {}).get("uid") or pod_key(pod))
        spec = None if deleted else pod_endpoint(pod, self.k, self.model)
        held = self._known.get(uid)
        old = held[0] if held is not None else None
        if spec == old:
            return
        if spec is None and old is not None:
            why = "deleted" if deleted else skip_reason(pod, self.k, self.model)
            log.info("pool %s: pod %s (%s) leaves: %s", self.model, old.name, old.url, why)
        self._apply([spec] if spec is not None else [], [uid] if old is not None else [])

    def _apply(self, added: Sequence[PodEndpoint], removed_uids: Sequence[str]) -> None:
        """Take `removed_uids` out and put `added` in, in one update of the pool."""
        removed = [self._known.pop(uid)[1] for uid in removed_uids]
        new: list[Endpoint] = []
        for spec in added:
            # an IP:port a live pod serves belongs to one pod: a stale holder (missed delete) goes
            stale = [uid for uid, (s, _) in self._known.items() if s.url == spec.url]
            removed += [self._known.pop(uid)[1] for uid in stale]
            ep = Endpoint(
                url=spec.url,
                model=self.model,
                role=spec.role,
                version=spec.version,
                kv_events=spec.kv_events,
                kv_events_replay=spec.kv_events_replay,
                labels={"pod": spec.name},
            )
            self._known[spec.uid] = (spec, ep)
            new.append(ep)
            log.info("pool %s: pod %s joins as %s (role %s, version %r, kv events %s)", self.model,
                     spec.name, spec.url, spec.role, spec.version, spec.kv_events or "none")
        if not new and not removed:
            return
        self.update(new, removed)
        m = self.metrics
        m.changes.labels(self.model, "added").inc(len(new))
        m.changes.labels(self.model, "removed").inc(len(removed))
        m.endpoints.labels(self.model).set(len(self._known))

    def _restart(self, reason: str) -> None:
        self.metrics.restarts.labels(self.model, reason).inc()

    def _backoff(self, failures: int) -> float:
        """Jittered exponential backoff: in [d/2, d] with d = initial x 2^(failures-1), capped."""
        k = self.k
        d = min(k.backoff_max_s, k.backoff_initial_s * 2 ** min(failures - 1, 30))
        return d * (0.5 + 0.5 * self.rng.random())


@dataclass(slots=True)
class WatchedPool:
    model: str
    settings: KubernetesDiscovery
    update: EndpointUpdate


@contextlib.asynccontextmanager
async def watch_pools(
    pools: Sequence[WatchedPool],
    metrics: DiscoveryMetrics,
    *,
    source: Callable[[KubernetesDiscovery], PodSource] = KubePodSource,
) -> AsyncIterator[list[PodWatcher]]:
    """A watcher per pool in the background while the block runs; on entry, each pool's first list is
    waited for up to its `initial_sync_timeout_s` (an API server that does not answer by then leaves
    the pool empty until it does, and the gateway serves the other pools meanwhile)."""
    sources: list[PodSource] = []
    tasks: list[asyncio.Task[None]] = []
    watchers: list[PodWatcher] = []
    try:
        for pool in pools:
            sources.append(source(pool.settings))
            watcher = PodWatcher(pool.model, pool.settings, sources[-1], pool.update, metrics)
            watchers.append(watcher)
            tasks.append(asyncio.create_task(watcher.run(), name=f"pod watch {pool.model}"))
        for watcher in watchers:
            try:
                await asyncio.wait_for(watcher.synced.wait(), watcher.k.initial_sync_timeout_s)
            except TimeoutError:
                log.warning("pool %s: no pod list within %.0f s; serving on, the pool fills once it comes",
                            watcher.model, watcher.k.initial_sync_timeout_s)
        yield watchers
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for source in sources:
            await source.close()

"""A fake Kubernetes API server for pods (aiohttp, 127.0.0.1), faithful to what a pod watcher relies on.

`GET /api/v1/namespaces/{ns}/pods` with the API's list and watch semantics:
- every change bumps one cluster-wide resourceVersion (a string, opaque to clients); a list answers
  a PodList whose `metadata.resourceVersion` is the current one;
- `labelSelector` (equality `k=v`, `k==v`, `k!=v`, existence `k`, `!k`, sets `k in (a,b)`, `k notin (a,b)`);
- `watch=true` with `resourceVersion=RV` streams (chunked JSON lines) every change after RV, then
  live changes: ADDED / MODIFIED / DELETED, with an object that starts or stops matching the selector
  sent as ADDED / DELETED, as the API server's watch cache does; without RV (or "0") it starts with
  an ADDED per current pod;
- an RV older than the kept history (after `compact()`) gets HTTP 200 then an ERROR event carrying a
  410 `Status` ("too old resource version"), and the stream ends, as the real server does;
- `timeoutSeconds` ends the watch cleanly; with `allowWatchBookmarks=true` a BOOKMARK (an object with
  only `metadata.resourceVersion`) comes just before that end, and whenever a test calls `bookmark()`;
- a bearer token is required when one is set (401 Status otherwise).

Tests change pods (`add_pod`, `set_ready`, `terminate`, `delete_pod`, `relabel`), inject faults
(`drop_watches()` aborts every open watch mid-stream, `end_watches()` closes them cleanly,
`compact()` forgets history, `fail_next(n, status)` answers the next n requests with an error,
`pause()` / `resume()` hold requests unanswered meanwhile) and
read what was asked (`requests`). `write_kubeconfig(path)` points a kubeconfig at the server.
"""

from __future__ import annotations

import asyncio
import copy
import re
import ssl
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml
from aiohttp import web

Pod = dict[str, Any]
_REQUIREMENT = re.compile(
    r"\s*(?:(?P<neg>!)\s*(?P<nkey>[\w./-]+)"
    r"|(?P<skey>[\w./-]+)\s+(?P<op>in|notin)\s*\((?P<vals>[^)]*)\)"
    r"|(?P<key>[\w./-]+)\s*(?:(?P<eq>==|=|!=)\s*(?P<val>[\w.-]*))?)\s*"
)


def parse_selector(selector: str) -> Callable[[dict[str, str]], bool]:
    """A label selector as the API server reads it -> a predicate over labels (ValueError if malformed)."""
    tests: list[Callable[[dict[str, str]], bool]] = []
    for part in _split(selector):
        m = _REQUIREMENT.fullmatch(part)
        if not m:
            raise ValueError(f"unable to parse requirement: {part!r}")
        if m["neg"]:
            key = m["nkey"]
            tests.append(lambda labels, key=key: key not in labels)
        elif m["op"]:
            key, vals = m["skey"], {v.strip() for v in m["vals"].split(",") if v.strip()}
            if m["op"] == "in":
                tests.append(lambda labels, key=key, vals=vals: labels.get(key) in vals)
            else:
                tests.append(lambda labels, key=key, vals=vals: labels.get(key) not in vals)
        elif m["eq"]:
            key, val, eq = m["key"], m["val"], m["eq"] != "!="
            tests.append(lambda labels, key=key, val=val, eq=eq: (labels.get(key) == val) == eq)
        else:
            key = m["key"]
            tests.append(lambda labels, key=key: key in labels)
    return lambda labels: all(t(labels) for t in tests)


def running_pod(template: dict[str, Any], namespace: str, ip: str = "10.0.0.5") -> dict[str, Any]:
    """A pod as the API server lists it once a workload's pod `template` runs, Ready, at `ip`."""
    return {"metadata": {**template["metadata"], "name": "vllm-0", "namespace": namespace, "uid": "u"},
            "spec": template["spec"],
            "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}}


def _split(selector: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts, depth, cur = [], 0, ""
    for ch in selector:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return [p for p in parts if p.strip()]


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


@dataclass
class Change:
    rv: int
    type: str  # ADDED | MODIFIED | DELETED
    old: Pod | None
    new: Pod


@dataclass
class Request:
    namespace: str
    query: dict[str, str]

    @property
    def watch(self) -> bool:
        return go_bool(self.query.get("watch"))


@dataclass
class _Watch:
    namespace: str
    selects: Callable[[dict[str, str]], bool]
    bookmarks: bool
    queue: asyncio.Queue[Change | str] = field(default_factory=asyncio.Queue)
    transport: asyncio.BaseTransport | None = None


class FakeKubeApi:
    def __init__(self, token: str | None = "fake-token", namespace: str = "default",
                 tls: ssl.SSLContext | None = None) -> None:
        self.token = token
        self.tls = tls  # serve HTTPS (as the in-cluster API server does), e.g. self_signed_tls()
        self.namespace = namespace  # of the pods the helpers below make and change, unless told
        self.rv = 1000
        self.pods: dict[tuple[str, str], Pod] = {}
        self.history: list[Change] = []
        self.oldest_rv = self.rv  # a watch from an RV older than this gets 410 Gone
        self.requests: list[Request] = []
        self._watches: list[_Watch] = []
        self._failures: list[int] = []
        self._held = 0
        self._serving = asyncio.Event()
        self._serving.set()
        self._runner: web.AppRunner | None = None
        self.url = ""

    # ---- server -------------------------------------------------------------------------------

    async def start(self) -> FakeKubeApi:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{namespace}/pods", self._pods)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, handler_cancellation=True)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.tls).start()
        self.port = int(self._runner.addresses[0][1])
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"
        return self

    async def stop(self) -> None:
        self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()

    def write_kubeconfig(self, path: Path, namespace: str | None = None) -> Path:
        user: dict[str, Any] = {"token": self.token} if self.token else {}
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": user}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "tester",
                                                       "namespace": namespace or self.namespace}}],
        }))  # fmt: skip
        return path

    # ---- pods ---------------------------------------------------------------------------------

    def add_pod(
        self,
        name: str,
        *,
        namespace: str | None = None,
        labels: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None,
        ip: str | None = "127.0.0.1",
        ports: dict[str, int] | None = None,
        ready: bool = True,
        phase: str = "Running",
    ) -> Pod:
        pod = {
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": {
                "name": name, "namespace": namespace or self.namespace, "uid": str(uuid.uuid4()),
                "labels": dict(labels or {}), "annotations": dict(annotations or {}),
                "creationTimestamp": "2026-12-02T00:00:00Z",
            },
            "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai", "ports": [
                {"name": n, "containerPort": p, "protocol": "TCP"} for n, p in (ports or {}).items()
            ]}]},
            "status": {"phase": phase, "conditions": [_ready_condition(ready)]},
        }  # fmt: skip
        if ip is not None:
            pod["status"]["podIP"] = ip
            pod["status"]["podIPs"] = [{"ip": ip}]
        self._commit("ADDED", None, pod)
        return pod

    def modify(self, name: str, change: Callable[[Pod], None], namespace: str | None = None) -> Pod:
        old = self.pods[(namespace or self.namespace, name)]
        new = copy.deepcopy(old)
        change(new)
        self._commit("MODIFIED", old, new)
        return new

    def set_ready(self, name: str, ready: bool, namespace: str | None = None) -> Pod:
        def change(pod: Pod) -> None:
            pod["status"]["conditions"] = [_ready_condition(ready)]

        return self.modify(name, change, namespace)

    def relabel(self, name: str, labels: dict[str, str | None], namespace: str | None = None) -> Pod:
        """Set labels (a None value removes the label)."""

        def change(pod: Pod) -> None:
            for k, v in labels.items():
                if v is None:
                    pod["metadata"]["labels"].pop(k, None)
                else:
                    pod["metadata"]["labels"][k] = v

        return self.modify(name, change, namespace)

    def terminate(self, name: str, namespace: str | None = None) -> Pod:
        """What `kubectl delete` does first: deletionTimestamp set, the pod still listed (and Ready)."""

        def change(pod: Pod) -> None:
            pod["metadata"]["deletionTimestamp"] = "2026-12-02T00:01:00Z"
            pod["metadata"]["deletionGracePeriodSeconds"] = 30

        return self.modify(name, change, namespace)

    def delete_pod(self, name: str, namespace: str | None = None) -> None:
        old = self.pods[(namespace or self.namespace, name)]
        self._commit("DELETED", old, copy.deepcopy(old))

    def _commit(self, type_: str, old: Pod | None, new: Pod) -> None:
        self.rv += 1
        new["metadata"]["resourceVersion"] = str(self.rv)
        key = (new["metadata"]["namespace"], new["metadata"]["name"])
        if type_ == "DELETED":
            del self.pods[key]
        else:
            self.pods[key] = new
        change = Change(self.rv, type_, old, new)
        self.history.append(change)
        for w in self._watches:
            w.queue.put_nowait(change)

    # ---- faults -------------------------------------------------------------------------------

    def compact(self) -> None:
        """Forget the history: a watch from any RV older than the current one gets 410 Gone."""
        self.history.clear()
        self.oldest_rv = self.rv

    def bookmark(self) -> None:
        """Send a BOOKMARK (current RV) on every open watch that allowed bookmarks."""
        for w in self._watches:
            if w.bookmarks:
                w.queue.put_nowait("bookmark")

    def end_watches(self) -> None:
        """End every open watch cleanly (as at its timeout)."""
        for w in self._watches:
            w.queue.put_nowait("end")

    def drop_watches(self) -> None:
        """Abort every open watch's connection mid-stream (no final chunk: the client sees a broken body)."""
        for w in list(self._watches):
            if w.transport is not None:
                w.transport.abort()
            w.queue.put_nowait("end")

    def pause(self) -> None:
        """Hold every new request unanswered until `resume()` (an API server that is unreachable for a
        while: tests change pods meanwhile, deterministically out of the watcher's sight)."""
        self._serving.clear()

    def resume(self) -> None:
        self._serving.set()

    @property
    def held(self) -> int:
        """Requests waiting for `resume()`."""
        return self._held

    def fail_next(self, n: int, status: int = 500) -> None:
        self._failures.extend([status] * n)

    @property
    def open_watches(self) -> int:
        return len(self._watches)

    def watch_requests(self) -> list[Request]:
        return [r for r in self.requests if r.watch]

    def list_requests(self) -> list[Request]:
        return [r for r in self.requests if not r.watch]

    # ---- handler ------------------------------------------------------------------------------

    async def _pods(self, request: web.Request) -> web.StreamResponse:
        if not self._serving.is_set():
            self._held += 1
            try:
                await self._serving.wait()
            finally:
                self._held -= 1
        namespace = request.match_info["namespace"]
        query = dict(request.query)
        self.requests.append(Request(namespace, query))
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            return _json(401, _status(401, "Unauthorized", "Unauthorized"))
        if self._failures:
            status = self._failures.pop(0)
            return _json(status, _status(status, "InternalError", "injected failure"))
        try:
            selects = parse_selector(query.get("labelSelector", ""))
        except ValueError as exc:
            return _json(400, _status(400, "BadRequest", str(exc)))
        if go_bool(query.get("watch")):
            return await self._watch(request, namespace, selects, query)
        items = [p for (ns, _), p in sorted(self.pods.items())
                 if ns == namespace and selects(p["metadata"]["labels"])]  # fmt: skip
        body = {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": str(self.rv)},
                "items": items}  # fmt: skip
        return _json(200, body)

    async def _watch(self, request: web.Request, namespace: str,
                     selects: Callable[[dict[str, str]], bool], query: dict[str, str]) -> web.StreamResponse:
        w = _Watch(namespace, selects, go_bool(query.get("allowWatchBookmarks")))
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        w.transport = request.transport
        await resp.prepare(request)
        since = query.get("resourceVersion", "")
        timeout = float(query["timeoutSeconds"]) if "timeoutSeconds" in query else None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout is not None else None
        if since and since != "0" and int(since) < self.oldest_rv:
            too_old = _status(410, "Expired", f"too old resource version: {since} ({self.oldest_rv})")
            await _line(resp, {"type": "ERROR", "object": too_old})
            return resp
        self._watches.append(w)
        try:
            if not since or since == "0":  # no RV: the current state as ADDED events first
                for (ns, _), pod in sorted(self.pods.items()):
                    if ns == namespace and selects(pod["metadata"]["labels"]):
                        await _line(resp, {"type": "ADDED", "object": pod})
            else:
                for change in [c for c in self.history if c.rv > int(since)]:
                    await self._send(resp, w, change)
            while True:
                left = None if deadline is None else deadline - loop.time()
                if left is not None and left <= 0:
                    break
                try:
                    item = await asyncio.wait_for(w.queue.get(), timeout=left)
                except TimeoutError:
                    break
                if item == "end":
                    return resp
                if item == "bookmark":
                    await _line(resp, self._bookmark())
                elif isinstance(item, Change):
                    await self._send(resp, w, item)
            if w.bookmarks:  # the API server's bookmark at the end of a watch (Kubernetes >= 1.27)
                await _line(resp, self._bookmark())
            return resp
        except (ConnectionResetError, RuntimeError):  # the client or drop_watches closed it
            return resp
        finally:
            self._watches.remove(w)

    def _bookmark(self) -> dict[str, Any]:
        return {"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1",
                                               "metadata": {"resourceVersion": str(self.rv)}}}

    async def _send(self, resp: web.StreamResponse, w: _Watch, change: Change) -> None:
        if change.new["metadata"]["namespace"] != w.namespace:
            return
        was = change.old is not None and w.selects(change.old["metadata"]["labels"])
        now = w.selects(change.new["metadata"]["labels"])
        if change.type == "DELETED":
            kind = "DELETED" if now else None
        elif was and now:
            kind = "MODIFIED"
        elif now:
            kind = "ADDED"
        elif was:
            kind = "DELETED"  # left the selector: to this watch the pod is gone
        else:
            kind = None
        if kind is not None:
            await _line(resp, {"type": kind, "object": change.new})


def self_signed_tls(directory: Path) -> tuple[ssl.SSLContext, Path]:
    """A server TLS context for 127.0.0.1 with a fresh self-signed certificate (openssl), and the
    certificate's path: the CA a client must trust (the in-cluster ca.crt)."""
    cert, key = directory / "ca.crt", directory / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context, cert


def go_bool(value: str | None) -> bool:
    """A boolean query parameter as the API server reads it (Go's strconv.ParseBool: the Python client
    sends `True`)."""
    return value in ("1", "t", "T", "TRUE", "true", "True")


def _ready_condition(ready: bool) -> dict[str, str]:
    return {"type": "Ready", "status": "True" if ready else "False"}


def _json(status: int, body: dict[str, Any]) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


async def _line(resp: web.StreamResponse, event: dict[str, Any]) -> None:
    await resp.write(orjson.dumps(event) + b"\n")

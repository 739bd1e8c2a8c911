"""What a client may reach: the one place that reads a request's target.

`resolve_target(method, raw_target)` takes the target exactly as it arrived on the wire
(`request.raw_path`, never aiohttp's decoded or normalised views), and either returns the gateway
route it names, or raises the OpenAI-shaped error that refuses it:

- only origin-form targets (`/path?query`): absolute-form (`http://host/v1/...`), authority-form
  (CONNECT) and asterisk-form (`OPTIONS *`) get 400, as does the CONNECT method;
- the path is split on `/` and each segment percent-decoded once: dot segments (`.`, `..`, `%2e%2e`),
  encoded slashes or backslashes (`%2f`, `%5c`, `\\`), empty segments, control characters, bad
  escapes and non-UTF-8 bytes get 400; a fragment (`#`) too;
- what remains must be a gateway route: `/health`, `/ready`, `/metrics`, `/v1/models` (GET, HEAD),
  `/tokenize` and `/detokenize` (POST), or `/v1/<segments>` (the API methods), proxied, except vLLM's
  administrative `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`; else 404/405.

A proxied request goes to `Target.upstream_url(pod_base_url)`: the pod's base URL, the route's
segments re-encoded canonically, and the query with every character outside RFC 3986's query set
percent-encoded. Nothing of the client's raw target reaches a pod unchecked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote, unquote_to_bytes

from aiohttp import web
from yarl import URL

from gateway import errors

RouteKind = Literal["health", "ready", "metrics", "models", "proxy"]

READ_METHODS = frozenset({"GET", "HEAD"})
# Methods forwarded to a pod on /v1/*: what an HTTP API uses; TRACE, CONNECT and extensions are not.
API_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# path -> (route, the methods it answers); other methods on /v1/models are proxied, as before.
ROUTES: dict[str, tuple[RouteKind, frozenset[str]]] = {
    "/health": ("health", READ_METHODS),
    "/ready": ("ready", READ_METHODS),
    "/metrics": ("metrics", READ_METHODS),
    "/v1/models": ("models", READ_METHODS),
    "/tokenize": ("proxy", frozenset({"POST"})),
    "/detokenize": ("proxy", frozenset({"POST"})),
}
PROXY_PREFIX = "v1"
# vLLM's administrative routes under /v1 (runtime LoRA loading): an operator's, never a client's.
ADMIN_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})

_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")  # a '%' that does not start a valid escape
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SEGMENT_SAFE = "-._~!$&'()*+,;=:@"  # RFC 3986 pchar minus '%' (escapes are re-created by quote)
_QUERY_SAFE = _SEGMENT_SAFE + "/?%"  # valid escapes are kept as they are


@dataclass(frozen=True, slots=True)
class Target:
    """A request target the gateway accepted: `path` decoded (e.g. `/v1/chat/completions`), `encoded`
    the same path canonically percent-encoded, `query` safe to send on (without the '?')."""

    kind: RouteKind
    path: str
    encoded: str
    query: str = ""

    def upstream_url(self, base: str) -> URL:
        """The URL of this route on the pod whose base URL is `base` (no trailing slash)."""
        tail = f"{self.encoded}?{self.query}" if self.query else self.encoded
        return URL(base + tail, encoded=True)


TARGET_KEY = web.RequestKey("kvgate_target", Target)


def resolve_target(method: str, raw_target: str) -> Target:
    """The route `raw_target` names for `method`; GatewayError 400 (malformed or not origin-form),
    404 (no such route) or 405 (the route does not take `method`) otherwise."""
    if method == "CONNECT":
        raise errors.bad_target("CONNECT is not supported: the gateway is not a forward proxy.")
    if not raw_target.startswith("/"):
        raise errors.bad_target(
            "The request target must be a path (origin-form, e.g. /v1/completions), not "
            f"{_shown(raw_target)}."
        )
    raw_path, sep, raw_query = raw_target.partition("?")
    if "#" in raw_target:
        raise errors.bad_target("The request target must not contain a fragment ('#').")
    segments = [_segment(s) for s in raw_path[1:].split("/")]
    path = "/" + "/".join(segments)
    route = ROUTES.get(path)
    if route is None:
        if len(segments) < 2 or segments[0] != PROXY_PREFIX or path in ADMIN_PATHS:
            raise errors.route_not_found(path)
        route = ("proxy", API_METHODS)
    kind, methods = route
    if method not in methods:
        if kind == "models" and method in API_METHODS:
            kind, methods = "proxy", API_METHODS  # POST /v1/models and friends: the pod's to answer
        else:
            raise errors.method_not_allowed(method, methods)
    encoded = "/" + "/".join(quote(s, safe=_SEGMENT_SAFE) for s in segments)
    return Target(kind, path, encoded, _query(raw_query) if sep else "")


def _segment(raw: str) -> str:
    """One path segment, percent-decoded once and checked."""
    if not raw:
        raise errors.bad_target("The request path has an empty segment ('//' or a trailing '/').")
    if "\\" in raw or _ESCAPE.search(raw):
        raise errors.bad_target("The request path has a backslash or an invalid percent-escape.")
    try:
        segment = unquote_to_bytes(raw).decode("utf-8") if "%" in raw else raw
    except UnicodeDecodeError:
        raise errors.bad_target("The request path does not decode to UTF-8.") from None
    if segment in (".", ".."):
        raise errors.bad_target("The request path has a dot segment ('.' or '..', encoded or not).")
    if "/" in segment or "\\" in segment:
        raise errors.bad_target("The request path has an encoded slash or backslash (%2F, %5C).")
    if _CONTROL.search(segment):
        raise errors.bad_target("The request path has a control character.")
    return segment


def _query(raw: str) -> str:
    if _ESCAPE.search(raw):
        raise errors.bad_target("The query string has an invalid percent-escape.")
    return quote(raw, safe=_QUERY_SAFE)


def _shown(raw: str, limit: int = 80) -> str:
    return repr(raw if len(raw) <= limit else raw[:limit] + "...")

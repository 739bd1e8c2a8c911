"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the matching HTTP status."""

from __future__ import annotations

import orjson
from aiohttp import web


class GatewayError(Exception):
    """An error answered to the client as an OpenAI error body; raised anywhere on the request path."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        reason: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        # the label of kvgate_rejected_requests_total when this refuses a client's request (4xx)
        self.reason = reason or _REASONS.get(status, f"status_{status}")
        self.headers = headers

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)

    def response(self) -> web.Response:
        return web.Response(
            status=self.status, body=self.body(), content_type="application/json", headers=self.headers
        )


_REASONS = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_encoding",
    417: "expectation_failed",
}


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


def bad_request(message: str, param: str | None = None, reason: str = "invalid_body") -> GatewayError:
    return GatewayError(400, message, param=param, code="invalid_value" if param else None, reason=reason)


def bad_target(message: str) -> GatewayError:
    """A request target the gateway refuses to route (not origin-form, traversal, bad escapes)."""
    return GatewayError(400, message, code="invalid_request_target", reason="bad_target")


def route_not_found(path: str) -> GatewayError:
    shown = path if len(path) <= 100 else path[:100] + "..."
    return GatewayError(404, f"Unknown route {shown!r}.", code="unknown_route", reason="unknown_route")


def method_not_allowed(method: str, allowed: frozenset[str]) -> GatewayError:
    allow = ", ".join(sorted(allowed))
    return GatewayError(
        405,
        f"Method {method[:20]!r} is not allowed here (allowed: {allow}).",
        code="method_not_allowed",
        headers={"Allow": allow},
    )


def expectation_failed(expect: str) -> GatewayError:
    return GatewayError(
        417, f"Unsupported Expect header {expect[:40]!r}: only 100-continue is.", code="expectation_failed"
    )


def unsupported_encoding(encoding: str) -> GatewayError:
    return GatewayError(
        415,
        f"Unsupported Content-Encoding {encoding[:40]!r}: use gzip, deflate or identity.",
        code="unsupported_content_encoding",
    )


def undecodable_body(encoding: str) -> GatewayError:
    return GatewayError(
        400,
        f"The request body does not decode as {encoding[:40]!r}.",
        code="invalid_body_encoding",
        reason="bad_encoding",
    )


def unreadable_body(detail: str) -> GatewayError:
    """The body's framing broke while it was read (bad chunking, cut off before Content-Length)."""
    return GatewayError(400, f"The request body could not be read: {detail}", reason="bad_framing")


def body_timeout(idle_timeout: float) -> GatewayError:
    """The client stopped sending before its body was complete."""
    return GatewayError(
        408,
        f"The request body did not arrive: no data for {idle_timeout:g} s.",
        code="request_timeout",
        reason="body_timeout",
    )


def not_forwardable(detail: str) -> GatewayError:
    """The upstream request could not be built from the client's (the pod is not to blame)."""
    return GatewayError(400, f"The request cannot be forwarded: {detail}", reason="not_forwardable")


def unauthorized() -> GatewayError:
    return GatewayError(401, "Incorrect or missing API key.", code="invalid_api_key")


def model_not_found(model: str) -> GatewayError:
    return GatewayError(
        404,
        f"The model `{model}` does not exist.",
        param="model",
        code="model_not_found",
        reason="unknown_model",
    )


def body_too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"Request body exceeds {limit} bytes.", code="request_too_large")


def no_healthy_endpoint(model: str) -> GatewayError:
    return GatewayError(
        503,
        f"No healthy endpoint serves model `{model}`.",
        type="service_unavailable_error",
        code="no_healthy_endpoint",
    )


def upstream_failed(detail: str) -> GatewayError:
    return GatewayError(502, f"Upstream failed: {detail}", type="upstream_error", code="upstream_failed")


def upstream_bad_answer(detail: str) -> GatewayError:
    """A pod's 2xx answer that is not what vLLM sends (not JSON, not SSE)."""
    return GatewayError(
        502, f"Upstream sent a malformed answer: {detail}", type="upstream_error", code="upstream_bad_answer"
    )


def upstream_timeout(detail: str) -> GatewayError:
    return GatewayError(504, f"Upstream timed out: {detail}", type="timeout_error", code="upstream_timeout")


def sse_error_event(message: str, code: str = "upstream_failed") -> bytes:
    """The SSE lines that end a stream whose upstream failed mid-way: an error event, then [DONE]."""
    return b"data: " + error_body(message, "upstream_error", code) + b"\n\ndata: [DONE]\n\n"

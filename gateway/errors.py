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
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)

    def response(self) -> web.Response:
        return web.Response(status=self.status, body=self.body(), content_type="application/json")


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


def bad_request(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, message, param=param, code="invalid_value" if param else None)


def unauthorized() -> GatewayError:
    return GatewayError(401, "Incorrect or missing API key.", code="invalid_api_key")


def model_not_found(model: str) -> GatewayError:
    return GatewayError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


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


def upstream_timeout(detail: str) -> GatewayError:
    return GatewayError(504, f"Upstream timed out: {detail}", type="timeout_error", code="upstream_timeout")


def sse_error_event(message: str, code: str = "upstream_failed") -> bytes:
    """The SSE lines that end a stream whose upstream failed mid-way: an error event, then [DONE]."""
    return b"data: " + error_body(message, "upstream_error", code) + b"\n\ndata: [DONE]\n\n"

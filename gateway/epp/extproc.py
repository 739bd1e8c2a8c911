"""Envoy's external processing API (envoy.service.ext_proc.v3.ExternalProcessor) over `EppRequest`.

The filter's processing mode this expects (config/envoy/kvgate-epp.yaml):

    request_header_mode: SEND        headers first: target, API key, or an answer of our own
    request_body_mode: BUFFERED      the whole body in one message; the pick rides on its answer
                                     (header mutations in a body response apply only in BUFFERED)
    response_header_mode: SEND       status and the pod Envoy reached (response_attributes:
                                     upstream.address), the x-kvgate-* headers added
    response_body_mode: STREAMED     each chunk seen and answered empty: it passes unchanged, and the
                                     first one is the first byte, the last one the end of the request
    response_trailer_mode: SEND      (gRPC-style answers end with trailers instead)

Every message gets exactly one answer, in order (the protocol outside FULL_DUPLEX_STREAMED). A
refusal is an ImmediateResponse with serve's status and OpenAI error body, after which the stream
ends. The pick answers with the Endpoint Picker Protocol's `x-gateway-destination-endpoint` header
and the same value in dynamic metadata `envoy.lb`, and clears the route cache.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from gateway.epp.picker import (
    DESTINATION_HEADER,
    METADATA_NAMESPACE,
    SERVED_KEY,
    Answer,
    EppRequest,
    Pick,
    Picker,
)
from gateway.errors import GatewayError

log = logging.getLogger("kvgate.epp")

UPSTREAM_ADDRESS = "upstream.address"  # the response attribute naming the pod that answered
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
# Answers that change nothing, built once.
_REQUEST_HEADERS_OK = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
_REQUEST_BODY_OK = pb.ProcessingResponse(request_body=pb.BodyResponse())
_REQUEST_TRAILERS_OK = pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
_RESPONSE_BODY_OK = pb.ProcessingResponse(response_body=pb.BodyResponse())
_RESPONSE_TRAILERS_OK = pb.ProcessingResponse(response_trailers=pb.TrailersResponse())


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):
    """One `Process` stream per HTTP request; see the module docstring."""

    def __init__(self, picker: Picker) -> None:
        self.picker = picker

    async def Process(  # the gRPC method's name
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        req = self.picker.open()
        body: list[bytes] = []
        try:
            async for msg in request_iterator:
                kind = msg.WhichOneof("request")
                if kind == "response_body":
                    req.response_body(msg.response_body.end_of_stream)
                    yield _RESPONSE_BODY_OK
                elif kind == "request_headers":
                    answer = await self._request_headers(req, msg.request_headers)
                    yield answer
                    if answer.WhichOneof("response") == "immediate_response":
                        return
                elif kind == "request_body":
                    body.append(msg.request_body.body)
                    if not msg.request_body.end_of_stream:
                        yield _REQUEST_BODY_OK
                        continue
                    answer = await self._routed(req, b"".join(body), body=True)
                    body.clear()
                    yield answer
                    if answer.WhichOneof("response") == "immediate_response":
                        return
                elif kind == "response_headers":
                    headers = msg.response_headers
                    status = _status(headers.headers.headers)
                    added = req.response_headers(status, _served(msg), headers.end_of_stream)
                    yield _headers_response(added)
                elif kind == "request_trailers":
                    yield _REQUEST_TRAILERS_OK
                elif kind == "response_trailers":
                    req.response_trailers()
                    yield _RESPONSE_TRAILERS_OK
        finally:
            req.close()

    async def _request_headers(self, req: EppRequest, msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        try:
            req.request_headers(_pairs(msg.headers.headers))
        except GatewayError as exc:
            return self._refused(exc)
        answer = req.local_answer()
        if answer is not None:
            return _immediate(answer)
        if msg.end_of_stream:  # no body (a GET): routed now
            return await self._routed(req, b"", body=False)
        return _REQUEST_HEADERS_OK

    async def _routed(self, req: EppRequest, raw: bytes, *, body: bool) -> pb.ProcessingResponse:
        try:
            pick = await req.pick(raw)
        except GatewayError as exc:
            return self._refused(exc)
        except Exception as exc:  # a bug: the client still gets an OpenAI-shaped answer, as from serve
            log.exception("epp: routing request %s failed", req.request_id)
            return self._refused(GatewayError(500, f"Internal gateway error: {type(exc).__name__}",
                                              type="server_error"))
        return _pick_response(pick, body=body)

    def _refused(self, exc: GatewayError) -> pb.ProcessingResponse:
        self.picker.refused(exc)
        headers = dict(exc.headers or {})
        return _immediate(Answer(exc.status, exc.body(), headers=headers), details=f"kvgate_{exc.reason}")


def _pairs(headers: Iterable[base_pb2.HeaderValue]) -> Iterable[tuple[str, str]]:
    for h in headers:
        yield h.key, h.raw_value.decode("latin-1") if h.raw_value else h.value


def _status(headers: Iterable[base_pb2.HeaderValue]) -> int:
    for name, value in _pairs(headers):
        if name == ":status":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def _served(msg: pb.ProcessingRequest) -> str | None:
    """The pod Envoy reached: the protocol's served-endpoint metadata when the data plane sets it,
    else the `upstream.address` response attribute."""
    ns = msg.metadata_context.filter_metadata.get(METADATA_NAMESPACE)
    if ns is not None and SERVED_KEY in ns.fields:
        return ns.fields[SERVED_KEY].string_value or None
    for attrs in msg.attributes.values():
        value = attrs.fields.get(UPSTREAM_ADDRESS)
        if value is not None and value.string_value:
            return value.string_value
    return None


def _header(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, raw_value=value.encode("latin-1")), append_action=_OVERWRITE
    )


def _mutation(set_headers: dict[str, str], remove: list[str] | None = None) -> pb.HeaderMutation:
    return pb.HeaderMutation(
        set_headers=[_header(k, v) for k, v in set_headers.items()], remove_headers=remove or []
    )


def _pick_response(pick: Pick, *, body: bool) -> pb.ProcessingResponse:
    """The pick as the Endpoint Picker Protocol says: header and `envoy.lb` metadata, route cache
    cleared; on the body message when there is one (BUFFERED), else on the headers message."""
    common = pb.CommonResponse(
        header_mutation=_mutation(pick.set_headers, pick.remove_headers), clear_route_cache=True
    )
    if pick.body is not None:
        common.body_mutation.body = pick.body
    metadata = struct_pb2.Struct()
    metadata.get_or_create_struct(METADATA_NAMESPACE)[DESTINATION_HEADER] = pick.destination
    if body:
        return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common), dynamic_metadata=metadata)
    return pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common),
                                 dynamic_metadata=metadata)


def _headers_response(added: dict[str, str]) -> pb.ProcessingResponse:
    if not added:
        return pb.ProcessingResponse(response_headers=pb.HeadersResponse())
    common = pb.CommonResponse(header_mutation=_mutation(added))
    return pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=common))


def _immediate(answer: Answer, details: str = "kvgate") -> pb.ProcessingResponse:
    headers = {"content-type": answer.content_type, **answer.headers}
    return pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=answer.status),  # type: ignore[arg-type]
        headers=_mutation(headers),
        body=answer.body,
        details=details,
    ))

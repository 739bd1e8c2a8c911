"""`kvgate epp`: the gateway's routing as an Envoy endpoint picker (Gateway API Inference Extension).

Envoy (or any proxy speaking Envoy's ext_proc gRPC API) asks, per request, where to send it and
proxies the bytes itself; kvgate answers with the pod that `kvgate serve` would have chosen:

    picker.py    the protocol-free core: one `EppRequest` per ext_proc stream runs serve's steps
                 (target, API key, body, pool, alias, admission, policy pick) and its bookkeeping
                 (in-flight counts, policy hooks, metrics) from the response messages
    extproc.py   the ext_proc servicer: protobuf messages in, `EppRequest` calls, protobuf out
    server.py    the process: the gateway app (state, health, scraping, discovery, /metrics on HTTP)
                 plus the gRPC server on its own port (ext_proc and grpc.health.v1)

Only `extproc.py` and `server.py` import grpc and the Envoy protobufs (the `epp` extra).
"""

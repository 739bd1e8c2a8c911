"""The endpoint picker protocol's gRPC health services (grpc.health.v1): `liveness` while the process
answers; `readiness`, the ext_proc service and the server as a whole while some pod is healthy."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import eventually

from bench.sim.fleet import SimFleet
from gateway.config import EndpointSpec, GatewayConfig, Health, PoolSpec
from gateway.epp.server import EXT_PROC_SERVICE, running_epp

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
pytestmark = pytest.mark.timeout(60)


async def test_readiness_follows_the_pods_and_liveness_the_process() -> None:
    async with SimFleet(1, model="m", prefill_tps=1e6, itl_ms=1.0) as fleet:
        cfg = GatewayConfig(pools=[PoolSpec(model="m", endpoints=[EndpointSpec(url=fleet.urls[0])])],
                            health=Health(interval=0.2, timeout=0.2))
        cfg.listen.port = 0
        async with running_epp(cfg, grpc_host="127.0.0.1", grpc_port=0) as epp, \
                grpc.aio.insecure_channel(epp.grpc) as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            async def status(service: str) -> int:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
                return reply.status

            for service in ("liveness", "readiness", EXT_PROC_SERVICE, ""):
                assert await status(service) == SERVING, service
            await fleet.pods[0].stop()  # its one pod dies: not ready, still alive
            async def not_ready() -> bool:
                return await status("readiness") == NOT_SERVING

            await eventually(not_ready, within=10, what="readiness NOT_SERVING", interval=0.1)
            assert await status(EXT_PROC_SERVICE) == NOT_SERVING
            assert await status("liveness") == SERVING

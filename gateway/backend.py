"""The gateway's one gRPC channel to the generation service, its stubs, and what the gateway asks of it
besides generating: health and the served model's description."""

from __future__ import annotations

import logging
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from generate.v1 import generate_pb2 as pb
from generate.v1 import generate_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 2.0
INFO_TTL_S = 30.0
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # Reconnect quickly after the service restarts: calls made while it is down fail fast (UNAVAILABLE → 503)
    # instead of waiting for a long backoff to expire.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 30000),
    ("grpc.keepalive_timeout_ms", 10000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


class Backend:
    def __init__(self, target: str, token: str | None = None) -> None:
        self.target = target
        self._auth = (("authorization", f"Bearer {token}"),) if token else ()
        self._channel: grpc.aio.Channel | None = None
        self._info: pb.GetModelInfoResponse | None = None
        self._info_at = 0.0

    async def open(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.GenerateStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def close(self, grace: float | None = None) -> None:
        if self._channel is not None:
            await self._channel.close(grace)

    def metadata(self, request_id: str) -> tuple[tuple[str, str], ...]:
        return (("x-request-id", request_id), *self._auth)

    async def healthy(self) -> bool:
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=HEALTH_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def model_info(self) -> pb.GetModelInfoResponse:
        """The served model, cached for a while; raises AioRpcError when the service cannot be reached."""
        now = time.monotonic()
        if self._info is None or now - self._info_at > INFO_TTL_S:
            self._info = await self.stub.GetModelInfo(
                pb.GetModelInfoRequest(), metadata=self._auth, timeout=HEALTH_TIMEOUT_S
            )
            self._info_at = now
        return self._info

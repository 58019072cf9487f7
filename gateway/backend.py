"""The gateway's connections to the generation service: one gRPC channel per replica, each watched through the
standard health service, and the start of every Generate call (replica choice, retry before the first message).

A call is retried on another replica only while nothing has been generated for it: when the replica cannot be
reached, is draining (UNAVAILABLE) or is at capacity (RESOURCE_EXHAUSTED) before the first message. A stream
that fails after it started is never retried (its client already holds part of the answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from generate.v1 import generate_pb2 as pb
from generate.v1 import generate_pb2_grpc as pb_grpc
from gateway.routing import Replica, Router, parse_targets, resolve

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 2.0
INFO_TTL_S = 30.0
RESOLVE_EVERY_S = 5.0
# How long start-up waits for the first replica to report SERVING before the gateway takes requests anyway.
FIRST_HEALTH_WAIT_S = 5.0
# Answers a replica gives before it starts generating that another replica may not: not serving (starting,
# draining), at capacity, or cancelling its calls as it shuts down.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED)
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # Reconnect quickly after a replica restarts.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # Notice a replica whose host vanished (no RST arrives) within ~15 s; the service permits these pings.
    ("grpc.keepalive_time_ms", 10000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


class NoReplica(Exception):
    """No healthy replica is left to try."""


class _Connection:
    """A replica's channel, stubs and health watch."""

    def __init__(self, replica: Replica, on_change) -> None:
        self.channel = grpc.aio.insecure_channel(replica.target, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.GenerateStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.watch = asyncio.create_task(self._watch(replica, on_change))

    async def _watch(self, replica: Replica, on_change) -> None:
        backoff = 0.2
        while True:
            try:
                async for reply in self.health.Watch(health_pb2.HealthCheckRequest(service="")):
                    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
                    if serving != replica.healthy:
                        replica.healthy = serving
                        on_change(replica)
                    backoff = 0.2
            except grpc.aio.AioRpcError:
                pass
            if replica.healthy:
                replica.healthy = False
                on_change(replica)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def close(self, grace: float | None) -> None:
        self.watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.watch
        await self.channel.close(grace)


class Stream:
    """A started Generate call: its first message, the rest via `read()`, and the replica it runs on."""

    def __init__(self, call, first: pb.GenerateResponse, replica: Replica) -> None:
        self.call = call
        self.first = first
        self.replica = replica
        self._open = True

    async def read(self):
        return await self.call.read()

    def close(self) -> None:
        """Cancel the call if it is still running (aborting its generation) and release the replica."""
        self.call.cancel()
        if self._open:
            self._open = False
            self.replica.inflight -= 1


class Backend:
    def __init__(self, target: str, token: str | None = None, policy: str = "prefix", load_factor: float = 1.25) -> None:
        self.target = target
        self._specs = parse_targets(target)
        self._auth = (("authorization", f"Bearer {token}"),) if token else ()
        self.router = Router(policy, load_factor)
        self._info: pb.GetModelInfoResponse | None = None
        self._learning: asyncio.Task | None = None
        self._info_at = 0.0
        self._resolver: asyncio.Task | None = None
        self._serving = asyncio.Event()
        # Called with the replica whenever it turns healthy or unhealthy (a metrics hook).
        self.on_health_change = lambda replica: None
        # Called with a replica's target once it is gone (pods come and go: per-replica labels must go with them).
        self.on_removed = lambda target: None

    async def open(self) -> None:
        await self._refresh()
        if any(spec.dns for spec in self._specs):
            self._resolver = asyncio.create_task(self._resolve_forever())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._serving.wait(), FIRST_HEALTH_WAIT_S)

    async def close(self, grace: float | None = None) -> None:
        if self._resolver is not None:
            self._resolver.cancel()
        for target in list(self.router.replicas):
            replica = self.router.remove(target)
            await replica.handle.close(grace)

    def _changed(self, replica: Replica) -> None:
        log.info("replica %s is %s", replica.target, "serving" if replica.healthy else "not serving")
        if replica.healthy:
            self._serving.set()
            if self._info is None and self._learning is None:
                # Learn the served model as soon as one replica serves (its context window bounds request bodies).
                self._learning = asyncio.get_running_loop().create_task(self._learn_model())
        self.on_health_change(replica)

    async def _learn_model(self) -> None:
        try:
            await self.model_info()
        except Exception:  # best effort: the next call that needs it asks again
            log.debug("could not fetch the model info yet", exc_info=True)
        finally:
            self._learning = None

    async def _refresh(self) -> None:
        targets = await resolve(self._specs)
        for target in targets - self.router.replicas.keys():
            replica = Replica(target)
            replica.handle = _Connection(replica, self._changed)
            self.router.add(replica)
            self.on_health_change(replica)
            log.info("replica %s added", target)
        for target in self.router.replicas.keys() - targets:
            replica = self.router.remove(target)
            self.on_health_change(replica)
            self.on_removed(target)
            log.info("replica %s removed", target)
            # In-flight streams keep the channel until they end; it closes gracefully.
            asyncio.create_task(replica.handle.close(grace=60))

    async def _resolve_forever(self) -> None:
        while True:
            await asyncio.sleep(RESOLVE_EVERY_S)
            try:
                await self._refresh()
            except Exception:  # a failed refresh keeps the replicas we had
                log.exception("refreshing the backend replicas failed")

    def metadata(self, request_id: str) -> tuple[tuple[str, str], ...]:
        return (("x-request-id", request_id), *self._auth)

    def healthy(self) -> bool:
        return bool(self.router.healthy())

    async def generate(self, message: pb.GenerateRequest, key: str | None, metadata, timeout: float) -> Stream:
        """Start a Generate call on a replica chosen for `key` and read its first message, trying other
        replicas while the call has not started. Raises AioRpcError or NoReplica."""
        tried: list[Replica] = []
        while True:
            replica = self.router.pick(key, exclude=tried)
            if replica is None:
                raise NoReplica()
            replica.inflight += 1
            call = replica.handle.stub.Generate(message, metadata=metadata, timeout=timeout)
            try:
                first = await call.read()
            except grpc.aio.AioRpcError as e:
                replica.inflight -= 1
                if e.code() in RETRYABLE and len(tried) + 1 < len(self.router.replicas):
                    log.warning("replica %s answered %s before starting; trying another", replica.target, e.code().name)
                    tried.append(replica)
                    continue
                raise
            except BaseException:
                replica.inflight -= 1
                call.cancel()
                raise
            return Stream(call, first, replica)

    async def count_tokens(self, request: pb.GenerateRequest) -> pb.CountTokensResponse:
        """The prompt tokens of a request's input, as the service renders and tokenizes it."""
        replica = self.router.pick(None)
        if replica is None:
            raise NoReplica()
        return await replica.handle.stub.CountTokens(
            pb.CountTokensRequest(model=request.model, input=request.input), metadata=self._auth, timeout=HEALTH_TIMEOUT_S * 10
        )

    def known_model_info(self) -> pb.GetModelInfoResponse | None:
        """The served model as last fetched, without asking (None before the first answer)."""
        return self._info

    async def model_info(self) -> pb.GetModelInfoResponse:
        """The served model, cached for a while; raises AioRpcError or NoReplica when no replica answers."""
        now = time.monotonic()
        if self._info is None or now - self._info_at > INFO_TTL_S:
            replica = self.router.pick(None)
            if replica is None:
                raise NoReplica()
            self._info = await replica.handle.stub.GetModelInfo(
                pb.GetModelInfoRequest(), metadata=self._auth, timeout=HEALTH_TIMEOUT_S
            )
            self._info_at = now
        return self._info

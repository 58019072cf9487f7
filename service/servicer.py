"""The gRPC servicer: protobuf in, domain request through the pipeline, domain outputs back out as protobuf.

The error boundary is closed: a ServiceError becomes its status (service/errors.py); anything else raised below
becomes INTERNAL with a fixed message, counted as outcome="error", with the traceback in the log only. Until the
engine has started (and once it stops) every call is UNAVAILABLE, which callers retry.

Cancellation is not polled: when the caller cancels or its deadline passes, grpc cancels this task, the
`aclosing` block closes the pipeline's stream, and the pipeline aborts the request in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from dataclasses import dataclass

import grpc

from common.logs import request_id_var, valid_request_id
from generate.v1 import generate_pb2 as pb
from generate.v1 import generate_pb2_grpc as pb_grpc
from service import domain, wire
from service.admission import Admission
from service.errors import EngineFailure, ModelNotFound, ServiceError, Unauthenticated, Unavailable, to_status
from service.metrics import ServiceMetrics
from service.pipeline import Pipeline

log = logging.getLogger("service.requests")

_OUTCOMES = {
    grpc.StatusCode.INVALID_ARGUMENT: "invalid_argument",
    grpc.StatusCode.NOT_FOUND: "not_found",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "overloaded",
    grpc.StatusCode.UNAVAILABLE: "unavailable",
    grpc.StatusCode.UNAUTHENTICATED: "unauthenticated",
    grpc.StatusCode.INTERNAL: "error",
}


@dataclass(frozen=True)
class Pacing:
    """How often a stream sends under load: at most every `interval_s` once `min_streams` are in flight.

    While a stream waits, the engine keeps generating and its outputs merge into the next message (engines merge
    what a slow reader has not taken), so fewer, fuller messages cross gRPC and SSE: their cost follows messages,
    not tokens. Below `min_streams` every output goes out at once, for the lowest latency."""

    interval_s: float = 0.0
    min_streams: int = 0

    def pause(self, inflight: int) -> float:
        return self.interval_s if self.interval_s > 0 and inflight >= self.min_streams else 0.0


class GenerateServicer(pb_grpc.GenerateServicer):
    def __init__(
        self,
        engine: Pipeline,
        admission: Admission,
        metrics: ServiceMetrics,
        auth_token: str | None = None,
        pacing: Pacing = Pacing(),
    ) -> None:
        self._engine = engine
        self._admission = admission
        self._metrics = metrics
        self._auth = f"Bearer {auth_token}".encode() if auth_token else None
        self._pacing = pacing

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        # A direct gRPC caller's id goes into every log line of the call: checked as the gateway checks its header.
        request_id = valid_request_id(request.request_id or _metadata(context, "x-request-id"))
        request_id_var.set(request_id)
        started = time.perf_counter()
        outcome = "ok"
        ttft: float | None = None
        usage: domain.Usage | None = None
        streamed = 0  # tokens sent so far: what a call that ends early has made the engine generate
        try:
            self._check_auth(context)
            self._check_ready()
            self._check_model(request.model)
            generate_request = wire.request_from_proto(request, request_id)
            async with self._admission.admit() as waited:
                self._metrics.queue_time.observe(waited)
                last = started
                async with contextlib.aclosing(self._engine.generate(generate_request)) as outputs:
                    async for output in outputs:
                        now = time.perf_counter()
                        tokens = sum(len(c.token_ids) for c in output.choices)
                        streamed += tokens
                        if tokens:
                            if ttft is None:
                                ttft = now - started
                                self._metrics.ttft.observe(ttft)
                            else:
                                # Once per message (its tokens' mean gap): per token would cost more than the rest.
                                self._metrics.itl.observe((now - last) / tokens)
                            last = now
                        if output.usage is not None:
                            usage = output.usage
                        yield wire.output_to_proto(output)
                        if usage is None and (pause := self._pacing.pause(self._admission.inflight)):
                            await asyncio.sleep(pause)
        except ServiceError as e:
            outcome = _OUTCOMES.get(e.code, "error")
            if e.code is grpc.StatusCode.INTERNAL:
                self._metrics.aborted.labels("engine_error").inc()
            await context.abort_with_status(to_status(e))
        except asyncio.CancelledError:
            outcome = "cancelled"
            self._metrics.aborted.labels("deadline" if _deadline_passed(context) else "cancelled").inc()
            raise
        except Exception:
            # A bug below the boundary: the caller gets a fixed message, the log gets the traceback.
            outcome = "error"
            self._metrics.aborted.labels("engine_error").inc()
            log.exception("generate failed unexpectedly")
            await context.abort_with_status(to_status(INTERNAL_ERROR))
        finally:
            duration = time.perf_counter() - started
            self._metrics.requests.labels(outcome).inc()
            self._metrics.e2e.observe(duration)
            if usage is not None:
                self._metrics.observe_usage(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)
            else:
                # Cancelled or failed: the tokens made before the end still count as generated.
                self._metrics.generation_tokens.inc(streamed)
            log.info(
                "generate %s",
                outcome,
                extra={
                    "fields": {
                        "prompt_tokens": usage.prompt_tokens if usage else None,
                        "completion_tokens": usage.completion_tokens if usage else streamed,
                        "cached_tokens": usage.cached_tokens if usage else None,
                        "ttft_ms": round(ttft * 1000, 1) if ttft is not None else None,
                        "duration_ms": round(duration * 1000, 1),
                    }
                },
            )

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext):
        async with _boundary(context, "GetModelInfo"):
            self._check_auth(context)
            self._check_ready()
            return wire.model_info_to_proto(self._engine.info)

    async def CountTokens(self, request: pb.CountTokensRequest, context: grpc.aio.ServicerContext):
        async with _boundary(context, "CountTokens"):
            self._check_auth(context)
            self._check_ready()
            self._check_model(request.model)
            count = await self._engine.count_tokens(wire.input_from_proto(request.input))
            return pb.CountTokensResponse(prompt_tokens=count, context_length=self._engine.info.context_length)

    def _check_ready(self) -> None:
        if not self._engine.ready:
            raise Unavailable("the engine is not serving yet (starting) or any more (stopping); retry shortly")

    def _check_model(self, model: str) -> None:
        served = self._engine.info.name
        if model and model != served:
            raise ModelNotFound(f"the model {model!r} is not served here; this service serves {served!r}")

    def _check_auth(self, context: grpc.aio.ServicerContext) -> None:
        if self._auth is None:
            return
        presented = (_metadata(context, "authorization") or "").encode()
        if not hmac.compare_digest(presented, self._auth):
            raise Unauthenticated("a valid service token is required in the authorization metadata")


# What a caller sees for a failure the service did not foresee; the details are in the service's log.
INTERNAL_ERROR = EngineFailure("the generation service failed on this request; it has been logged")


@contextlib.asynccontextmanager
async def _boundary(context: grpc.aio.ServicerContext, method: str):
    """The error boundary of a unary call: ServiceErrors as their status, anything else as INTERNAL_ERROR."""
    try:
        yield
    except ServiceError as e:
        await context.abort_with_status(to_status(e))
    except Exception:
        log.exception("%s failed unexpectedly", method)
        await context.abort_with_status(to_status(INTERNAL_ERROR))


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode()
    return None


# The client's deadline runs from when it sent the call, ours from when the call arrived, so a client that gives up
# at its deadline cancels the call slightly before ours passes (by the network and scheduling delay): a
# cancellation this close to our deadline is the deadline.
_DEADLINE_SLACK_S = 0.2


def _deadline_passed(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= _DEADLINE_SLACK_S

"""Builds and runs the gRPC server: Generate, the standard health service, reflection and /metrics.

Lifecycle: bind the port and answer health as NOT_SERVING, load the engine, turn SERVING. On SIGTERM/SIGINT:
NOT_SERVING at once (Kubernetes and the gateway stop routing here), refuse new calls, give in-flight
generations `shutdown_grace_s` to finish, cancel what is left, stop the engine. If the engine dies, turn
NOT_SERVING, fail what is in flight and exit non-zero so a supervisor restarts the process.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from prometheus_client import start_http_server

from generate.v1 import generate_pb2, generate_pb2_grpc
from service.admission import Admission
from service.config import ServiceConfig
from service.engines import Backend, create_engine
from service.metrics import ServiceMetrics
from service.pipeline import Pipeline
from service.servicer import GenerateServicer, Pacing

log = logging.getLogger(__name__)

SERVICE_NAME = generate_pb2.DESCRIPTOR.services_by_name["Generate"].full_name
# A prompt of a full 128K-token context as ids is ~0.7 MB; leave room for long chat histories.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
ENGINE_WATCH_INTERVAL_S = 1.0


class ExitCode(enum.IntEnum):
    OK = 0  # stopped by a signal after draining
    STARTUP_FAILED = 1  # the engine could not be loaded or the port could not be bound
    ENGINE_DIED = 3  # the engine failed while serving; restart the process


def build_pipeline(config: ServiceConfig, backend: Backend | None = None) -> Pipeline:
    """The request pipeline over the configured engine: what the servicer serves (and what the benchmark's
    in-process target drives without the transport)."""
    return Pipeline(
        backend or create_engine(config),
        config.tool_parser,
        config.reasoning_parser,
        dict(config.chat_template_kwargs),
        config.max_reasoning_tokens,
    )


async def serve(config: ServiceConfig, backend: Backend | None = None) -> ExitCode:
    metrics = ServiceMetrics()
    engine = build_pipeline(config, backend)
    admission = Admission(config.max_inflight, config.max_queue, metrics)
    health_servicer = health.aio.HealthServicer()

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
            # The gateway pings every 10 s to notice a vanished replica; allow it (the default bans pings more
            # often than every 5 minutes on idle connections and answers with GOAWAY).
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
            ("grpc.http2.max_ping_strikes", 0),
        ]
    )
    generate_pb2_grpc.add_GenerateServicer_to_server(
        GenerateServicer(
            engine, admission, metrics, config.auth_token,
            Pacing(config.stream_interval_ms / 1000, config.coalesce_min_streams),
        ),
        server,
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    _enable_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    try:
        port = server.add_insecure_port(f"{config.host}:{config.port}")
    except RuntimeError:
        log.error(
            "cannot listen for gRPC on %s:%d: another process may hold the port; choose another with --port "
            "(CHATSERVE_GRPC_PORT; make run GRPC_PORT=...)", config.host, config.port,
        )
        return ExitCode.STARTUP_FAILED
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    log.info("gRPC listening on %s:%d (health NOT_SERVING until the engine is ready)", config.host, port)
    if config.port_file:
        Path(config.port_file).write_text(str(port))
    if config.metrics_port is not None:
        try:
            http_server, _ = start_http_server(config.metrics_port, addr=config.metrics_host, registry=metrics.registry)
        except OSError as e:
            # Checked before the model loads, so a second copy fails in a second, with one line.
            log.error(
                "cannot serve metrics on %s:%d (%s): another process may hold the port; choose another with "
                "--metrics-port (CHATSERVE_METRICS_PORT; make run METRICS_PORT=...), or -1 for none",
                config.metrics_host, config.metrics_port, e.strerror or e,
            )
            await server.stop(0)
            return ExitCode.STARTUP_FAILED
        log.info("metrics on http://%s:%d/metrics", config.metrics_host, http_server.server_port)
        if config.metrics_port_file:
            Path(config.metrics_port_file).write_text(str(http_server.server_port))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    try:
        await engine.start()
    except Exception:
        log.exception("the engine failed to start")
        await server.stop(0)
        return ExitCode.STARTUP_FAILED
    info = engine.info
    metrics.engine_info.info(
        {
            "engine": info.engine,
            "model": info.name,
            "context_length": str(info.context_length),
            "max_output_tokens": str(info.max_output_tokens),
        }
    )
    metrics.bind_engine(lambda: _stats(engine), engine.is_alive, engine.leftovers)
    for collector in engine.metrics_collectors():
        metrics.registry.register(collector)
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %s with the %s engine (context %d tokens)", info.name, info.engine, info.context_length)

    if config.enable_fault_injection:
        loop.add_signal_handler(signal.SIGUSR1, engine.inject_fault)
        log.warning("fault injection is enabled: SIGUSR1 crashes the engine")
    watch = asyncio.create_task(_watch_engine(engine, stop))
    await stop.wait()
    engine_died = not engine.is_alive()
    watch.cancel()

    await health_servicer.enter_graceful_shutdown()
    admission.close()
    if engine_died:
        log.error("the engine stopped working: failing in-flight calls and exiting")
        await server.stop(0)
        await engine.stop()
        return ExitCode.ENGINE_DIED
    log.info(
        "shutting down: %d generations in flight get up to %.0f s to finish",
        admission.inflight,
        config.shutdown_grace_s,
    )
    # grpc refuses new calls at once and cancels the calls still running when the grace period ends;
    # a cancelled call aborts its generation in the engine.
    await server.stop(config.shutdown_grace_s)
    await engine.stop()
    log.info("stopped")
    return ExitCode.OK


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _enable_reflection(services: tuple[str, ...], server: grpc.aio.Server) -> None:
    """Server reflection as `grpc.reflection.v1` (what current grpcurl and Postman ask for first) and `v1alpha`.

    grpcio-reflection ships only v1alpha; v1 is the same service with the same messages under another package name
    (the two protos are wire-identical), so the same servicer answers both."""
    servicer = reflection.aio.ReflectionServicer((*services, REFLECTION_V1))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": handler}),)
    )


async def _set_health(servicer: health.aio.HealthServicer, status: int) -> None:
    await servicer.set("", status)
    await servicer.set(SERVICE_NAME, status)


async def _watch_engine(engine: Pipeline, stop: asyncio.Event) -> None:
    while engine.is_alive():
        await asyncio.sleep(ENGINE_WATCH_INTERVAL_S)
    stop.set()


def _stats(engine: Pipeline) -> tuple[int, int]:
    try:
        s = engine.stats()
    except Exception:  # a scrape must not fail because the engine is mid-shutdown
        return (0, 0)
    return (s.running, s.waiting)

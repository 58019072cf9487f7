"""The gateway application: `create_app(config)` wires routes, the front-door middleware (request id, auth,
CORS, errors, metrics, access log) and the gRPC channel's lifetime."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from common.logs import request_id_var, valid_request_id
from gateway import anthropic
from gateway.auth import KeyStore
from gateway.backend import Backend
from gateway.config import GatewayConfig
from gateway.errors import ApiError, MethodNotAllowed, NotFound, PayloadTooLarge, Upstream
from gateway.metrics import GatewayMetrics
from gateway.routes import add_routes
from gateway.limits import KeyLimits, KeyRateLimited, RateLimiter
from gateway.state import BACKEND, CONFIG, KEYS, LIMITER, METRICS, RESPONSES, UNKNOWN_FIELDS
from gateway.store import SQLiteResponseStore

log = logging.getLogger("gateway.access")

KEYS_POLL_S = 2.0
# Routes anyone may call; everything else needs an API key.
_OPEN_ROUTES = {"livez", "openapi", "playground", "playground_asset"}
# Routes that count against a key's rate limits.
_LIMITED_ROUTES = {"chat", "completions", "messages", "responses"}
CORS_ALLOW_HEADERS = (
    "Authorization, Content-Type, X-Request-Id, OpenAI-Organization, OpenAI-Project, x-api-key, anthropic-version, "
    "anthropic-beta"
)


def create_app(config: GatewayConfig, metrics: GatewayMetrics | None = None) -> web.Application:
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[_front_door])
    app[CONFIG] = config
    app[METRICS] = metrics or GatewayMetrics()
    app[KEYS] = KeyStore(config.api_keys, config.api_keys_file, KeyLimits(config.rpm_per_key, config.tpm_per_key))
    app[LIMITER] = RateLimiter()
    app[BACKEND] = Backend(config.backend, config.backend_token, config.routing, config.routing_load_factor)
    app[UNKNOWN_FIELDS] = set()
    add_routes(app)
    app.router.add_get("/metrics", _metrics, name="metrics")
    app.on_response_prepare.append(_add_headers)
    app.cleanup_ctx.append(_backend_channel)
    app.cleanup_ctx.append(_watch_keys_file)
    app[RESPONSES] = _open_responses_store(config)
    app.cleanup_ctx.append(_close_responses_store)
    return app


def _open_responses_store(config: GatewayConfig) -> SQLiteResponseStore:
    path = config.responses_store if config.responses_store == ":memory:" else os.path.expanduser(config.responses_store)
    max_age_s = config.responses_max_age_days * 86400
    try:
        return SQLiteResponseStore(path, max_age_s, config.responses_max_count)
    except (OSError, sqlite3.Error) as e:
        log.warning("cannot open the responses store %s (%s): stored responses are kept in memory only", path, e)
        return SQLiteResponseStore(":memory:", max_age_s, config.responses_max_count)


async def _close_responses_store(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[RESPONSES].close()


async def _backend_channel(app: web.Application) -> AsyncIterator[None]:
    backend, metrics = app[BACKEND], app[METRICS]

    def count(_replica=None) -> None:
        healthy = len(backend.router.healthy())
        metrics.replicas.labels("serving").set(healthy)
        metrics.replicas.labels("not_serving").set(len(backend.router.replicas) - healthy)

    backend.on_health_change = count
    backend.on_removed = metrics.forget_replica
    await backend.open()
    count()
    yield
    await backend.close(grace=1.0)


async def _watch_keys_file(app: web.Application) -> AsyncIterator[None]:
    keys = app[KEYS]

    async def poll() -> None:
        while True:
            await asyncio.sleep(KEYS_POLL_S)
            keys.reload_if_changed()

    task = asyncio.create_task(poll()) if app[CONFIG].api_keys_file else None
    yield
    if task is not None:
        task.cancel()


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _needs_key(route: str | None, config: GatewayConfig) -> bool:
    if route in _OPEN_ROUTES:
        return False
    if route == "health":
        return not config.open_health
    if route == "metrics":
        return not config.open_metrics
    return True


def _cors_origin(request: web.Request, config: GatewayConfig) -> str | None:
    origin = request.headers.get("Origin")
    if not origin or not config.cors_origins:
        return None
    if "*" in config.cors_origins:
        return "*"
    return origin if origin in config.cors_origins else None


async def _add_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["X-Request-Id"] = request.get("request_id", "-")
    response.headers.update(request.get("ratelimit_headers", {}))
    origin = _cors_origin(request, request.app[CONFIG])
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = "X-Request-Id, Retry-After"
        if origin != "*":
            response.headers["Vary"] = "Origin"


# Routes of Anthropic's Messages API: their errors take Anthropic's shape.
_ANTHROPIC_ROUTES = {"messages", "count_tokens"}


def _credentials(request: web.Request) -> str | None:
    """`Authorization: Bearer <key>`, or Anthropic's `x-api-key: <key>` (what the anthropic SDK sends)."""
    header = request.headers.get("Authorization")
    if header is None and (key := request.headers.get("x-api-key")):
        return f"Bearer {key}"
    return header


def error_response(error: ApiError, route: str | None = None) -> web.Response:
    body = anthropic.error_body(error) if route in _ANTHROPIC_ROUTES else error.body_bytes()
    return web.Response(status=error.status, body=body, content_type="application/json", headers=error.headers())


@web.middleware
async def _front_door(request: web.Request, handler) -> web.StreamResponse:
    request_id = valid_request_id(request.headers.get("X-Request-Id"))
    if request.app[KEYS].is_key(request_id):
        # A client that put its key in its request id: that id would reach every log line and the response headers.
        request_id = valid_request_id(None)
    request["request_id"] = request_id
    request_id_var.set(request_id)
    app = request.app
    config, metrics = app[CONFIG], app[METRICS]
    route = request.match_info.route.name
    started = time.perf_counter()
    status = 500
    try:
        if request.method == "OPTIONS" and _cors_origin(request, config) is not None:
            status = 204
            return web.Response(
                status=204,
                headers={
                    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                    "Access-Control-Allow-Headers": CORS_ALLOW_HEADERS,
                    "Access-Control-Max-Age": "600",
                },
            )
        if _needs_key(route, config) and app[KEYS].enabled:
            try:
                caller = app[KEYS].authenticate(_credentials(request))
            except ApiError:
                metrics.auth_failures.inc()
                raise
            request["caller"] = caller
            request["key_label"] = caller.label
            if route in _LIMITED_ROUTES:
                try:
                    request["ratelimit_headers"] = app[LIMITER].admit(caller.label, caller.limits)
                except KeyRateLimited as e:
                    metrics.rate_limited.labels(caller.label, e.limit).inc()
                    raise
        response = await handler(request)
        status = response.status
        return response
    except ApiError as e:
        status = e.status
        request["error"] = e
        return error_response(e, route)
    except web.HTTPException as e:
        error = _from_http_exception(e, request)
        status = error.status
        request["error"] = error
        return error_response(error, route)
    except asyncio.CancelledError:
        status = 499  # the client closed the connection
        raise
    except Exception:
        log.exception("unhandled error")
        status = 500
        return error_response(
            Upstream(500, "the server had an error while processing your request", code="internal_error"), route
        )
    finally:
        duration = time.perf_counter() - started
        route_label = route or "unmatched"
        key = request.get("key_label", "-")
        metrics.requests.labels(route_label, str(status), key).inc()
        metrics.latency.labels(route_label).observe(duration)
        usage = request.get("usage")
        error = request.get("error")
        log.info(
            "%s %s %d",
            request.method,
            request.path,
            status,
            extra={
                "fields": {
                    # Why a request was refused: the error's code and the field at fault (never its message,
                    # which may quote what the client sent).
                    **({"error": error.code or error.type, "param": error.param} if error is not None else {}),
                    "duration_ms": round(duration * 1000, 1),
                    "ttfb_ms": round(request["ttfb"] * 1000, 1) if "ttfb" in request else None,
                    "key": key,
                    "prompt_tokens": usage.prompt_tokens if usage else None,
                    "completion_tokens": usage.completion_tokens if usage else None,
                    "cached_tokens": usage.cached_tokens if usage else None,
                }
            },
        )


def _from_http_exception(e: web.HTTPException, request: web.Request) -> ApiError:
    if isinstance(e, web.HTTPNotFound):
        return NotFound(f"Invalid URL ({request.method} {request.path})")
    if isinstance(e, web.HTTPMethodNotAllowed):
        return MethodNotAllowed(f"Method {request.method} is not allowed on {request.path}")
    if isinstance(e, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge(f"the request body is larger than this server's limit of {request.app[CONFIG].max_body_bytes} bytes")
    error = ApiError(e.reason or "request failed", should_retry=False)
    error.status = e.status
    error.type = "invalid_request_error" if e.status < 500 else "server_error"
    return error

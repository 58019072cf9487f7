"""Typed keys for what the gateway application holds."""

from __future__ import annotations

from aiohttp import web

from gateway.auth import KeyStore
from gateway.backend import Backend
from gateway.config import GatewayConfig
from gateway.limits import RateLimiter
from gateway.metrics import GatewayMetrics
from gateway.store import SQLiteResponseStore

CONFIG = web.AppKey("config", GatewayConfig)
BACKEND = web.AppKey("backend", Backend)
KEYS = web.AppKey("keys", KeyStore)
METRICS = web.AppKey("metrics", GatewayMetrics)
LIMITER = web.AppKey("limiter", RateLimiter)
# The Responses API's stored responses.
RESPONSES = web.AppKey("responses", SQLiteResponseStore)
# Names of unknown request fields already logged, so each is logged once.
UNKNOWN_FIELDS = web.AppKey("unknown_fields", set)

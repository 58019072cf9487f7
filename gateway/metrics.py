"""The gateway's Prometheus metrics, defined once. Keys appear only as labels derived from a hash."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        self.requests = Counter(
            "chatserve_gateway_requests", "HTTP requests by route, status code and API key label.",
            ["route", "status", "key"], registry=r,
        )
        self.latency = Histogram(
            "chatserve_gateway_request_duration_seconds", "From request to the last byte of the response.",
            ["route"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.ttfb = Histogram(
            "chatserve_gateway_time_to_first_byte_seconds", "From request to the first byte of a stream.",
            ["route"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.open_streams = Gauge("chatserve_gateway_open_streams", "SSE streams being written.", registry=r)
        self.grpc_errors = Counter(
            "chatserve_gateway_grpc_errors", "Failed calls to the generation service by gRPC status code.",
            ["code"], registry=r,
        )
        self.auth_failures = Counter("chatserve_gateway_auth_failures", "Requests refused for a missing or wrong key.", registry=r)
        self.rate_limited = Counter(
            "chatserve_gateway_rate_limited", "Requests refused by a per-key limit.", ["key", "limit"], registry=r
        )
        self.routed = Counter(
            "chatserve_gateway_routed", "Generate calls started, by service replica.", ["replica"], registry=r
        )
        self.replicas = Gauge(
            "chatserve_gateway_backend_replicas", "Service replicas known to the gateway, by health.", ["state"], registry=r
        )
        self.completion_tokens = Counter(
            "chatserve_gateway_completion_tokens", "Completion tokens delivered, by API key label.", ["key"], registry=r
        )
        self.prompt_tokens = Counter(
            "chatserve_gateway_prompt_tokens", "Prompt tokens processed, by API key label.", ["key"], registry=r
        )
        self.cached_tokens = Counter(
            "chatserve_gateway_cached_prompt_tokens", "Prompt tokens served from a replica's prefix cache, by API key label.",
            ["key"], registry=r,
        )

    def forget_replica(self, target: str) -> None:
        """Drop a replica's series once it is gone, so pod churn cannot grow the label set without bound."""
        with contextlib.suppress(KeyError):
            self.routed.remove(target)

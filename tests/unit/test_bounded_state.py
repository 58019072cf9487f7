"""State keyed by client input or by infrastructure churn stays bounded: unknown request fields (logged once each,
quoted), and per-replica metric series once a replica is gone."""

from __future__ import annotations

import logging

from aiohttp import web
from prometheus_client import generate_latest

from gateway.backend import Backend
from gateway.metrics import GatewayMetrics
from gateway.protocol import ChatCompletionRequest
from gateway.routes import MAX_UNKNOWN_FIELDS_LOGGED, parse
from gateway.state import UNKNOWN_FIELDS


def test_unknown_fields_are_remembered_up_to_a_bound_and_logged_quoted(caplog):
    app = web.Application()
    app[UNKNOWN_FIELDS] = set()
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with caplog.at_level(logging.WARNING):
        for i in range(3 * MAX_UNKNOWN_FIELDS_LOGGED):
            parse(ChatCompletionRequest, {**base, f"field_{i}_" + "x" * 100: 1}, app)
        parse(ChatCompletionRequest, {**base, "evil\nERROR forged": 1}, app)
    assert len(app[UNKNOWN_FIELDS]) == MAX_UNKNOWN_FIELDS_LOGGED
    assert all(len(f) <= 64 for f in app[UNKNOWN_FIELDS])
    assert "\nERROR forged" not in caplog.text


class _NoConnection:
    """Stands in for a replica's gRPC channel and health watch: this test is about the replica set, not the wire."""

    def __init__(self, replica, changed) -> None:
        pass

    async def close(self, grace=None) -> None:
        pass


async def test_a_removed_replica_takes_its_metric_series_with_it(monkeypatch):
    monkeypatch.setattr("gateway.backend._Connection", _NoConnection)
    metrics = GatewayMetrics()
    backend = Backend("127.0.0.1:1,127.0.0.1:2")
    backend.on_removed = metrics.forget_replica
    await backend._refresh()
    for target in backend.router.replicas:
        metrics.routed.labels(target).inc()
    backend._specs = backend._specs[:1]  # as if DNS now listed one pod
    await backend._refresh()
    text = generate_latest(metrics.registry).decode()
    assert 'replica="127.0.0.1:1"' in text and 'replica="127.0.0.1:2"' not in text
    await backend.close(0)

"""Metric definitions: names follow Prometheus conventions, and SGLang's families are re-exported by prefix."""

from prometheus_client import CollectorRegistry, Counter, generate_latest

from gateway.metrics import GatewayMetrics
from service.engines.sglang_compat import PrefixCollector
from service.metrics import ServiceMetrics


def test_names_carry_units_and_totals():
    for registry in (ServiceMetrics().registry, GatewayMetrics().registry):
        for family in registry.collect():
            if family.type == "counter":
                assert family.name.startswith(("chatserve_", "process_")), family.name
            if family.type == "histogram":
                assert family.name.endswith("_seconds"), family.name


def test_prefix_collector_reexports_only_sglang_families():
    source = CollectorRegistry()
    Counter("sglang:cached_tokens", "cached", registry=source).inc(7)
    Counter("unrelated", "other", registry=source).inc()
    ours = ServiceMetrics().registry
    ours.register(PrefixCollector(source, "sglang:"))
    text = generate_latest(ours).decode()
    assert "sglang:cached_tokens_total 7.0" in text and "unrelated" not in text

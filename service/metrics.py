"""The service's Prometheus metrics, defined once. Names follow Prometheus conventions (unit suffixes, _total).

SGLang's own server exports close equivalents under `sglang:` names (for example
`sglang:time_to_first_token_seconds`, `sglang:cached_tokens_total`); the README lists the pairs.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client.core import GaugeMetricFamily

# Buckets wide enough for a small model on a CPU (seconds per token) and a GPU (milliseconds).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # process_resident_memory_bytes, process_cpu_seconds_total, ...: what a soak run watches for drift.
        ProcessCollector(registry=r)
        self.requests = Counter(
            "chatserve_requests", "Generate calls by outcome.", ["outcome"], registry=r
        )
        self.inflight = Gauge("chatserve_requests_inflight", "Generate calls admitted and running.", registry=r)
        self.queued = Gauge("chatserve_requests_queued", "Generate calls waiting for admission.", registry=r)
        self.ttft = Histogram(
            "chatserve_time_to_first_token_seconds", "From call start to the first generated text.", buckets=TTFT_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "chatserve_inter_token_latency_seconds", "Between consecutive tokens of a choice.", buckets=ITL_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "chatserve_e2e_request_latency_seconds", "From call start to the last message.", buckets=E2E_BUCKETS, registry=r
        )
        self.queue_time = Histogram(
            "chatserve_queue_time_seconds", "Time a call waited for admission.", buckets=QUEUE_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("chatserve_prompt_tokens", "Prompt tokens of finished calls.", registry=r)
        self.generation_tokens = Counter("chatserve_generation_tokens", "Tokens generated.", registry=r)
        self.cached_tokens = Counter(
            "chatserve_cached_prompt_tokens", "Prompt tokens served from the prefix cache.", registry=r
        )
        self.aborted = Counter("chatserve_aborted_requests", "Generations aborted before they finished.", ["reason"], registry=r)
        self.engine_info = Info("chatserve_engine", "The engine and model being served.", registry=r)
        self.engine_alive = Gauge("chatserve_engine_alive", "1 while the engine can generate, else 0.", registry=r)
        self.running = Gauge("chatserve_engine_running_sequences", "Sequences the engine is generating.", registry=r)
        self.waiting = Gauge("chatserve_engine_waiting_sequences", "Sequences queued inside the engine.", registry=r)
        self.cache_hit_ratio = Gauge(
            "chatserve_prefix_cache_hit_ratio",
            "Cached prompt tokens over all prompt tokens since start (use rate() of the counters for a window).",
            registry=r,
        )

    def observe_usage(self, prompt: int, completion: int, cached: int) -> None:
        self.prompt_tokens.inc(prompt)
        self.generation_tokens.inc(completion)
        self.cached_tokens.inc(cached)

    def bind_engine(
        self,
        stats: Callable[[], tuple[int, int]],
        alive: Callable[[], bool],
        request_state: Callable[[], dict[str, int]] = dict,
    ) -> None:
        """Gauges read from the engine at scrape time."""
        self.registry.register(_RequestState(request_state))
        self.running.set_function(lambda: stats()[0])
        self.waiting.set_function(lambda: stats()[1])
        self.engine_alive.set_function(lambda: 1.0 if alive() else 0.0)

        def ratio() -> float:
            prompt = self.prompt_tokens._value.get()
            return self.cached_tokens._value.get() / prompt if prompt else 0.0

        self.cache_hit_ratio.set_function(ratio)


class _RequestState:
    """`chatserve_engine_request_state{kind}`: the per-request objects the pipeline and the engine hold, by kind
    (open requests, result handlers, sampling plans, outputs stranded after a cancel, SGLang's request states).
    Under load they follow the requests in flight; when idle every one is 0, and anything left is a leak."""

    def __init__(self, read: Callable[[], dict[str, int]]) -> None:
        self._read = read

    def collect(self):
        family = GaugeMetricFamily(
            "chatserve_engine_request_state",
            "Per-request objects held by the pipeline and the engine, by kind; all 0 when idle.",
            labels=["kind"],
        )
        try:
            state = self._read()
        except Exception:  # a scrape must not fail because the engine is mid-shutdown
            state = {}
        for kind, count in sorted(state.items()):
            family.add_metric([kind], count)
        yield family

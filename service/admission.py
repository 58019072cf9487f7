"""Admission control: at most `max_inflight` generations run, at most `max_queue` more wait; the rest are
refused at once with RESOURCE_EXHAUSTED instead of queueing without bound."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from service.errors import Overloaded, Unavailable
from service.metrics import ServiceMetrics


class Admission:
    def __init__(self, max_inflight: int, max_queue: int, metrics: ServiceMetrics) -> None:
        self._slots = asyncio.Semaphore(max_inflight)
        self._max_queue = max_queue
        self._waiting = 0
        self._inflight = 0
        self._closed = False
        self._metrics = metrics

    @property
    def inflight(self) -> int:
        return self._inflight

    def close(self) -> None:
        """Refuse every new generation from now on (draining before shutdown)."""
        self._closed = True

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[float]:
        """Hold a generation slot for the body; yields the seconds spent waiting for it."""
        if self._closed:
            raise Unavailable("the service is shutting down")
        if self._slots.locked() and self._waiting >= self._max_queue:
            raise Overloaded("the service is at capacity; retry shortly")
        started = time.perf_counter()
        self._waiting += 1
        self._metrics.queued.inc()
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
            self._metrics.queued.dec()
        self._inflight += 1
        self._metrics.inflight.inc()
        try:
            yield time.perf_counter() - started
        finally:
            self._inflight -= 1
            self._metrics.inflight.dec()
            self._slots.release()

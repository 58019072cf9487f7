"""Per-key rate limits: requests per minute and tokens per minute, as token buckets that refill continuously.

A request takes one request token when it is admitted. Tokens (prompt + completion) are charged when the usage
is known, after the response; a key whose token bucket is empty is refused until it refills. Limits come from
the gateway's defaults or from the key's line in the keys file (`sk-... rpm=60 tpm=100000`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from gateway.errors import RateLimited


@dataclass(frozen=True, slots=True)
class KeyLimits:
    rpm: int = 0  # 0: unlimited
    tpm: int = 0


class KeyRateLimited(RateLimited):
    """A key went over one of its limits ("requests" or "tokens")."""

    def __init__(self, limit: str, per_minute: int, retry_after: float) -> None:
        super().__init__(
            f"Rate limit reached for {limit} per minute (limit {per_minute}). Retry after the time given in Retry-After.",
            code="rate_limit_exceeded", retry_after=retry_after, should_retry=True,
        )
        self.limit = limit


class _Bucket:
    __slots__ = ("capacity", "level", "rate", "updated")

    def __init__(self, per_minute: int, now: float) -> None:
        self.capacity = float(per_minute)
        self.level = float(per_minute)
        self.rate = per_minute / 60.0
        self.updated = now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_for(self, amount: float) -> float:
        """Seconds until the bucket holds `amount`."""
        return max(0.0, (amount - self.level) / self.rate)


class RateLimiter:
    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._requests: dict[str, _Bucket] = {}
        self._tokens: dict[str, _Bucket] = {}

    def _bucket(self, table: dict[str, _Bucket], key: str, per_minute: int, now: float) -> _Bucket:
        bucket = table.get(key)
        if bucket is None or bucket.capacity != per_minute:
            bucket = table[key] = _Bucket(per_minute, now)
        bucket.refill(now)
        return bucket

    def admit(self, key: str, limits: KeyLimits) -> dict[str, str]:
        """Take one request; raise KeyRateLimited if the key is over a limit. Returns x-ratelimit-* headers."""
        now = self._clock()
        headers: dict[str, str] = {}
        if limits.tpm:
            tokens = self._bucket(self._tokens, key, limits.tpm, now)
            if tokens.level <= 0:
                raise KeyRateLimited("tokens", limits.tpm, tokens.wait_for(1.0))
            headers["x-ratelimit-limit-tokens"] = str(limits.tpm)
            headers["x-ratelimit-remaining-tokens"] = str(int(tokens.level))
        if limits.rpm:
            requests = self._bucket(self._requests, key, limits.rpm, now)
            if requests.level < 1:
                raise KeyRateLimited("requests", limits.rpm, requests.wait_for(1.0))
            requests.level -= 1
            headers["x-ratelimit-limit-requests"] = str(limits.rpm)
            headers["x-ratelimit-remaining-requests"] = str(int(requests.level))
        return headers

    def charge(self, key: str, limits: KeyLimits, tokens: int) -> None:
        if limits.tpm:
            bucket = self._bucket(self._tokens, key, limits.tpm, self._clock())
            bucket.level -= tokens

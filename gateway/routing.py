"""Which service replica takes a request.

The gateway keeps one channel per replica and watches each through the standard gRPC health service, so a replica
that fails or starts draining (NOT_SERVING) stops getting requests within a second. Replicas come from a list of
targets and/or `dns:///host:port` names, re-resolved every few seconds (a Kubernetes headless Service lists every
ready pod).

Policies:
- `prefix` (default): consistent hashing of the conversation's leading content, so every turn of a conversation
  and every request with the same system prompt reaches the replica that already holds that prefix in its KV
  cache (RadixAttention on SGLang). Bounded loads: a replica already carrying more than `load_factor` times the
  average in-flight load is passed over for the next one on the ring, so one hot prefix cannot swamp a replica.
- `round_robin` and `least_loaded` (fewest requests this gateway has in flight there).
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import itertools
import logging
import math
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

POLICIES = ("prefix", "round_robin", "least_loaded")
VIRTUAL_NODES = 64
# How much of a conversation's start identifies it (its system prompt and first user turn, at most this long).
PREFIX_CHARS = 4096
TEXT_PREFIX_CHARS = 1024


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


@dataclass(eq=False)
class Replica:
    """One service instance as the router sees it. The transport (channel, stubs) hangs off `handle`."""

    target: str
    handle: object = None
    healthy: bool = False
    inflight: int = 0
    ring_points: list[int] = field(default_factory=list)


class Router:
    def __init__(self, policy: str = "prefix", load_factor: float = 1.25) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; use one of {', '.join(POLICIES)}")
        self.policy = policy
        self.load_factor = load_factor
        self.replicas: dict[str, Replica] = {}
        self._ring: list[tuple[int, Replica]] = []
        self._ring_keys: list[int] = []
        self._round_robin = itertools.count()

    # ------------------------------------------------------------------------------ membership

    def add(self, replica: Replica) -> None:
        self.replicas[replica.target] = replica
        self._rebuild()

    def remove(self, target: str) -> Replica | None:
        replica = self.replicas.pop(target, None)
        self._rebuild()
        return replica

    def _rebuild(self) -> None:
        # The ring holds every known replica, healthy or not: a replica that blinks keeps its arcs, so the
        # conversations mapped to it come back to it (and to its cache) when it recovers.
        ring = []
        for replica in self.replicas.values():
            for i in range(VIRTUAL_NODES):
                ring.append((_hash(f"{replica.target}#{i}"), replica))
        ring.sort(key=lambda point: point[0])
        self._ring = ring
        self._ring_keys = [point for point, _ in ring]

    def healthy(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.healthy]

    # ------------------------------------------------------------------------------ choice

    def pick(self, key: str | None, exclude: Iterable[Replica] = ()) -> Replica | None:
        """The replica for a request whose routing key is `key`; None when no healthy replica is left."""
        excluded = set(exclude)
        candidates = [r for r in self.replicas.values() if r.healthy and r not in excluded]
        if not candidates:
            return None
        if self.policy == "round_robin":
            return candidates[next(self._round_robin) % len(candidates)]
        if self.policy == "least_loaded" or key is None:
            return self._least_loaded(candidates)
        return self._by_prefix(key, candidates)

    @staticmethod
    def _least_loaded(candidates: list[Replica]) -> Replica:
        return min(candidates, key=lambda r: r.inflight)

    def _by_prefix(self, key: str, candidates: list[Replica]) -> Replica:
        allowed = set(candidates)
        total = sum(r.inflight for r in candidates) + 1
        cap = math.ceil(self.load_factor * total / len(candidates))
        start = bisect.bisect(self._ring_keys, _hash(key))
        for offset in range(len(self._ring)):
            replica = self._ring[(start + offset) % len(self._ring)][1]
            if replica in allowed and replica.inflight + 1 <= cap:
                return replica
        return self._least_loaded(candidates)


def chat_routing_key(messages: Iterable[tuple[str, str]]) -> str:
    """A conversation's identity for prefix routing: its system prompt(s) and first user turn, which every later
    turn of the same conversation repeats. The newest turns are left out, or each turn would route elsewhere."""
    parts = []
    for role, text in messages:
        parts.append(text)
        if role != "system":
            break
    return "\x1e".join(parts)[:PREFIX_CHARS]


def text_routing_key(prompt: str) -> str:
    """A raw prompt's identity: its opening, which prompts built on the same template share."""
    return prompt[:TEXT_PREFIX_CHARS]


# ---------------------------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class TargetSpec:
    """One entry of --backend: a fixed `host:port`, or `dns:///host:port` standing for every address it resolves to."""

    host: str
    port: int
    dns: bool

    @classmethod
    def parse(cls, text: str) -> TargetSpec:
        text = text.strip()
        dns = text.startswith("dns:")
        if dns:
            text = text.removeprefix("dns:").lstrip("/")
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"backend target {text!r} needs a port (host:port or dns:///host:port)")
        return cls(host.strip("[]"), int(port), dns)


def parse_targets(value: str) -> list[TargetSpec]:
    specs = [TargetSpec.parse(part) for part in value.split(",") if part.strip()]
    if not specs:
        raise ValueError("at least one backend target is needed")
    return specs


async def resolve(specs: list[TargetSpec], lookup: Callable | None = None) -> set[str]:
    """The `ip:port` (or `host:port`) targets the specs stand for right now. A name that fails to resolve
    contributes nothing this round (its replicas drop out until it resolves again)."""
    loop = asyncio.get_running_loop()
    lookup = lookup or loop.getaddrinfo
    targets: set[str] = set()
    for spec in specs:
        if not spec.dns:
            targets.add(f"{spec.host}:{spec.port}")
            continue
        try:
            infos = await lookup(spec.host, spec.port, type=socket.SOCK_STREAM)
        except OSError as e:
            log.warning("cannot resolve %s: %s", spec.host, e)
            continue
        for family, _, _, _, address in infos:
            host = address[0]
            targets.add(f"[{host}]:{spec.port}" if family == socket.AF_INET6 else f"{host}:{spec.port}")
    return targets

"""Replica choice: prefix affinity with bounded loads, round robin, least loaded, and target discovery."""

import socket
from collections import Counter

import pytest

from gateway.routing import Replica, Router, TargetSpec, chat_routing_key, parse_targets, resolve, text_routing_key


def routing_key(texts: list[str]) -> str:
    return chat_routing_key([("system", texts[0]), *(("user", t) for t in texts[1:])])


def router(policy: str, n: int = 3, load_factor: float = 1.25) -> Router:
    r = Router(policy, load_factor)
    for i in range(n):
        r.add(Replica(f"10.0.0.{i}:50051", healthy=True))
    return r


def test_prefix_routing_is_sticky_and_spreads_conversations():
    r = router("prefix")
    keys = [routing_key([f"system prompt {i}", "first question"]) for i in range(300)]
    first = [r.pick(k) for k in keys]
    assert [r.pick(k) for k in keys] == first  # the same conversation always lands on the same replica
    spread = Counter(p.target for p in first)
    assert len(spread) == 3 and min(spread.values()) > 50  # virtual nodes keep the arcs balanced


def test_bounded_load_moves_a_hot_prefix_to_the_next_replica():
    r = router("prefix", load_factor=1.25)
    key = routing_key(["the one hot system prompt"])
    home = r.pick(key)
    home.inflight = 10  # far above 1.25 x the average
    other = r.pick(key)
    assert other is not home
    home.inflight = 0
    assert r.pick(key) is home


def test_unhealthy_and_excluded_replicas_are_skipped():
    r = router("prefix")
    key = routing_key(["conversation"])
    home = r.pick(key)
    home.healthy = False
    assert r.pick(key) not in (home, None)
    home.healthy = True
    assert r.pick(key, exclude=[home]) is not home
    for replica in r.replicas.values():
        replica.healthy = False
    assert r.pick(key) is None


def test_round_robin_and_least_loaded():
    r = router("round_robin")
    assert Counter(r.pick("k").target for _ in range(9)) == Counter({t: 3 for t in r.replicas})
    r = router("least_loaded")
    loads = iter([5, 0, 2])
    for replica in r.replicas.values():
        replica.inflight = next(loads)
    assert r.pick("k").target == "10.0.0.1:50051"


def test_routing_key_is_stable_across_the_turns_of_a_conversation():
    opening = [("system", "be brief"), ("user", "first question")]
    later = opening + [("assistant", "an answer"), ("user", "a follow-up")]
    assert chat_routing_key(opening) == chat_routing_key(later)
    assert chat_routing_key([("system", "be brief"), ("user", "another opening")]) != chat_routing_key(opening)
    assert len(chat_routing_key([("system", "s" * 9000), ("user", "q")])) == 4096
    assert text_routing_key("t" * 2000 + "tail one") == text_routing_key("t" * 2000 + "tail two")


def test_target_parsing():
    assert parse_targets("a:1, dns:///svc.ns.svc.cluster.local:50051") == [
        TargetSpec("a", 1, False), TargetSpec("svc.ns.svc.cluster.local", 50051, True)]
    assert parse_targets("[::1]:5") == [TargetSpec("::1", 5, False)]
    with pytest.raises(ValueError):
        parse_targets("no-port")


async def test_dns_targets_resolve_to_every_address():
    async def lookup(host, port, type):
        assert host == "svc" and port == 50051
        return [(socket.AF_INET, type, 6, "", ("10.1.0.7", port)), (socket.AF_INET6, type, 6, "", ("fd00::9", port, 0, 0))]

    targets = await resolve(parse_targets("dns:///svc:50051,static:7"), lookup)
    assert targets == {"10.1.0.7:50051", "[fd00::9]:50051", "static:7"}

    async def failing(host, port, type):
        raise socket.gaierror("no such name")

    assert await resolve(parse_targets("dns:///svc:50051"), failing) == set()

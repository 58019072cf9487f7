"""One gateway in front of three real service replicas on localhost: prefix-aware routing keeps each conversation
on the replica that caches it, and a replica killed mid-run loses no request that had not started streaming."""

from __future__ import annotations

import signal
import threading
import time

import openai
import pytest

from tests.helpers.procs import Proc, spawn, start_gateway, wait_for_file, wait_serving, wait_until

KEY = "sk-replicas-" + "r" * 20
TURNS = ["What is your return policy?", "And for opened items?", "How long does a refund take?", "Thanks, anything else?"]


def start_replicas(tmp, count: int) -> list[tuple[Proc, str]]:
    """Start `count` services at once (they load the model in parallel) and wait until all are SERVING."""
    procs = []
    for i in range(count):
        port_file = tmp / f"replica-{i}.port"
        procs.append((spawn(["-m", "service", "--port", "0", "--port-file", str(port_file), "--metrics-port", "-1"],
                            tmp / f"replica-{i}.log"), port_file))
    replicas = []
    for proc, port_file in procs:
        target = f"127.0.0.1:{wait_for_file(port_file, proc)}"
        wait_serving(target, proc)
        replicas.append((proc, target))
    return replicas


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replicas")
    started = start_replicas(tmp, 3)
    yield tmp, started
    for proc, _ in started:
        proc.stop()


def system_prompt(tag: str) -> str:
    return (f"You are the assistant of shop {tag}. " + "Our shop sells books, games and puzzles to families. " * 30)


def conversation_cached_tokens(base: str, tags: list[str]) -> tuple[int, int]:
    """Run every conversation turn by turn; return (cached prompt tokens, prompt tokens) over all requests."""
    client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    model = client.models.list().data[0].id
    cached = prompt = 0
    histories = {tag: [{"role": "system", "content": system_prompt(tag)}] for tag in tags}
    for turn in TURNS:
        for tag in tags:  # interleaved, as many users would be
            history = histories[tag]
            history.append({"role": "user", "content": turn})
            reply = client.chat.completions.create(model=model, messages=history, max_tokens=4, temperature=0)
            history.append({"role": "assistant", "content": reply.choices[0].message.content})
            cached += reply.usage.prompt_tokens_details.cached_tokens
            prompt += reply.usage.prompt_tokens
    return cached, prompt


def test_prefix_routing_reuses_caches_round_robin_does_not(replicas):
    tmp, started = replicas
    backends = ",".join(target for _, target in started)
    results = {}
    for policy in ("round_robin", "prefix"):
        gateway, base = start_gateway(tmp, backends, "--routing", policy, keys=KEY, name=f"gateway-{policy}")
        try:
            # Different shops per policy, so the second run cannot profit from the first one's caches.
            # Five conversations on three replicas: round robin cannot line them up with replicas by accident.
            results[policy] = conversation_cached_tokens(base, [f"{policy}-{i}" for i in range(5)])
        finally:
            gateway.stop()
    (rr_cached, rr_prompt), (prefix_cached, prefix_prompt) = results["round_robin"], results["prefix"]
    assert rr_prompt == prefix_prompt or abs(rr_prompt - prefix_prompt) < 0.05 * rr_prompt
    # With prefix routing every turn after the first finds its conversation cached: about 3/4 of all prompt tokens.
    assert prefix_cached > 0.6 * prefix_prompt, results
    assert prefix_cached > 2 * rr_cached, results


def test_killing_a_replica_loses_no_request_that_had_not_started(replicas, tmp_path):
    tmp, started = replicas
    backends = ",".join(target for _, target in started)
    # Round robin makes sure the victim holds requests when it dies (failover is the same for every policy).
    gateway, base = start_gateway(tmp_path, backends, "--routing", "round_robin", keys=KEY)
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        outcomes: list[str] = []
        lock = threading.Lock()

        def one(i: int) -> None:
            try:
                stream = client.chat.completions.create(
                    model=model, messages=[{"role": "system", "content": f"You are assistant number {i}."},
                                           {"role": "user", "content": "Tell me about your puzzles."}],
                    max_tokens=16, stream=True)
            except openai.APIError as e:
                outcome = f"failed before streaming: {e}"
            else:
                try:
                    chunks = list(stream)
                    outcome = "ok" if chunks[-1].choices[0].finish_reason else "incomplete"
                except openai.APIError:
                    outcome = "failed mid-stream"
            with lock:
                outcomes.append(outcome)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
        for i, thread in enumerate(threads):
            thread.start()
            if i == 6:
                victim, _ = started[0]
                victim.stop(signal.SIGKILL)  # mid-run, with requests queued and streaming on it
            time.sleep(0.1)
        for thread in threads:
            thread.join(180)
        assert len(outcomes) == 16
        assert not [o for o in outcomes if o.startswith("failed before")], outcomes
        assert "incomplete" not in outcomes
        assert outcomes.count("ok") >= 10, outcomes
        # The kill did hit requests: some were retried elsewhere before they started, or failed cleanly mid-stream.
        assert gateway.log().count("trying another") + outcomes.count("failed mid-stream") >= 1
        wait_until(lambda: _replicas_metric(base) == (2.0, 1.0), 10, 0.2, "the dead replica taken out")
    finally:
        gateway.stop()


def _replicas_metric(base: str) -> tuple[float, float]:
    from tests.helpers.procs import scrape

    m = scrape(base + "/metrics")
    return (m['chatserve_gateway_backend_replicas{state="serving"}'],
            m['chatserve_gateway_backend_replicas{state="not_serving"}'])

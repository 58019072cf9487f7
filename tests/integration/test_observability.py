"""Metrics and logs of both processes after real requests through the real stack: counters and histograms move by
exactly what the client saw, and a client's request id tags the log lines of that request on both sides."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from gateway.auth import key_label
from tests.helpers.procs import scrape, start_gateway, start_service, wait_until

KEY = "sk-observe-" + "o" * 20
SYSTEM = "You are a meticulous librarian who answers questions about book classification. " * 12


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("observability")
    service = start_service(tmp, "--log-json")
    gateway, base = start_gateway(tmp, service.target, "--log-json", keys=KEY)
    yield service, gateway, base
    gateway.stop()
    service.proc.stop()


def delta(before: dict, after: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def test_service_and_gateway_counters_match_the_usage_clients_saw(observed):
    service, _, base = observed
    client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    model = client.models.list().data[0].id
    svc0, gw0 = service.metrics(), scrape(base + "/metrics")

    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Where do atlases go?"}]
    first = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0)
    messages[-1]["content"] = "Where do dictionaries go?"
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    second = list(stream)[-1].usage
    assert second.prompt_tokens_details.cached_tokens > 0

    svc1, gw1 = service.metrics(), scrape(base + "/metrics")
    usages = [first.usage, second]
    assert delta(svc0, svc1, "chatserve_prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert delta(svc0, svc1, "chatserve_generation_tokens_total") == sum(u.completion_tokens for u in usages)
    assert delta(svc0, svc1, "chatserve_cached_prompt_tokens_total") == sum(
        u.prompt_tokens_details.cached_tokens for u in usages)
    assert delta(svc0, svc1, 'chatserve_requests_total{outcome="ok"}') == 2
    for histogram in ("chatserve_time_to_first_token_seconds_count", "chatserve_e2e_request_latency_seconds_count",
                      "chatserve_queue_time_seconds_count"):
        assert delta(svc0, svc1, histogram) == 2, histogram
    assert delta(svc0, svc1, "chatserve_inter_token_latency_seconds_count") > 0
    assert 0 < svc1["chatserve_prefix_cache_hit_ratio"] < 1
    assert svc1['chatserve_engine_info{context_length="8192",engine="transformers",max_output_tokens="8192",model="SmolLM2-135M-Instruct"}'] == 1
    assert svc1["process_resident_memory_bytes"] > 0

    label = key_label(KEY)
    assert delta(gw0, gw1, f'chatserve_gateway_requests_total{{key="{label}",route="chat",status="200"}}') == 2
    assert delta(gw0, gw1, f'chatserve_gateway_completion_tokens_total{{key="{label}"}}') == sum(
        u.completion_tokens for u in usages)
    assert delta(gw0, gw1, f'chatserve_gateway_prompt_tokens_total{{key="{label}"}}') == sum(
        u.prompt_tokens for u in usages)
    assert delta(gw0, gw1, 'chatserve_gateway_time_to_first_byte_seconds_count{route="chat"}') == 1
    assert gw1["chatserve_gateway_open_streams"] == 0
    assert KEY not in json.dumps(gw1)


def test_errors_auth_failures_and_aborts_are_counted(observed):
    service, _, base = observed
    model = openai.OpenAI(base_url=base + "/v1", api_key=KEY).models.list().data[0].id
    svc0, gw0 = service.metrics(), scrape(base + "/metrics")
    with httpx.Client(base_url=base, timeout=60) as http:
        assert http.get("/v1/models", headers={"Authorization": "Bearer sk-wrong-000000000000"}).status_code == 401
        unknown = http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                            json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
        assert unknown.status_code == 404
        with http.stream("POST", "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                         json={"model": model, "messages": [{"role": "user", "content": "Tell a long tale."}],
                               "max_tokens": 400, "stream": True}) as response:
            next(response.iter_bytes())  # the stream is under way; leaving the block hangs up
    wait_until(lambda: delta(svc0, service.metrics(), 'chatserve_aborted_requests_total{reason="cancelled"}') == 1,
               10, 0.1, "abort counted")
    svc1, gw1 = service.metrics(), scrape(base + "/metrics")
    assert delta(gw0, gw1, "chatserve_gateway_auth_failures_total") == 1
    assert delta(gw0, gw1, 'chatserve_gateway_grpc_errors_total{code="NOT_FOUND"}') == 1
    assert delta(svc0, svc1, 'chatserve_requests_total{outcome="not_found"}') == 1
    assert delta(svc0, svc1, 'chatserve_requests_total{outcome="cancelled"}') == 1
    assert svc1["chatserve_requests_inflight"] == 0


def test_request_id_tags_both_logs_as_json(observed):
    service, gateway, base = observed
    client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    model = client.models.list().data[0].id
    client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
        extra_headers={"X-Request-Id": "trace-obs-42"},
    )

    def lines(proc) -> list[dict]:
        return [json.loads(line) for line in proc.log().splitlines() if line.startswith("{")]

    wait_until(lambda: any(e["request_id"] == "trace-obs-42" for e in lines(service.proc)), 5, 0.1, "service log")
    service_line = next(e for e in lines(service.proc) if e["request_id"] == "trace-obs-42")
    assert service_line["message"] == "generate ok"
    assert service_line["completion_tokens"] == 3 and service_line["ttft_ms"] > 0 and service_line["prompt_tokens"] > 0
    gateway_line = next(e for e in lines(gateway) if e["request_id"] == "trace-obs-42")
    assert gateway_line["message"] == "POST /v1/chat/completions 200" and gateway_line["completion_tokens"] == 3
    assert gateway_line["key"] == key_label(KEY)
    assert KEY not in service.proc.log() + gateway.log()

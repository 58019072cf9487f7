"""Cancellation and shutdown on each engine, through the whole stack: a client that hangs up aborts its
generation inside the engine, and SIGTERM lets streams in flight finish before the processes exit."""

from __future__ import annotations

import signal
import time

import grpc
import httpx
import openai
import pytest

from generate.v1 import generate_pb2 as pb
from generate.v1 import generate_pb2_grpc
from tests.helpers.engines import ENGINES
from tests.helpers.procs import start_gateway, start_service, wait_until

STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]
KEY = "sk-lifecycle-" + "l" * 20


def engine_idle(metrics: dict[str, float]) -> bool:
    """Nothing in flight in the service, and (SGLang) nothing running or queued in SGLang's own scheduler."""
    ours = (
        metrics["chatserve_requests_inflight"] == 0
        and metrics["chatserve_engine_running_sequences"] == 0
        and metrics["chatserve_engine_waiting_sequences"] == 0
    )
    theirs = [v for k, v in metrics.items() if k.startswith(("sglang:num_running_reqs", "sglang:num_queue_reqs"))]
    return ours and not any(theirs)


def test_a_client_that_hangs_up_aborts_its_generation(stack, model):
    before = stack.metrics()
    cancelled = 'chatserve_aborted_requests_total{reason="cancelled"}'
    body = {"model": model, "messages": STORY, "max_tokens": 400, "stream": True, "temperature": 0.7}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", stack.base_url + "/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {stack.api_key}"}) as response:
            assert response.status_code == 200
            next(response.iter_lines())  # the stream is under way; leaving the block hangs up
    wait_until(lambda: stack.metrics().get(cancelled, 0) == before.get(cancelled, 0) + 1, 30, 0.1, "abort counted")
    # 400 tokens take 15-30 s on these engines here: idle within 8 s means the engine stopped when the client left.
    wait_until(lambda: engine_idle(stack.metrics()), 8, 0.1, "engine idle after the hang-up")
    made = stack.metrics()["chatserve_generation_tokens_total"] - before["chatserve_generation_tokens_total"]
    assert 0 < made < 200, made


def test_a_grpc_deadline_aborts_the_generation(stack):
    before = stack.metrics().get('chatserve_aborted_requests_total{reason="deadline"}', 0)
    with grpc.insecure_channel(stack.grpc_target) as channel:
        stub = generate_pb2_grpc.GenerateStub(channel)
        request = pb.GenerateRequest(input=pb.Input(text="Once upon a time"), sampling=pb.SamplingParams(max_tokens=500))
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(request, timeout=1.5))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: engine_idle(stack.metrics()), 8, 0.1, "engine idle after the deadline")
    assert stack.metrics()['chatserve_aborted_requests_total{reason="deadline"}'] == before + 1


@pytest.mark.parametrize("engine", ENGINES)
def test_sigterm_drains_streams_and_refuses_new_calls(tmp_path, engine):
    service = start_service(tmp_path, engine=engine, timeout=600)
    gateway, base = start_gateway(tmp_path, service.target, keys=KEY)
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        streams = [
            client.chat.completions.create(
                model=model, messages=STORY, max_tokens=24, stream=True, temperature=0, extra_body={"min_tokens": 24}
            )
            for _ in range(3)
        ]
        firsts = [next(s) for s in streams]  # every stream is under way
        assert all(f.choices[0].delta.role == "assistant" for f in firsts)
        service.proc.process.send_signal(signal.SIGTERM)
        # A call sent before the service has taken the signal is a call like any other; from then on (it logs
        # that it is shutting down) new calls are refused.
        wait_until(lambda: "shutting down" in service.proc.log(), 10, 0.05, "the service took SIGTERM")
        with grpc.insecure_channel(service.target) as channel:
            stub = generate_pb2_grpc.GenerateStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.Generate(pb.GenerateRequest(input=pb.Input(text="hi")), timeout=5))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        started = time.monotonic()
        finishes = [list(stream)[-1].choices[0].finish_reason for stream in streams]
        assert finishes == ["length"] * 3
        assert service.proc.process.wait(60) == 0, service.proc.tail()
        assert time.monotonic() - started < 60
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model=model, messages=STORY, max_tokens=2)
        assert caught.value.status_code == 503
    finally:
        gateway.stop()
        service.proc.stop()

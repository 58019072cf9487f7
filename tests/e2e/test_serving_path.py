"""The whole serving path on the real model: openai SDK / curl → gateway → gRPC → transformers engine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from generate.v1 import generate_pb2 as pb

SEED = Path(__file__).parent / "seed"
LONG_SYSTEM = (
    "You are the support assistant of a company that sells solar panels, batteries and inverters. "
    "Answer politely and briefly. Always mention the warranty terms when a customer asks about defects: "
    "panels carry a 25-year performance warranty, batteries ten years and inverters five years. "
) * 6


def chat(content: str, system: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": content}]


def test_models_list_names_the_served_model(client, model):
    models = client.models.list()
    assert [m.id for m in models.data] == [model]
    assert models.data[0].object == "model"
    assert client.models.retrieve(model).id == model


def test_chat_non_streaming(client, model):
    reply = client.chat.completions.create(
        model=model, messages=chat("What is the capital of France?"), max_tokens=24, temperature=0
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 0
    assert 0 < reply.usage.completion_tokens <= 24
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_stream_and_non_stream_agree_at_temperature_zero(client, model):
    messages = chat("Name three colours of the rainbow.")
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=40, temperature=0)
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=40, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_wrong_key_is_an_authentication_error(stack, model):
    bad = openai.OpenAI(base_url=stack.base_url, api_key="sk-wrong-key-0000000000", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.chat.completions.create(model=model, messages=chat("hi"), max_tokens=2)
    assert caught.value.status_code == 401
    assert "sk-wrong-key-0000000000" not in str(caught.value.body)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_shared_system_prompt_is_served_from_the_prefix_cache(client, model):
    first = client.chat.completions.create(
        model=model, messages=chat("Do batteries have a warranty?", LONG_SYSTEM), max_tokens=8, temperature=0
    )
    second = client.chat.completions.create(
        model=model, messages=chat("How long is the inverter warranty?", LONG_SYSTEM), max_tokens=8, temperature=0
    )
    assert first.usage.prompt_tokens > 200
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < second.usage.prompt_tokens


def test_grpc_stream_health_and_reflection(stack, grpc_stub, model):
    request = pb.GenerateRequest(
        input=pb.Input(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content=[pb.ContentPart(text="Say hello.")])])),
        sampling=pb.SamplingParams(max_tokens=12, temperature=0.0),
    )
    responses = list(grpc_stub.Generate(request, timeout=60))
    assert responses[-1].HasField("usage")
    deltas = [c for r in responses for c in r.choices]
    assert sum(len(c.token_ids) for c in deltas) <= responses[-1].usage.completion_tokens <= 12
    assert "".join(c.text for c in deltas).strip()
    assert [c.finish_reason for c in deltas if c.finish_reason] in ([pb.FINISH_REASON_STOP], [pb.FINISH_REASON_LENGTH])

    info = grpc_stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.model == model and info.context_length > 0
    counted = grpc_stub.CountTokens(pb.CountTokensRequest(input=request.input))
    assert counted.prompt_tokens == responses[-1].usage.prompt_tokens

    with grpc.insecure_channel(stack.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="generate.v1.Generate"))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in replies[0].list_services_response.service}
        assert {"generate.v1.Generate", "grpc.health.v1.Health"} <= names
        # grpc.reflection.v1, which current grpcurl asks for first: the same messages under another package.
        v1 = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        asked = reflection_pb2.ServerReflectionRequest(file_containing_symbol="generate.v1.Generate")
        (described,) = list(v1(iter([asked]), timeout=10))
        assert described.file_descriptor_response.file_descriptor_proto


def test_grpc_unknown_model_is_not_found(grpc_stub):
    request = pb.GenerateRequest(model="no-such-model", input=pb.Input(text="hi"))
    with pytest.raises(grpc.RpcError) as caught:
        list(grpc_stub.Generate(request, timeout=30))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_seed_curl_example_verbatim(stack, model):
    """The seed's curl command, `-X Post` and all; only its placeholders are filled in."""
    address = urlparse(stack.base_url).netloc
    script = (SEED / "curl.sh").read_text()
    script = script.replace("${ServerIP}:8000", address).replace("${ApiKey}", stack.api_key).replace("${ModelName}", model)
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"]["content"].strip()
    assert reply["usage"]["completion_tokens"] > 0


def test_seed_python_example_verbatim(stack, model):
    """The seed's Python program: models list, then a streamed chat with text parts and max_completion_tokens."""
    program = (SEED / "client.py").read_text()
    program = program.replace("${ApiKey}", stack.api_key).replace("${ServerUrl}", stack.base_url)
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    first_line, _, answer = result.stdout.partition("\n")
    assert first_line == model
    # The last chunk's delta is empty, which the program prints as "None", exactly as with OpenAI's API.
    assert answer.endswith("None") and len(answer.removesuffix("None").strip()) > 0


def test_grpc_request_ids_are_checked_before_they_reach_the_log(stack, grpc_stub):
    """A direct gRPC caller's request_id goes into every log line of its call: one that could forge log lines is
    replaced, as the gateway replaces such an X-Request-Id header."""
    def generate(request_id: str) -> None:
        request = pb.GenerateRequest(request_id=request_id, input=pb.Input(text="Hi"),
                                     sampling=pb.SamplingParams(max_tokens=2, temperature=0.0))
        assert list(grpc_stub.Generate(request, timeout=60))[-1].HasField("usage")

    generate("trace-ok-7f3a")
    generate("evil\n2026-01-01 00:00:00,000 ERROR forged-line-9c1d [x] " + "y" * 200)
    if stack.launcher is None:
        return  # a stack started elsewhere: its log is not ours to read
    from tests.helpers.procs import wait_until

    wait_until(lambda: "trace-ok-7f3a" in stack.service_log(), 10, 0.1, "the valid id in the log")
    assert "forged-line-9c1d" not in stack.service_log()


def test_a_body_too_big_for_any_prompt_is_refused_before_it_is_read(stack, client, model):
    import time

    import httpx

    client.models.list()  # the gateway knows the model (it learns it as soon as a replica serves, too)
    body = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"a" * (3 * 2**20) + b'"}]}'
    started = time.perf_counter()
    reply = httpx.post(f"{stack.base_url}/chat/completions", content=body, timeout=60,
                       headers={"Authorization": f"Bearer {stack.api_key}", "Content-Type": "application/json"})
    assert reply.status_code == 413, reply.text
    assert "context window" in reply.json()["error"]["message"]
    assert time.perf_counter() - started < 5
    assert client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2).choices

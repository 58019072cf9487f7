"""Random GenerateRequests straight to the gRPC service (hypothesis, fixed seed, bounded examples): every call
ends OK or with a client-error status, never INTERNAL or UNKNOWN, and the service keeps serving.

Other services call the gRPC API directly, without the gateway's validation in front, so the service's own checks
are all there is. The real service with the real model, capped at 4 output tokens so valid requests end quickly.
"""

from __future__ import annotations

import math

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from generate.v1 import generate_pb2 as pb
from generate.v1 import generate_pb2_grpc
from tests.helpers.procs import start_service

CLIENT_ERRORS = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED,
}

text = st.text(max_size=40)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32) | st.sampled_from([0.0, 1.0, 2.0, -1.0])
u32 = st.integers(0, 2**32 - 1) | st.integers(0, 70000)

sampling = st.builds(
    pb.SamplingParams,
    max_tokens=st.none() | st.integers(0, 2**32 - 1) | st.integers(0, 8),
    min_tokens=st.none() | u32,
    temperature=st.none() | floats,
    top_p=st.none() | floats,
    top_k=st.none() | st.integers(-(2**31), 2**31 - 1),
    min_p=st.none() | floats,
    frequency_penalty=st.none() | floats,
    presence_penalty=st.none() | floats,
    repetition_penalty=st.none() | floats,
    stop=st.lists(text, max_size=3),
    stop_token_ids=st.lists(u32, max_size=3),
    ignore_eos=st.none() | st.booleans(),
    seed=st.none() | st.integers(0, 2**64 - 1),
    logit_bias=st.dictionaries(u32, floats, max_size=3),
    skip_special_tokens=st.none() | st.booleans(),
)
tool = st.builds(pb.Tool, name=text, description=text,
                 parameters=text | st.sampled_from(['{"type": "object"}', '{"type": "object", "properties": {"a": {"type": "integer"}}}', "[]", "{"]))
message = st.builds(
    pb.ChatMessage,
    role=st.sampled_from(["system", "user", "assistant", "tool", "developer", "", "robot"]),
    content=st.lists(st.builds(pb.ContentPart, text=text), max_size=2),
    name=text,
    tool_calls=st.lists(st.builds(pb.ToolCall, id=text, name=text, arguments=text | st.just("{}")), max_size=2),
    tool_call_id=text,
)
choice = st.builds(pb.ToolChoice, mode=st.sampled_from([0, 1, 2, 3])) | st.builds(pb.ToolChoice, function=text)
chat = st.builds(pb.Chat, messages=st.lists(message, max_size=4), tools=st.lists(tool, max_size=2),
                 tool_choice=choice, parallel_tool_calls=st.none() | st.booleans(),
                 add_generation_prompt=st.none() | st.booleans())
inputs = (st.builds(pb.Input, chat=chat) | st.builds(pb.Input, text=text)
          | st.builds(pb.Input, token_ids=st.builds(pb.TokenIds, ids=st.lists(u32, max_size=6))) | st.just(pb.Input()))
constraint = st.none() | st.builds(pb.Constraint, json_schema=text | st.just('{"type": "object"}')) \
    | st.builds(pb.Constraint, json_object=st.just(pb.JsonObject())) | st.builds(pb.Constraint, regex=text) \
    | st.builds(pb.Constraint, ebnf=text | st.just('root ::= "a"'))
requests = st.builds(
    pb.GenerateRequest,
    request_id=text,
    model=st.sampled_from(["", "fuzz-model", "other"]),
    input=inputs,
    sampling=sampling,
    n=st.integers(0, 20) | u32,
    logprobs=st.none() | st.builds(pb.LogprobOptions, top_logprobs=st.integers(0, 30)),
    constraint=constraint,
)


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    service = start_service(tmp_path_factory.mktemp("grpc-fuzz"), "--max-output-tokens", "4",
                            "--served-model-name", "fuzz-model")
    channel = grpc.insecure_channel(service.target)
    yield generate_pb2_grpc.GenerateStub(channel)
    channel.close()
    service.proc.stop()
    assert "Traceback" not in service.proc.log(), service.proc.log()[-3000:]


@given(request=requests)
@settings(max_examples=150, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
def test_random_requests_get_ok_or_a_client_error(stub, request):
    try:
        responses = list(stub.Generate(request, timeout=60))
    except grpc.RpcError as e:
        assert e.code() in CLIENT_ERRORS, (e.code(), e.details(), request)
        assert "Traceback" not in (e.details() or "") and "Exception" not in (e.details() or "")
        return
    assert responses and responses[-1].HasField("usage")
    assert all(math.isfinite(lp.logprob) or lp.logprob == -math.inf
               for r in responses for c in r.choices for lp in c.logprobs)


def test_the_service_still_serves_after_the_fuzzing(stub):
    request = pb.GenerateRequest(input=pb.Input(text="Hello"), sampling=pb.SamplingParams(max_tokens=2))
    assert list(stub.Generate(request, timeout=60))[-1].usage.completion_tokens > 0

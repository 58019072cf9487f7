"""The error tables at both boundaries: service errors → gRPC status → OpenAI error."""

import grpc
import pytest

from gateway.errors import from_grpc, is_client_facing
from google.rpc import status_pb2

from service.errors import EngineFailure, InvalidArgument, ModelNotFound, Overloaded, Unavailable, to_status


def roundtrip(error, alias=None):
    """Through the same trailing-metadata encoding a real call carries."""
    status = to_status(error)
    parsed = status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"])
    return from_grpc(status.code, status.details, parsed, alias, client_facing=is_client_facing(parsed))


def test_invalid_argument_names_the_openai_param():
    error = roundtrip(InvalidArgument("sampling.max_tokens", "too many"), {"max_tokens": "max_completion_tokens"})
    assert (error.status, error.param, error.type) == (400, "max_completion_tokens", "invalid_request_error")
    assert error.headers()["x-should-retry"] == "false"
    assert roundtrip(InvalidArgument("sampling.temperature", "x")).param == "temperature"
    assert roundtrip(InvalidArgument("input", "too long")).param == "messages"
    assert roundtrip(InvalidArgument("input.chat.messages[2].role", "bad role")).param == "messages[2].role"


def test_not_found_and_overload():
    error = roundtrip(ModelNotFound("nope"))
    assert (error.status, error.code, error.param) == (404, "model_not_found", "model")
    error = roundtrip(Overloaded("busy"))
    assert error.status == 429 and error.headers()["Retry-After"] == "1"


@pytest.mark.parametrize(
    "code, status",
    [
        (grpc.StatusCode.UNAVAILABLE, 503),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (grpc.StatusCode.INTERNAL, 500),
        (grpc.StatusCode.UNKNOWN, 500),
        (grpc.StatusCode.UNAUTHENTICATED, 502),
    ],
)
def test_server_side_codes(code, status):
    error = from_grpc(code, "secret internal detail /etc/passwd" if code is grpc.StatusCode.UNKNOWN else "m")
    assert error.status == status and error.type == "server_error"
    assert "passwd" not in error.message


@pytest.mark.parametrize(
    "field, param",
    [
        ("constraint.json_schema", "response_format.json_schema.schema"),
        ("constraint.json_object", "response_format"),
        ("constraint.regex", "regex"),
        ("constraint.ebnf", "ebnf"),
        ("input.chat.tools", "tools"),
        ("input.chat.tools[1].parameters", "tools[1].function.parameters"),
        ("input.chat.tools[0].name", "tools[0].function.name"),
        ("input.chat.tool_choice", "tool_choice"),
        ("input.chat.messages[2].tool_calls[0].arguments", "messages[2].tool_calls[0].function.arguments"),
        ("input.chat.messages[3].tool_call_id", "messages[3].tool_call_id"),
        ("sampling.ignore_eos", "ignore_eos"),
    ],
)
def test_structured_output_and_tool_fields_name_the_openai_param(field, param):
    assert roundtrip(InvalidArgument(field, "bad")).param == param


@pytest.mark.parametrize("code", list(grpc.StatusCode), ids=lambda c: c.name)
def test_every_status_code_has_an_http_answer_that_leaks_nothing_unmarked(code):
    """A status the service did not mark as client-facing (grpc's own, a proxy's) never passes its text on."""
    error = from_grpc(code, "Unexpected <class 'RuntimeError'>: token sk-secret at /srv/app.py", None)
    assert 400 <= error.status < 600 and error.status != 401
    assert "sk-secret" not in error.message and "RuntimeError" not in error.message and error.message
    body = error.body()["error"]
    assert body["message"] == error.message and body["type"] in ("invalid_request_error", "rate_limit_error", "server_error")


@pytest.mark.parametrize(
    "code, status, retry",
    [
        (grpc.StatusCode.CANCELLED, 503, "true"),  # a service shutting down cancels its calls: retried
        (grpc.StatusCode.UNAVAILABLE, 503, "true"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "true"),
        (grpc.StatusCode.UNIMPLEMENTED, 501, "false"),
        (grpc.StatusCode.PERMISSION_DENIED, 502, "false"),
        (grpc.StatusCode.UNAUTHENTICATED, 502, "false"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "false"),
        (grpc.StatusCode.INVALID_ARGUMENT, 400, "false"),
        (grpc.StatusCode.OUT_OF_RANGE, 400, "false"),
        (grpc.StatusCode.FAILED_PRECONDITION, 400, "false"),
        (grpc.StatusCode.NOT_FOUND, 404, "false"),
        (grpc.StatusCode.INTERNAL, 500, "true"),
        (grpc.StatusCode.DATA_LOSS, 500, "true"),
    ],
)
def test_status_code_table(code, status, retry):
    error = from_grpc(code, "m")
    assert error.status == status and error.headers().get("x-should-retry") == retry


def test_the_services_own_messages_pass_and_are_marked():
    assert roundtrip(EngineFailure("the engine failed while generating this request")).message == (
        "the engine failed while generating this request"
    )
    assert roundtrip(InvalidArgument("sampling.top_p", "top_p must be at most 1")).message == "top_p must be at most 1"
    unavailable = roundtrip(Unavailable("the engine is starting"))
    assert unavailable.status == 503 and unavailable.headers()["x-should-retry"] == "true"
    # The same text without the service's mark is replaced.
    assert from_grpc(grpc.StatusCode.INTERNAL, "the engine failed while generating this request").message == (
        "the generation service failed"
    )

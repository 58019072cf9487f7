"""The error tables at both boundaries: service errors → gRPC status → OpenAI error."""

import grpc
import pytest

from gateway.errors import from_grpc
from google.rpc import status_pb2

from service.errors import InvalidArgument, ModelNotFound, Overloaded, to_status


def roundtrip(error, alias=None):
    """Through the same trailing-metadata encoding a real call carries."""
    status = to_status(error)
    parsed = status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"])
    return from_grpc(status.code, status.details, parsed, alias)


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

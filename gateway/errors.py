"""Errors the gateway answers with, in OpenAI's shape, and the one table from gRPC statuses to them.

    ApiError                     an HTTP status plus {"error": {"message", "type", "param", "code"}}
    ├── BadRequest               400 invalid_request_error, naming the field in `param`
    ├── Unauthorized             401 invalid_api_key (the message shows a masked key only)
    ├── NotFound                 404 (model_not_found, unknown route)
    ├── PayloadTooLarge          413
    ├── RateLimited              429 with Retry-After (per-key limits, service at capacity)
    └── Upstream                 5xx: the service is unavailable, timed out or failed

`from_grpc` is the only place that decides what a gRPC status means for an HTTP client. Messages never
carry internals: the service already writes its statuses for callers, and anything else is replaced.
"""

from __future__ import annotations

import json
import re

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

# gRPC request fields (as the service names them) → the OpenAI parameter a client sent.
_PARAMS = {
    "n": "n",
    "input": "messages",
    "input.chat": "messages",
    "input.chat.messages": "messages",
    "input.text": "prompt",
    "input.token_ids": "prompt",
    "logprobs.top_logprobs": "top_logprobs",
    "constraint": "response_format",
    "constraint.json_schema": "response_format.json_schema.schema",
    "constraint.json_object": "response_format",
    "constraint.regex": "regex",
    "constraint.ebnf": "ebnf",
    "input.chat.tools": "tools",
    "input.chat.tool_choice": "tool_choice",
    "input.chat.parallel_tool_calls": "parallel_tool_calls",
}
# Fields inside a tool or a message's tool call sit under "function" in OpenAI's shape.
_FUNCTION_FIELD = re.compile(r"^(tools\[\d+\]|messages\[\d+\]\.tool_calls\[\d+\])\.(name|parameters|arguments|description)$")


class ApiError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        should_retry: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after
        # Whether the OpenAI SDK should retry; its default is to retry 408, 409, 429 and 5xx.
        self.should_retry = should_retry

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def body_bytes(self) -> bytes:
        return json.dumps(self.body(), ensure_ascii=False).encode()

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, round(self.retry_after)))
        if self.should_retry is not None:
            headers["x-should-retry"] = "true" if self.should_retry else "false"
        return headers


class BadRequest(ApiError):
    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message, param=param, code=code, should_retry=False)


class Unauthorized(ApiError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def __init__(self, message: str) -> None:
        super().__init__(message, should_retry=False)


class NotFound(ApiError):
    status = 404
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message, param=param, code=code, should_retry=False)


class MethodNotAllowed(ApiError):
    status = 405
    type = "invalid_request_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, should_retry=False)


class PayloadTooLarge(ApiError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"

    def __init__(self, message: str) -> None:
        super().__init__(message, should_retry=False)


class RateLimited(ApiError):
    status = 429
    type = "rate_limit_error"


class Upstream(ApiError):
    status = 503
    type = "server_error"

    def __init__(self, status: int, message: str, *, code: str, retry: bool = True, retry_after: float | None = None):
        super().__init__(message, code=code, should_retry=retry, retry_after=retry_after)
        self.status = status


def no_replica() -> Upstream:
    """Every replica of the service is down or draining: fail fast, the client may retry shortly."""
    return Upstream(503, "the generation service is unavailable; retry shortly", code="service_unavailable", retry_after=1.0)


def from_grpc(code: grpc.StatusCode, details: str | None, rich_status=None, param_alias: dict[str, str] | None = None) -> ApiError:
    """The OpenAI error for a failed gRPC call. `param_alias` renames a field to what this client sent
    (e.g. "max_completion_tokens" rather than "max_tokens")."""
    message = details or "the generation service failed"
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return BadRequest(message, param=_param(rich_status, param_alias or {}))
    if code is grpc.StatusCode.NOT_FOUND:
        return NotFound(message, param="model", code="model_not_found")
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return RateLimited(message, code="server_overloaded", retry_after=1.0, should_retry=True)
    if code is grpc.StatusCode.UNAVAILABLE:
        return Upstream(503, "the generation service is unavailable; retry shortly", code="service_unavailable", retry_after=1.0)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return Upstream(504, "the request timed out in the generation service", code="timeout", retry=False)
    if code is grpc.StatusCode.UNAUTHENTICATED:
        # The gateway's own service token is wrong: an operator problem, not the caller's.
        return Upstream(502, "the gateway is not authorized by the generation service", code="bad_gateway", retry=False)
    if code is grpc.StatusCode.INTERNAL:
        return Upstream(500, message, code="internal_error")
    return Upstream(500, "the generation service failed", code="internal_error")


def from_rpc_error(error: grpc.aio.AioRpcError, param_alias: dict[str, str] | None = None) -> ApiError:
    try:
        rich = rpc_status.from_call(error)
    except Exception:  # a malformed or foreign status: fall back to code and message
        rich = None
    return from_grpc(error.code(), error.details(), rich, param_alias)


def _param(rich_status, alias: dict[str, str]) -> str | None:
    if rich_status is None:
        return None
    for detail in rich_status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            for violation in bad.field_violations:
                field = violation.field
                if field.startswith("sampling."):
                    field = field.removeprefix("sampling.")
                    return alias.get(field, field)
                if field.startswith(("input.chat.messages[", "input.chat.tools[")):
                    openai = field.removeprefix("input.chat.")
                    return _FUNCTION_FIELD.sub(r"\1.function.\2", openai)
                return alias.get(field) or _PARAMS.get(field, field)
    return None

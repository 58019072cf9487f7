"""Errors the gateway answers with, in OpenAI's shape, and the one table from gRPC statuses to them.

    ApiError                     an HTTP status plus {"error": {"message", "type", "param", "code"}}
    ├── BadRequest               400 invalid_request_error, naming the field in `param`
    ├── Unauthorized             401 invalid_api_key (the message shows a masked key only)
    ├── NotFound                 404 (model_not_found, unknown route)
    ├── PayloadTooLarge          413
    ├── RateLimited              429 with Retry-After (per-key limits, service at capacity)
    └── Upstream                 5xx: the service is unavailable, timed out or failed

`from_grpc` is the only place that decides what a gRPC status means for an HTTP client: one table names every
status code. Messages never carry internals: the service's message passes through only where the service marked
its status as written for callers (a google.rpc.ErrorInfo in its domain); anything else is replaced.
"""

from __future__ import annotations

import json
import re

import grpc

from common.status import CLIENT_FACING_DOMAIN
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
    "input.chat.chat_template_kwargs": "chat_template_kwargs",
    "input.chat.continue_final_message": "continue_final_message",
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


# Every gRPC status code, what it means for an HTTP client: (HTTP status, OpenAI error code, retry, message).
# A message of None passes the service's own message through, and only when the service marked it as written for
# callers (`client_facing`); anything else gets the fixed message here, so no internal text reaches a client.
_STATUS_TABLE: dict[grpc.StatusCode, tuple[int, str, bool, str | None]] = {
    grpc.StatusCode.OK: (500, "internal_error", True, "the generation service ended the call without an answer"),
    # What a service that is shutting down answers the calls it cancels: another replica (or a retry) can serve it.
    grpc.StatusCode.CANCELLED: (503, "service_unavailable", True, "the generation service is restarting; retry shortly"),
    grpc.StatusCode.UNKNOWN: (500, "internal_error", True, "the generation service failed"),
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", False, None),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout", False, "the request timed out in the generation service"),
    grpc.StatusCode.NOT_FOUND: (404, "model_not_found", False, None),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict", False, None),
    # The gateway's own credentials are refused: an operator problem, not the caller's.
    grpc.StatusCode.PERMISSION_DENIED: (502, "bad_gateway", False, "the gateway is not permitted by the generation service"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "server_overloaded", True, None),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error", False, None),
    grpc.StatusCode.ABORTED: (409, "conflict", True, None),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", False, None),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented", False, "the generation service does not implement this call"),
    grpc.StatusCode.INTERNAL: (500, "internal_error", True, None),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable", True, "the generation service is unavailable; retry shortly"),
    grpc.StatusCode.DATA_LOSS: (500, "internal_error", True, "the generation service failed"),
    grpc.StatusCode.UNAUTHENTICATED: (502, "bad_gateway", False, "the gateway is not authorized by the generation service"),
}
# Where the service's message is not client-facing, or not there: what the client reads instead, by HTTP status.
_FALLBACK = {
    400: "the generation service refused the request",
    404: "the requested model is not served here",
    409: "the request conflicted with another; retry",
    429: "the generation service is at capacity; retry shortly",
    500: "the generation service failed",
}
# Statuses whose retry waits a moment (Retry-After), as the OpenAI SDK honours it.
_RETRY_AFTER_S = {429: 1.0, 503: 1.0}


def from_grpc(
    code: grpc.StatusCode,
    details: str | None,
    rich_status=None,
    param_alias: dict[str, str] | None = None,
    client_facing: bool = False,
) -> ApiError:
    """The OpenAI error for a failed gRPC call. `param_alias` renames a field to what this client sent
    (e.g. "max_completion_tokens" rather than "max_tokens"). The service's `details` reach the client only when
    `client_facing` (the service marked its status so, see service/errors.py)."""
    status, error_code, retry, fixed = _STATUS_TABLE[code]
    message = fixed or (details if client_facing and details else _FALLBACK[status])
    if status == 400:
        return BadRequest(message, param=_param(rich_status, param_alias or {}))
    if status == 404:
        return NotFound(message, param="model", code="model_not_found")
    if status == 429:
        return RateLimited(message, code=error_code, retry_after=_RETRY_AFTER_S[429], should_retry=True)
    return Upstream(status, message, code=error_code, retry=retry, retry_after=_RETRY_AFTER_S.get(status))


def from_rpc_error(error: grpc.aio.AioRpcError, param_alias: dict[str, str] | None = None) -> ApiError:
    try:
        rich = rpc_status.from_call(error)
    except Exception:  # a malformed or foreign status: fall back to code and message
        rich = None
    return from_grpc(error.code(), error.details(), rich, param_alias, client_facing=is_client_facing(rich))


def is_client_facing(rich_status) -> bool:
    """Whether the service marked this status's message as written for callers (a google.rpc.ErrorInfo in its
    domain). Statuses made by grpc itself, a proxy or a foreign server carry no such mark."""
    if rich_status is None:
        return False
    for detail in rich_status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == CLIENT_FACING_DOMAIN:
                return True
    return False


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

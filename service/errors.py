"""Errors the service raises, and the one table that turns them into gRPC statuses.

    ServiceError                  base: a message safe to show to the caller
    ├── InvalidArgument           the request is wrong; names the offending field (INVALID_ARGUMENT)
    ├── ModelNotFound             the request names a model this service does not serve (NOT_FOUND)
    ├── Overloaded                admission refused: too many requests in flight and queued (RESOURCE_EXHAUSTED)
    ├── Unavailable               the engine is not serving: starting, draining, or dead (UNAVAILABLE)
    ├── Unauthenticated           a call without the service token, where one is required (UNAUTHENTICATED)
    └── EngineFailure             the engine failed this request; details stay in the service log (INTERNAL)

Messages are written for the caller. Internals (exception text, paths, secrets) go to the log, never into
a status message.
"""

from __future__ import annotations

import re

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from common.status import CLIENT_FACING_DOMAIN


class ServiceError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        # The request field at fault, as a path into GenerateRequest: "sampling.max_tokens", "input", ...
        self.field = field


class ModelNotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class Overloaded(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class EngineFailure(ServiceError):
    code = grpc.StatusCode.INTERNAL


def to_status(error: ServiceError) -> grpc.Status:
    """The rich gRPC status for an error: code, message, an ErrorInfo marking the message as client-facing and,
    for a bad field, a google.rpc.BadRequest detail."""
    info = any_pb2.Any()
    reason = re.sub(r"(?<!^)(?=[A-Z])", "_", type(error).__name__).upper()  # EngineFailure: ENGINE_FAILURE
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=CLIENT_FACING_DOMAIN))
    details = [info]
    if isinstance(error, InvalidArgument):
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.message)
            ]
        )
        detail = any_pb2.Any()
        detail.Pack(bad_request)
        details.append(detail)
    status = status_pb2.Status(code=_RPC_CODES[error.code], message=error.message, details=details)
    return rpc_status.to_status(status)


_RPC_CODES = {code: getattr(code_pb2, code.name) for code in grpc.StatusCode}

"""The domain error tree. Each error knows its gRPC status; one interceptor maps them.

    AlgoplaneError
    ├── InvalidArgument      INVALID_ARGUMENT   (names the field)
    ├── NotFound             NOT_FOUND          (unknown id, or another tenant's)
    ├── FailedPrecondition   FAILED_PRECONDITION
    ├── Unauthenticated      UNAUTHENTICATED
    ├── Unavailable          UNAVAILABLE        (Redis/DB down, shutting down, recovering)
    ├── OutOfRange           OUT_OF_RANGE       (a stream position that was trimmed)
    └── ResourceExhausted    RESOURCE_EXHAUSTED

Normal refusals inside the engine (a skipped event) are returned values, not errors.
"""

from __future__ import annotations

import grpc


class AlgoplaneError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(AlgoplaneError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(AlgoplaneError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(AlgoplaneError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(AlgoplaneError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Unavailable(AlgoplaneError):
    code = grpc.StatusCode.UNAVAILABLE


class OutOfRange(AlgoplaneError):
    code = grpc.StatusCode.OUT_OF_RANGE


class ResourceExhausted(AlgoplaneError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


def strategy_not_found(strategy_id: str) -> NotFound:
    """The single message for unknown ids and other tenants' ids, so they look the same."""
    return NotFound(f"strategy {strategy_id!r} not found")

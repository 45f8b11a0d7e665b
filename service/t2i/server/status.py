"""The one place where errors become gRPC status codes (and back, for the client).

Messages travel to callers as they are; ServiceError messages are written for them.
"""

from __future__ import annotations

import math

import grpc

from .. import errors
from ..engine.engine import RequestAborted

# Ordered: the first matching class wins (subclasses before their bases).
STATUS_BY_ERROR: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.RateLimited, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.InsufficientBalance, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.AlreadyProcessing, grpc.StatusCode.ABORTED),
    (errors.Conflict, grpc.StatusCode.ALREADY_EXISTS),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.InternalError, grpc.StatusCode.INTERNAL),
    (RequestAborted, grpc.StatusCode.DEADLINE_EXCEEDED),
)


def status_for(error: Exception) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """(code, message, trailing metadata) for an exception raised while serving a call."""
    for error_type, code in STATUS_BY_ERROR:
        if isinstance(error, error_type):
            return code, str(error), _trailers(error)
    return grpc.StatusCode.INTERNAL, "internal error", ()


def _trailers(error: Exception) -> tuple[tuple[str, str], ...]:
    retry_after = getattr(error, "retry_after", None)
    trailers: list[tuple[str, str]] = []
    if retry_after is not None:
        # Whole seconds, rounded up, as the HTTP Retry-After header wants them.
        trailers.append(("retry-after", str(max(1, math.ceil(retry_after)))))
    for name, value in getattr(error, "headers", {}).items():
        trailers.append((name, value))
    return tuple(trailers)


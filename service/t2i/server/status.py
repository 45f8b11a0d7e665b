"""Domain exceptions become gRPC statuses here, by the one table in `t2i.errors`.

Messages travel to callers as they are; ServiceError messages are written for them.
"""

from __future__ import annotations

import math

import grpc

from .. import wire
from ..domain import Failed
from ..errors import InvalidArgument, http_status_of, kind_of


def status_for(error: Exception) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """(code, message, trailing metadata) for an exception raised while serving a call."""
    kind = kind_of(error)
    if kind is None:
        return grpc.StatusCode.INTERNAL, "internal error", ()
    return grpc.StatusCode[kind.status], str(error), _trailers(error)


def failed_event(error: Exception) -> Failed:
    """The error event a stream ends with: the status and message the unary call would give."""
    code, message, _ = status_for(error)
    kind = kind_of(error)
    return Failed(code=kind.http if kind is not None else http_status_of(code.name), status=code.name, message=message)


def _trailers(error: Exception) -> tuple[tuple[str, str], ...]:
    retry_after = getattr(error, "retry_after", None)
    trailers: list[tuple[str, str]] = []
    if retry_after is not None:
        # Whole seconds, rounded up, as the HTTP Retry-After header wants them.
        trailers.append((wire.RETRY_AFTER_HEADER, str(max(1, math.ceil(retry_after)))))
    for name, value in getattr(error, "headers", {}).items():
        trailers.append((name, value))
    if isinstance(error, InvalidArgument) and error.field and error.field.isascii() and error.field.isprintable():
        # The field the message names, for adapters that name it in their own API's terms.
        trailers.append((wire.ERROR_FIELD_HEADER, error.field))
    return tuple(trailers)

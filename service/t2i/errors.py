"""Domain exceptions: what went wrong, in terms a caller can act on.

Each class maps to exactly one row of ERROR_KINDS below (gRPC status, HTTP status, name,
retryable); `t2i.server.status` applies it and scripts/render.py renders it into the Envoy
config, the OpenAPI description and the README, so nothing else chooses status codes. Messages are shown to callers: they name the field, the value and
what is allowed, and never contain secrets such as API keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import wire


class ServiceError(Exception):
    """Base class of errors that are the caller's to see."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    """A request field is malformed or out of range."""

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"invalid {field} {describe(value)}: {allowed}")


class MissingFields(InvalidArgument):
    """Required request fields were left out."""

    def __init__(self, fields: list[str]) -> None:
        self.fields = fields
        ServiceError.__init__(self, f"missing required field{'s' if len(fields) > 1 else ''}: {', '.join(fields)}")
        self.field, self.value, self.allowed = fields[0], None, "required"


class NotFound(ServiceError):
    """The request names something that does not exist (for example an unknown model id)."""


class Overloaded(ServiceError):
    """The service cannot take the request now; retrying after `retry_after` seconds may work."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(ServiceError):
    """The service is starting or shutting down."""


class Unauthenticated(ServiceError):
    """No API key, or one the service does not know."""


class PermissionDenied(ServiceError):
    """A known API key that may not be used (for example a revoked one)."""


class RateLimited(ServiceError):
    """Too many requests for this key or client address."""

    def __init__(self, message: str, retry_after: float, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.headers = headers or {}


class InsufficientBalance(ServiceError):
    """The key's stardust balance does not cover the request's price."""

    def __init__(self, cost: int, balance: int) -> None:
        self.cost = cost
        self.balance = balance
        super().__init__(f"insufficient stardust: this request costs {cost}, balance is {balance}")


class NotConfigured(ServiceError):
    """The call needs something this server runs without (jobs need the billing database)."""


class AlreadyProcessing(ServiceError):
    """A request with the same idempotency key is still running."""


class Conflict(ServiceError):
    """A request conflicts with an earlier one (for example a reused idempotency key)."""


class InternalError(ServiceError):
    """The service failed; the caller did nothing wrong and is not charged."""


class RequestAborted(ServiceError):
    """The request was dropped because its client went away or its deadline passed."""


def describe(value: object, limit: int = 60) -> str:
    """A short, safe rendering of a rejected value for an error message."""
    if isinstance(value, (bytes, bytearray)):
        return f"({len(value)} bytes)"  # a file: never echoed back
    if isinstance(value, str):
        if len(value) > limit:
            return f"({len(value)} characters)"
        return repr(value)
    return repr(value)


@dataclass(frozen=True)
class ErrorKind:
    """One status a caller can get: the gRPC code, what REST callers see, and when it happens."""

    status: str  # the gRPC code name; also the `status` of the REST error body
    http: int
    retryable: bool  # the same request may succeed later (after Retry-After, or a fix on our side)
    when: str  # for the README's error table
    errors: tuple[type[ServiceError], ...] = ()  # domain exceptions that become this status
    # False: a status only the edge produces for REST callers (the service never sends it).
    from_service: bool = True


# The one error table. Rows with the same gRPC status must agree on the HTTP status; a row
# whose `from_service` is False only names an HTTP status the edge produces itself.
ERROR_KINDS: tuple[ErrorKind, ...] = (
    ErrorKind("INVALID_ARGUMENT", 400, False,
              "a field out of range, unknown sampler/scheduler, malformed JSON, wrong field type", (InvalidArgument,)),
    ErrorKind("FAILED_PRECONDITION", 400, False,
              "not enough stardust (`insufficient stardust: this request costs 3, balance is 1`); jobs on a server "
              "without billing", (InsufficientBalance, NotConfigured)),
    ErrorKind("UNAUTHENTICATED", 401, False, "missing or unknown `x-illustrious-api-key`", (Unauthenticated,)),
    ErrorKind("PERMISSION_DENIED", 403, False, "revoked key", (PermissionDenied,)),
    ErrorKind("NOT_FOUND", 404, False, "unknown `modelId`, unknown path", (NotFound,)),
    ErrorKind("UNIMPLEMENTED", 405, False, "wrong method on a known path", from_service=False),
    ErrorKind("DEADLINE_EXCEEDED", 408, True, "the request body did not arrive within 60 s", from_service=False),
    ErrorKind("ABORTED", 409, True, "the same `Idempotency-Key` is still being processed", (AlreadyProcessing,)),
    ErrorKind("ALREADY_EXISTS", 409, False, "the request conflicts with an earlier one", (Conflict,)),
    ErrorKind("INVALID_ARGUMENT", 413, False,
              f"request body over {wire.MAX_REQUEST_BYTES // 1024 // 1024} MiB "
              f"({wire.MAX_IMAGE_REQUEST_BYTES // 1024 // 1024} MiB on `/image-to-image/generate` and its stream)",
              from_service=False),
    ErrorKind("INVALID_ARGUMENT", 431, False, f"request headers over {wire.MAX_HEADER_BYTES // 1024} KiB", from_service=False),
    ErrorKind("RESOURCE_EXHAUSTED", 429, True,
              "rate limit, concurrency cap, queue full, too many failed keys; `Retry-After` and `x-ratelimit-*` headers",
              (RateLimited, Overloaded)),
    ErrorKind("INTERNAL", 500, True, "server fault (never charged)", (InternalError,)),
    ErrorKind("UNAVAILABLE", 502, True, "the image service broke the connection", from_service=False),
    ErrorKind("UNAVAILABLE", 503, True,
              "starting, shutting down, no healthy replica, the ledger or the rate limiter unreachable", (Unavailable,)),
    ErrorKind("DEADLINE_EXCEEDED", 504, True,
              "the generation outlasted the caller's deadline or the edge's route timeout (300 s); never charged",
              (RequestAborted,)),
)


def kind_of(error: BaseException) -> ErrorKind | None:
    """The row for a domain exception (None for anything else: an internal error)."""
    for kind in ERROR_KINDS:
        if isinstance(error, kind.errors):
            return kind
    return None


def http_status_of(status: str) -> int:
    """The HTTP status a REST caller gets for a gRPC status name the service sends (500 if none)."""
    for kind in ERROR_KINDS:
        if kind.from_service and kind.status == status:
            return kind.http
    return 500


def retryable(status: str) -> bool:
    return any(kind.retryable for kind in ERROR_KINDS if kind.status == status and kind.from_service)

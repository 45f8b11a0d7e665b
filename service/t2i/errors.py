"""Domain exceptions: what went wrong, in terms a caller can act on.

Each class maps to exactly one gRPC status code in `t2i.server.status`; nothing else in the
service chooses status codes. Messages are shown to callers: they name the field, the value and
what is allowed, and never contain secrets such as API keys.
"""

from __future__ import annotations


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


class AlreadyProcessing(ServiceError):
    """A request with the same idempotency key is still running."""


class Conflict(ServiceError):
    """A request conflicts with an earlier one (for example a reused idempotency key)."""


class InternalError(ServiceError):
    """The service failed; the caller did nothing wrong and is not charged."""


def describe(value: object, limit: int = 60) -> str:
    """A short, safe rendering of a rejected value for an error message."""
    if isinstance(value, str):
        if len(value) > limit:
            return f"({len(value)} characters)"
        return repr(value)
    return repr(value)

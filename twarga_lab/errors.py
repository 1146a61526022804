"""Domain errors of Twarga Lab.

Services and the hypervisor layer raise these; the HTTP layer maps them to a status and a
JSON body ``{"message", "reason"}`` in exactly one place (``handlers.base``).
"""

from __future__ import annotations


class TwargaError(Exception):
    """Base class: every error a user can be shown.

    ``reason`` is a short machine-readable code, ``message`` a sentence for people.
    """

    status_code: int = 500
    default_reason: str = "internal_error"

    def __init__(self, message: str, reason: str | None = None, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.details = details


class InvalidRequest(TwargaError):
    """The request is malformed: not JSON, a missing key, a value of the wrong type."""

    status_code = 400
    default_reason = "invalid_request"


class ValidationFailed(TwargaError):
    """The request is well formed but a value is out of bounds or unknown."""

    status_code = 422
    default_reason = "validation_failed"

    def __init__(self, message: str, field: str, reason: str | None = None) -> None:
        super().__init__(message, reason, field=field)
        self.field = field


class Unauthorized(TwargaError):
    """No authenticated user."""

    status_code = 401
    default_reason = "unauthorized"


class Forbidden(TwargaError):
    """Authenticated, but not allowed (for instance, not an admin)."""

    status_code = 403
    default_reason = "forbidden"


class NotFound(TwargaError):
    """The thing does not exist, or belongs to someone else."""

    status_code = 404
    default_reason = "not_found"


class Conflict(TwargaError):
    """The request contradicts the current state (a duplicate name, a VM being destroyed)."""

    status_code = 409
    default_reason = "conflict"


class QuotaExceeded(Conflict):
    """Creating this would take the user over a quota, or they have no credits left."""

    default_reason = "quota_exceeded"


class PayloadTooLarge(TwargaError):
    """The request body is larger than the API accepts."""

    status_code = 413
    default_reason = "body_too_large"


class BackendUnavailable(TwargaError):
    """libvirt (or another backend) cannot be reached right now."""

    status_code = 503
    default_reason = "backend_unavailable"


class DatabaseUnavailable(TwargaError):
    """The database cannot be reached right now (a PostgreSQL restart, a dropped
    connection): try again shortly. The service reconnects by itself."""

    status_code = 503
    default_reason = "database_unavailable"


class BackendError(TwargaError):
    """The hypervisor refused an operation for a reason we did not foresee."""

    status_code = 500
    default_reason = "backend_error"


class DatabaseOutdated(RuntimeError):
    """The database schema is older than the code; the server refuses to start."""

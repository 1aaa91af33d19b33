"""Errors the engine raises, each mapped to one HTTP status by the service.

Every error names what was wrong (a field path where there is one) so a client can fix its request;
an error raised before a step commits leaves the adapter's cached and stored state untouched.
"""

from __future__ import annotations


class TrainerError(Exception):
    """Base of every error the trainer reports to clients."""

    status_code = 500

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class InvalidInput(TrainerError):
    """A request field is malformed or out of range (HTTP 422)."""

    status_code = 422


class AdapterNotFound(TrainerError):
    """No stored adapter has this id (HTTP 404)."""

    status_code = 404


class ConfigConflict(TrainerError):
    """Init asked for a LoRA config other than the stored one (HTTP 409)."""

    status_code = 409


class QueueFull(TrainerError):
    """The step queue is at its bound (HTTP 429, with Retry-After)."""

    status_code = 429


class NotReady(TrainerError):
    """The base model is not loaded yet, or the service is shutting down (HTTP 503)."""

    status_code = 503


class StorageFull(TrainerError):
    """The adapter store could not persist a step (no space); nothing was committed (HTTP 507)."""

    status_code = 507


class NonFiniteLoss(InvalidInput):
    """A step produced a non-finite loss, gradient or weight; nothing was committed (HTTP 422)."""

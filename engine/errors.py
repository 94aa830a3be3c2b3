"""One error root for oclaw; every error carries the HTTP status it maps to."""

from __future__ import annotations

from http import HTTPStatus


class OclawError(Exception):
    """Root of every error oclaw raises on purpose."""

    status: HTTPStatus = HTTPStatus.INTERNAL_SERVER_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(OclawError):
    """The request is malformed or does not match the model signature."""

    status = HTTPStatus.BAD_REQUEST


class ModelNotFound(OclawError):
    """Unknown model or version."""

    status = HTTPStatus.NOT_FOUND


class PayloadTooLarge(OclawError):
    """The body or a declared tensor exceeds a configured limit."""

    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class QueueFull(OclawError):
    """A model's dynamic-batching queue holds ``max_queue_size`` requests; the client should retry later."""

    status = HTTPStatus.TOO_MANY_REQUESTS

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        #: Seconds for the ``Retry-After`` header.
        self.retry_after_s = retry_after_s


class ModelNotReady(OclawError):
    """The model exists but is loading, failed or unloaded."""

    status = HTTPStatus.SERVICE_UNAVAILABLE


class NotEnoughTime(OclawError):
    """The caller's deadline (e.g. Lambda's remaining time) is too close to finish the work."""

    status = HTTPStatus.SERVICE_UNAVAILABLE


class UnsupportedEvent(OclawError):
    """A Lambda event of a shape oclaw does not handle."""

    status = HTTPStatus.BAD_REQUEST


class Unsupported(OclawError):
    """A valid request for a feature oclaw does not offer."""

    status = HTTPStatus.NOT_IMPLEMENTED


class ModelLoadError(OclawError):
    """A model could not be loaded (bad file, manifest or checksum); 400 like Triton's load API."""

    status = HTTPStatus.BAD_REQUEST


class ConfigError(OclawError):
    """An OCLAW_* setting or a manifest is invalid."""

    status = HTTPStatus.INTERNAL_SERVER_ERROR

"""One exception per oclaw error status; each keeps the server's message (its ``{"error": ...}``)."""

from __future__ import annotations

from http import HTTPStatus


class OclawError(Exception):
    """Root of every error the SDK raises."""

    #: The HTTP status this error stands for (None: no answer came, e.g. a connection error).
    status: int | None = None

    def __init__(self, message: str, *, status: int | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        #: The server's ``Retry-After``, in seconds, when it sent one.
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        return self.message if self.status is None else f"{self.status}: {self.message}"


class APIError(OclawError):
    """The server answered with an error status."""


class InvalidInput(APIError):
    """400: the request is malformed or does not match the model's signature."""

    status = HTTPStatus.BAD_REQUEST


class AuthenticationError(APIError):
    """401: no API key, or one the server does not know."""

    status = HTTPStatus.UNAUTHORIZED


class PermissionDenied(APIError):
    """403: the API key's role may not do this."""

    status = HTTPStatus.FORBIDDEN


class ModelNotFound(APIError):
    """404: unknown model or version (or no version of the precision asked for)."""

    status = HTTPStatus.NOT_FOUND


class PayloadTooLarge(APIError):
    """413: the body or a tensor exceeds the server's limit."""

    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class TooManyRequests(APIError):
    """429: a queue or rate limit is full; retried by the client before it is raised."""

    status = HTTPStatus.TOO_MANY_REQUESTS


class ServerError(APIError):
    """500 and any other 5xx not named below."""

    status = HTTPStatus.INTERNAL_SERVER_ERROR


class NotSupported(APIError):
    """501: a valid request for a feature the server does not offer."""

    status = HTTPStatus.NOT_IMPLEMENTED


class Unavailable(APIError):
    """503 (and 502/504 from a gateway): the server or model is not ready; retried before it is raised."""

    status = HTTPStatus.SERVICE_UNAVAILABLE


class ConnectionFailed(OclawError):
    """No answer: the connection failed or timed out (after the retries)."""


#: Status -> exception class, for the statuses oclaw answers with.
BY_STATUS: dict[int, type[APIError]] = {
    int(cls.status): cls
    for cls in (
        InvalidInput,
        AuthenticationError,
        PermissionDenied,
        ModelNotFound,
        PayloadTooLarge,
        TooManyRequests,
        ServerError,
        NotSupported,
        Unavailable,
    )
    if cls.status is not None
}
BY_STATUS[HTTPStatus.BAD_GATEWAY] = Unavailable
BY_STATUS[HTTPStatus.GATEWAY_TIMEOUT] = Unavailable


def error_for(status: int, message: str, *, retry_after_s: float | None = None) -> APIError:
    """The exception for an error answer: its class by status (another 5xx: ServerError, another 4xx: APIError)."""
    cls = BY_STATUS.get(status) or (ServerError if status >= 500 else APIError)
    return cls(message, status=status, retry_after_s=retry_after_s)

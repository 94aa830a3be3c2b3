"""Python client for oclaw (and any KServe V2 server): ``Client(endpoint, api_key).predict(...).topk(5)``."""

from __future__ import annotations

from oclaw_sdk._core import Inputs, ModelConfig
from oclaw_sdk.client import AsyncClient, Client
from oclaw_sdk.errors import (
    APIError,
    AuthenticationError,
    ConnectionFailed,
    InvalidInput,
    ModelNotFound,
    NotSupported,
    OclawError,
    PayloadTooLarge,
    PermissionDenied,
    ServerError,
    TooManyRequests,
    Unavailable,
)
from oclaw_sdk.result import Result
from oclaw_sdk.retry import RetryPolicy

__all__ = [
    "APIError",
    "AsyncClient",
    "AuthenticationError",
    "Client",
    "ConnectionFailed",
    "Inputs",
    "InvalidInput",
    "ModelConfig",
    "ModelNotFound",
    "NotSupported",
    "OclawError",
    "PayloadTooLarge",
    "PermissionDenied",
    "Result",
    "RetryPolicy",
    "ServerError",
    "TooManyRequests",
    "Unavailable",
]

"""boto3 clients, created on first use (boto3 costs ~0.2 s to import: never on the INIT path) and cached."""

from __future__ import annotations

import threading
from typing import Any

_clients: dict[str, Any] = {}
_lock = threading.Lock()


def client(service: str) -> Any:
    """A cached boto3 client (endpoints honour AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_<SERVICE>)."""
    with _lock:
        if service not in _clients:
            import boto3
            from botocore.config import Config

            config = Config(retries={"max_attempts": 3, "mode": "standard"}, read_timeout=30, connect_timeout=5)
            _clients[service] = boto3.client(service, config=config)
        return _clients[service]


def reset() -> None:
    """Drop every client (credentials are time-bound; e.g. after a SnapStart restore)."""
    with _lock:
        for client in _clients.values():
            client.close()  # its pooled connections, not left to the garbage collector
        _clients.clear()

"""boto3 clients, created on first use (boto3 costs ~0.2 s to import: never on the INIT path) and cached."""

from __future__ import annotations

import threading
from typing import Any

#: Quick clients (the metering queue sinks, which must not hold a Lambda invocation past its deadline): seconds to
#: connect, seconds to read an answer at most, and one attempt a call (their caller retries within its deadline).
QUICK_CONNECT_S = 1.0
QUICK_READ_S = 2.0

_clients: dict[tuple[str, bool], Any] = {}
_lock = threading.Lock()


def client(service: str, *, quick: bool = False) -> Any:
    """A cached boto3 client (endpoints honour AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_<SERVICE>); ``quick``: short
    timeouts and no retries (``QUICK_CONNECT_S``, ``QUICK_READ_S``), else botocore's standard retries."""
    key = (service, quick)
    with _lock:
        if key not in _clients:
            import boto3
            from botocore.config import Config

            if quick:
                config = Config(
                    retries={"total_max_attempts": 1},
                    connect_timeout=QUICK_CONNECT_S,
                    read_timeout=QUICK_READ_S,
                )
            else:
                config = Config(retries={"max_attempts": 3, "mode": "standard"}, read_timeout=30, connect_timeout=5)
            _clients[key] = boto3.client(service, config=config)
        return _clients[key]


def reset() -> None:
    """Drop every client (credentials are time-bound; e.g. after a SnapStart restore)."""
    with _lock:
        for client in _clients.values():
            client.close()  # its pooled connections, not left to the garbage collector
        _clients.clear()

"""Retries: exponential backoff with jitter, honouring the server's ``Retry-After``."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

#: Statuses worth another try: overloaded (429), not ready (503) or a gateway that lost the server (502, 504).
RETRY_STATUSES = frozenset({429, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how long to wait before trying a request again."""

    #: Tries after the first (0: no retries).
    max_retries: int = 3
    #: The first wait, in seconds; each retry doubles it, up to ``max_delay_s``.
    initial_delay_s: float = 0.25
    max_delay_s: float = 8.0
    #: Up to this fraction of each wait is taken off at random, so clients that failed together spread out.
    jitter: float = 0.5
    #: A ``Retry-After`` longer than this is not trusted: the backoff's own wait is used instead.
    max_retry_after_s: float = 60.0

    def delay(self, attempt: int, retry_after_s: float | None = None) -> float | None:
        """Seconds to wait before retry number ``attempt`` (0-based), or None when no retry is left."""
        if attempt >= self.max_retries:
            return None
        if retry_after_s is not None and retry_after_s <= self.max_retry_after_s:
            return retry_after_s
        backoff = min(self.max_delay_s, self.initial_delay_s * 2.0**attempt)
        return backoff * (1.0 - self.jitter * random.random())


def retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())

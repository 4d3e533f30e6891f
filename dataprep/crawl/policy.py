"""Retry policy: which failures are worth another try, and how long to back off before it."""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
# Failures that a later attempt can plausibly cure. DNS failures, refused addresses, TLS errors and
# malformed responses are not retried: the same request would fail the same way.
RETRYABLE_ERRORS = frozenset({"connect", "timeout", "connection"})


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 3
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0

    def should_retry(self, attempt: int, *, status: int | None = None,
                     error: str | None = None) -> bool:
        """`attempt` counts from 0 for the first try."""
        if attempt >= self.max_retries:
            return False
        return (status in RETRYABLE_STATUS) if status is not None else error in RETRYABLE_ERRORS

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Exponential back-off (backoff_s * 2**attempt), raised to a server's Retry-After, capped."""
        wait = self.backoff_s * (2 ** attempt)
        if retry_after is not None:
            wait = max(wait, retry_after)
        return min(wait, self.max_backoff_s)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)

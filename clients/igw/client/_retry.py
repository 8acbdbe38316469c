"""The retry policy shared by the sync and async clients.

Only what is safe to send again is retried: the router could not be reached (UNAVAILABLE
from gRPC itself, no igw ErrorInfo) or is draining (reason ``DRAINING``). Never an error
the router chose: a provider that refuses a key sees one request per agent call. Retries
use exponential backoff with full jitter and move to the next router address each time;
the request id stays the same so the gateway counts the call once. Everything happens
inside the call's one overall deadline.
"""

from __future__ import annotations

import random
import threading
import time

import grpc

from igw.client._errors import is_retryable_error

__all__ = ["AddressRotation", "Deadline", "backoff_delay", "is_retryable"]

_BASE_DELAY = 0.1
_MAX_DELAY = 2.0


def backoff_delay(retry: int, base: float = _BASE_DELAY, cap: float = _MAX_DELAY) -> float:
    """Seconds to wait before retry number ``retry`` (0-based): full jitter over ``base * 2**retry``."""
    return random.uniform(0.0, min(cap, base * (2**retry)))


def is_retryable(code: grpc.StatusCode | None, reason: str = "") -> bool:
    """True when the call may be sent again on another address (see ``is_retryable_error``)."""
    return is_retryable_error(code, reason)


class Deadline:
    """One overall deadline for a call and its retries."""

    def __init__(self, timeout: float) -> None:
        self._end = time.monotonic() + timeout

    def remaining(self) -> float:
        """Seconds left (never below 0)."""
        return max(0.0, self._end - time.monotonic())

    def allows(self, delay: float) -> bool:
        """True when waiting ``delay`` still leaves time for another attempt."""
        return self.remaining() > delay + 0.01


class AddressRotation:
    """Which router address to try: stay on one while it works, move on when it fails."""

    def __init__(self, count: int) -> None:
        self._count = count
        self._current = random.randrange(count) if count > 1 else 0
        self._lock = threading.Lock()

    def current(self) -> int:
        """The address index to use now."""
        with self._lock:
            return self._current

    def failed(self, index: int) -> int:
        """Marks ``index`` as failing and returns the next index to try."""
        with self._lock:
            if self._current == index:
                self._current = (index + 1) % self._count
            return self._current

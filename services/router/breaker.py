"""Per-deployment circuit breakers and observed latency, local to one router process.

CLOSED → (failure_threshold failures in a row) → OPEN → (cooldown) → HALF_OPEN: one
probe call goes through. The probe closes the breaker on success and re-opens it on
failure. A probe that hangs past ``probe_timeout`` counts as failed, so a hung probe
cannot wedge the breaker half-open.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.router.routing import BreakerCfg


class State(enum.Enum):
    """Breaker states."""

    CLOSED = 1
    OPEN = 2
    HALF_OPEN = 3


@dataclass
class Breaker:
    """One deployment's breaker. Not thread-safe; used from the event loop only."""

    cfg: BreakerCfg
    clock: Callable[[], float] = time.monotonic
    failures: int = 0
    opened_at: float = 0.0
    probe_started: float | None = None
    _open: bool = False
    in_flight: int = 0
    latency_ewma_s: float | None = None
    on_change: Callable[[State], None] | None = field(default=None, repr=False)

    def state(self) -> State:
        """The current state (OPEN turns HALF_OPEN once the cooldown has passed)."""
        if not self._open:
            return State.CLOSED
        if self.clock() - self.opened_at >= self.cfg.cooldown_ms / 1000:
            return State.HALF_OPEN
        return State.OPEN

    def open_until(self) -> float:
        """Monotonic time the breaker half-opens (meaningful when OPEN)."""
        return self.opened_at + self.cfg.cooldown_ms / 1000

    def try_acquire(self) -> bool | str:
        """False: skip this deployment. True: a normal call. "probe": the one half-open probe."""
        st = self.state()
        if st is State.CLOSED:
            return True
        if st is State.OPEN:
            return False
        now = self.clock()
        if self.probe_started is not None and now - self.probe_started < self.cfg.probe_timeout_ms / 1000:
            return False  # a probe is in flight and still within its deadline
        if self.probe_started is not None:
            # The previous probe hung past its deadline: count it failed, re-open now.
            self.probe_started = None
            self._trip(now)
            return False
        self.probe_started = now
        return "probe"

    def record_success(self, first_byte_s: float | None = None) -> None:
        """A call succeeded: close, reset failures, update latency."""
        was_open = self._open
        self.failures = 0
        self._open = False
        self.probe_started = None
        if first_byte_s is not None:
            prev = self.latency_ewma_s
            self.latency_ewma_s = first_byte_s if prev is None else 0.8 * prev + 0.2 * first_byte_s
        if was_open and self.on_change:
            self.on_change(State.CLOSED)

    def record_failure(self) -> None:
        """A retryable failure: count it; trip at the threshold or when the probe fails."""
        now = self.clock()
        if self.probe_started is not None or self._open:
            self.probe_started = None
            self._trip(now)
            return
        self.failures += 1
        if self.failures >= self.cfg.failure_threshold:
            self._trip(now)

    def release_probe(self) -> None:
        """The probe ended without a verdict (e.g. the agent cancelled): let another probe go."""
        self.probe_started = None

    def _trip(self, now: float) -> None:
        self._open = True
        self.opened_at = now
        if self.on_change:
            self.on_change(State.OPEN)

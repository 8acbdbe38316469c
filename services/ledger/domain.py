"""The ledger's domain: values, validation, windows, and the errors it raises.

Errors are the shared tree of :mod:`services.common.errors` with stable reasons::

    InvalidArgument      INVALID_TOKENS, INVALID_AMOUNT, INVALID_NAME, MISSING_FIELD,
                         INVALID_WINDOW, INVALID_RESERVATION_ID, INVALID_PAGE_TOKEN, INVALID_TTL,
                         AMBIGUOUS_RELEASE
    FailedPrecondition   MODEL_NOT_PRICED, RESERVATION_MISMATCH, ALREADY_SETTLED,
                         NO_BUDGET (no budget applies and unbudgeted teams are not allowed),
                         REQUEST_RELEASED (the request id's call was released as a whole)
    ResourceExhausted    BUDGET_EXCEEDED   (metadata: limit/spent/held/remaining nanos, window, ...)
                         RATE_LIMITED      (metadata: limits and use; a google.rpc.RetryInfo)
    Aborted              IDEMPOTENCY_MISMATCH (same request id, different payload: a conflict)
    NotFound             RESERVATION_NOT_FOUND, OPEN_HOLD_NOT_FOUND (Settle by request id alone),
                         PRICE_VERSION_NOT_FOUND
    Unavailable          DATABASE_UNAVAILABLE (Postgres down or unreachable; retry later)

Money is ``int`` nano-dollars everywhere; times are aware UTC datetimes.
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from dataclasses import dataclass, field

from services.common import errors as E
from services.common import ids
from services.ledger.pricing import MAX_VALUE

NAME_RE = ids.PRICE_KEY
UTC = dt.UTC
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)


class Window(enum.IntEnum):
    """Budget windows; values equal the proto enum and the database column."""

    DAILY = 1
    WEEKLY = 2
    MONTHLY = 3
    TOTAL = 4


class Outcome(enum.IntEnum):
    """How a call ended; 0 (unknown) is used only by captured holds."""

    UNKNOWN = 0
    SUCCESS = 1
    CANCELLED = 2
    PROVIDER_ERROR = 3


class Flag(enum.IntFlag):
    """Spend entry flags (a bitmask in the database)."""

    OVER_HOLD = 1
    UNSETTLED_CAPTURE = 2
    USAGE_ESTIMATED = 4


def window_start(window: Window, now: dt.datetime) -> dt.datetime:
    """Start of the UTC calendar window containing ``now`` (the epoch for TOTAL)."""
    now = now.astimezone(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if window is Window.DAILY:
        return day
    if window is Window.WEEKLY:
        return day - dt.timedelta(days=day.weekday())
    if window is Window.MONTHLY:
        return day.replace(day=1)
    return EPOCH


def window_end(window: Window, start: dt.datetime) -> dt.datetime | None:
    """Exclusive end of the window starting at ``start`` (None for TOTAL)."""
    if window is Window.DAILY:
        return start + dt.timedelta(days=1)
    if window is Window.WEEKLY:
        return start + dt.timedelta(days=7)
    if window is Window.MONTHLY:
        return start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(
            month=start.month + 1
        )
    return None


def from_us(us: int) -> dt.datetime:
    """Microseconds since the epoch to an aware UTC datetime (exact)."""
    return EPOCH + dt.timedelta(microseconds=us)


def to_us(t: dt.datetime) -> int:
    """An aware datetime to microseconds since the epoch (exact; the inverse of :func:`from_us`)."""
    return (t - EPOCH) // dt.timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """One budget in one window: limit, spent, held, remaining (never below 0)."""

    team: str
    agent: str
    window: Window
    limit_nanos: int
    soft_limit_nanos: int
    spent_nanos: int
    held_nanos: int
    window_start: dt.datetime
    # The run the budget caps ('' for team and agent budgets).
    run: str = ""

    @property
    def remaining_nanos(self) -> int:
        return max(0, self.limit_nanos - self.spent_nanos - self.held_nanos)

    @property
    def window_end(self) -> dt.datetime | None:
        return window_end(self.window, self.window_start)


@dataclass(frozen=True, slots=True)
class Hold:
    """A placed reservation."""

    reservation_id: uuid.UUID
    request_id: str
    attempt: int
    team: str
    agent: str
    model: str
    amount_nanos: int
    price_version: int
    state: str
    created_at: dt.datetime
    expires_at: dt.datetime
    # 0 for a call's hold; N > 0 for a budget slice covering N calls.
    slice_calls: int = 0


@dataclass(frozen=True, slots=True)
class ReserveResult:
    """What Reserve returns: the hold and every budget that applied, after it."""

    hold: Hold
    budgets: list[BudgetStatus]
    replayed: bool


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one call."""

    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0


@dataclass(frozen=True, slots=True)
class SpendEntry:
    """One settled or captured call; never updated."""

    id: int
    request_id: str
    reservation_id: uuid.UUID
    team: str
    agent: str
    model: str
    provider: str
    provider_model: str
    usage: Usage
    cost_nanos: int
    held_nanos: int
    price_version: int
    outcome: Outcome
    flags: Flag
    latency_us: int
    created_at: dt.datetime
    reserve_time: dt.datetime
    run_id: str = ""


@dataclass(frozen=True, slots=True)
class SettleResult:
    """The request's one spend entry; ``replayed`` when it existed already."""

    entry: SpendEntry
    replayed: bool
    budgets: list[BudgetStatus] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class BudgetConfig:
    """A configured budget (SetBudget's result)."""

    team: str
    agent: str
    window: Window
    limit_nanos: int
    soft_limit_nanos: int
    updated_at: dt.datetime
    run: str = ""


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A team's (agent '') or agent's rate limits (0: none) and what the last 60 s counted."""

    team: str
    agent: str
    requests_per_minute: int
    tokens_per_minute: int
    requests_used: int
    tokens_used: int
    updated_at: dt.datetime


@dataclass(frozen=True, slots=True)
class Maintenance:
    """What one partition maintenance did."""

    created: list[str]
    dropped: list[str]
    partitions: list[str]


@dataclass(frozen=True, slots=True)
class SpendTotal:
    """One group of ListSpend."""

    team: str = ""
    agent: str = ""
    model: str = ""
    provider: str = ""
    run: str = ""
    day: dt.datetime | None = None
    request_count: int = 0
    usage: Usage = Usage(0, 0, 0)
    cost_nanos: int = 0


@dataclass(frozen=True, slots=True)
class PriceList:
    """One catalogue version."""

    version: int
    created_at: dt.datetime
    prices: list[tuple[str, int, int, int]]  # (model, input, output, cached) per million tokens
    next_page_token: str = ""


# ---------------------------------------------------------------- validation


def check_name(what: str, value: str, *, required: bool = True) -> str:
    """A team/agent/model/provider name: ^[A-Za-z0-9._:-]{1,128}$ (empty allowed if optional)."""
    if not value:
        if required:
            raise E.InvalidArgument("MISSING_FIELD", f"{what} is required", {"field": what})
        return ""
    if not NAME_RE.match(value):
        raise E.InvalidArgument(
            "INVALID_NAME", f"{what} must match {NAME_RE.pattern}", {"field": what}
        )
    return value


def check_principal(what: str, value: str, *, required: bool = True) -> str:
    """A team or agent name: a SPIFFE path segment (``ids.SEGMENT``), as the certificate names it."""
    if not value:
        if required:
            raise E.InvalidArgument("MISSING_FIELD", f"{what} is required", {"field": what})
        return ""
    if not ids.is_segment(value):
        raise E.InvalidArgument(
            "INVALID_NAME", f"{what} must match {ids.SEGMENT.pattern}", {"field": what}
        )
    return value


def check_request_id(value: str, what: str = "request_id") -> str:
    """Request ids follow the same shape as names."""
    return check_name(what, value)


def check_tokens(what: str, value: int) -> int:
    """A token count in [0, 2**62]."""
    if not isinstance(value, int) or value < 0 or value > MAX_VALUE:
        raise E.InvalidArgument(
            "INVALID_TOKENS", f"{what} must be between 0 and 2**62", {"field": what, "value": value}
        )
    return value


def check_amount(what: str, value: int) -> int:
    """A nano-dollar amount or price in [0, 2**62]."""
    if not isinstance(value, int) or value < 0 or value > MAX_VALUE:
        raise E.InvalidArgument(
            "INVALID_AMOUNT", f"{what} must be between 0 and 2**62 nano-dollars", {"field": what, "value": value}
        )
    return value


def check_reservation_id(value: str) -> uuid.UUID:
    """A reservation id as returned by Reserve."""
    if not value:
        raise E.InvalidArgument("MISSING_FIELD", "reservation_id is required", {"field": "reservation_id"})
    try:
        return uuid.UUID(value)
    except ValueError:
        raise E.InvalidArgument(
            "INVALID_RESERVATION_ID", "reservation_id is not a reservation id", {"field": "reservation_id"}
        ) from None


def budget_exceeded(status: BudgetStatus, amount: int) -> E.ResourceExhausted:
    """The BUDGET_EXCEEDED error with the denying budget's numbers."""
    return E.ResourceExhausted(
        "BUDGET_EXCEEDED",
        f"budget exceeded for team {status.team}"
        + (f" agent {status.agent}" if status.agent else "")
        + f" ({status.window.name} window)",
        {
            "team": status.team,
            "agent": status.agent,
            "window": status.window.name,
            "limit_nanos": status.limit_nanos,
            "spent_nanos": status.spent_nanos,
            "held_nanos": status.held_nanos,
            "remaining_nanos": status.remaining_nanos,
            "requested_nanos": amount,
            "window_start": status.window_start.isoformat(),
        },
    )


def rate_limited(
    team: str, agent: str, *, requests_per_minute: int, tokens_per_minute: int, requests: int, tokens: int,
    retry_us: int,
) -> E.ResourceExhausted:
    """The RATE_LIMITED error from ``ledger_hold``'s refusal, with when to retry."""
    # Within the one-minute window by construction; clocks of ledger replicas that differ by a few
    # milliseconds must not push the hint past it.
    retry_s = min(max(retry_us, 1000), 60_000_000) / 1_000_000
    return E.ResourceExhausted(
        "RATE_LIMITED",
        f"rate limit reached for team {team}" + (f" agent {agent}" if agent else "")
        + f"; retry in {retry_s:.3f} s",
        {
            "team": team,
            "agent": agent,
            "requests_per_minute": requests_per_minute,
            "tokens_per_minute": tokens_per_minute,
            "requests_used": requests,
            "tokens_used": tokens,
            "retry_after_seconds": f"{retry_s:.3f}",
        },
        retry_delay_s=retry_s,
    )

"""What the ledger's plpgsql functions return, as typed values, decoded once.

``ledger_hold``, ``ledger_settle(_batch)``, ``ledger_release(_request)`` and ``ledger_capture``
return JSON; the repository hands it to the ``decode_*`` functions here and returns only these
frozen dataclasses. A shape that does not match (an unknown ``result``, a missing key) raises
:class:`ResultShapeError`, never a bare ``KeyError``.
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

from services.ledger import domain as D

T = TypeVar("T")


class ResultShapeError(ValueError):
    """A plpgsql function returned JSON this code does not know (schema and code disagree)."""


class HoldOutcome(enum.Enum):
    """``ledger_hold``'s ``result``."""

    GRANTED = "OK"
    DENIED = "DENIED"
    NO_SLICE = "NO_SLICE"
    RATE_LIMITED = "RATE_LIMITED"
    RATE_TOO_LARGE = "RATE_TOO_LARGE"
    NOT_PRICED = "NOT_PRICED"
    MISMATCH = "MISMATCH"
    ALREADY_SETTLED = "ALREADY_SETTLED"
    COST_OVERFLOW = "COST_OVERFLOW"
    NO_BUDGET = "NO_BUDGET"
    REQUEST_RELEASED = "REQUEST_RELEASED"


class SettleOutcome(enum.Enum):
    """``ledger_settle``'s ``result``."""

    SETTLED = "OK"
    MISMATCH = "MISMATCH"
    NOT_FOUND = "NOT_FOUND"
    NO_OPEN_HOLD = "NO_OPEN_HOLD"
    RESERVATION_MISMATCH = "RESERVATION_MISMATCH"
    COST_OVERFLOW = "COST_OVERFLOW"
    NOT_PRICED = "NOT_PRICED"


class DrawOutcome(enum.Enum):
    """One ``ledger_note_draws`` item's ``result``."""

    NOTED = "OK"
    # Recorded, but a budget the slice counts against is over its (lowered) limit.
    NOTED_OVER_LIMIT = "OVER_LIMIT"
    NOT_FOUND = "NOT_FOUND"
    NOT_A_SLICE = "NOT_A_SLICE"
    SLICE_CLOSED = "SLICE_CLOSED"


@dataclass(frozen=True)
class RateRefusal:
    """Why a hold hit a rate limit (RATE_LIMITED, RATE_TOO_LARGE)."""

    agent: str
    requests_per_minute: int
    tokens_per_minute: int
    requests: int
    tokens: int
    retry_us: int

    @property
    def kind(self) -> str:
        """Which limit refused: ``requests`` or ``tokens``."""
        return "requests" if self.requests_per_minute and self.requests >= self.requests_per_minute else "tokens"


@dataclass(frozen=True)
class HoldResult:
    """One ``ledger_hold`` call: a granted hold (with its budgets) or why not."""

    outcome: HoldOutcome
    hold: D.Hold | None = None
    budgets: tuple[D.BudgetStatus, ...] = ()
    replayed: bool = False
    denied_by: D.BudgetStatus | None = None  # DENIED: the budget that refused
    amount_nanos: int = 0  # DENIED, NO_SLICE: what the hold would have been
    rate: RateRefusal | None = None  # RATE_LIMITED, RATE_TOO_LARGE
    price_version: int = 0  # NOT_PRICED


@dataclass(frozen=True)
class Crossing:
    """A budget whose soft limit this spend crossed."""

    team: str
    agent: str
    window: D.Window
    soft_limit_nanos: int
    spent_nanos: int


@dataclass(frozen=True)
class SettleResult:
    """One ``ledger_settle`` item: the entry (new, replayed or captured) or why not."""

    outcome: SettleOutcome
    entry: D.SpendEntry | None = None
    replayed: bool = False
    captured: bool = False  # the sweeper captured the hold first; its entry stands
    was_released: bool = False  # the hold had been released before this settle
    budgets: tuple[D.BudgetStatus, ...] = ()
    crossings: tuple[Crossing, ...] = ()
    price_version: int = 0  # NOT_PRICED


@dataclass(frozen=True)
class ReleaseResult:
    """``ledger_release``: ``found`` False when there is no such reservation."""

    found: bool
    released: bool


@dataclass(frozen=True)
class CapturedHold:
    """An expired hold the sweeper charged at its full amount."""

    reservation_id: str
    request_id: str
    team: str
    amount_nanos: int


@dataclass(frozen=True)
class CaptureResult:
    """One ``ledger_capture`` batch."""

    captured: tuple[CapturedHold, ...]
    freed: int
    crossings: tuple[Crossing, ...] = field(default=())


def _decoding(what: str, fn: Callable[[Mapping[str, Any]], T], raw: object) -> T:
    if not isinstance(raw, Mapping):
        raise ResultShapeError(f"{what}: expected a JSON object, got {type(raw).__name__}")
    try:
        return fn(raw)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ResultShapeError):
            raise
        raise ResultShapeError(f"{what}: unexpected shape ({type(exc).__name__}: {exc})") from None


def budget_status(raw: Mapping[str, Any]) -> D.BudgetStatus:
    """A budget as ``ledger_budgets`` / ``ledger_hold`` return it."""
    return D.BudgetStatus(
        team=raw["team"],
        agent=raw["agent"],
        run=raw.get("run", ""),
        window=D.Window(raw["window"]),
        limit_nanos=int(raw["limit"]),
        soft_limit_nanos=int(raw["soft"]),
        spent_nanos=int(raw["spent"]),
        held_nanos=int(raw["held"]),
        window_start=D.from_us(int(raw["start_us"])),
    )


def _hold(raw: Mapping[str, Any]) -> D.Hold:
    return D.Hold(
        reservation_id=uuid.UUID(raw["id"]),
        request_id=raw["request_id"],
        attempt=int(raw["attempt"]),
        team=raw["team"],
        agent=raw["agent"],
        model=raw["model"],
        amount_nanos=int(raw["amount"]),
        price_version=int(raw["price_version"]),
        state=raw["state"],
        slice_calls=int(raw.get("slice_calls", 0)),
        created_at=D.from_us(int(raw["created_us"])),
        expires_at=D.from_us(int(raw["expires_us"])),
    )


def spend_entry(raw: Mapping[str, Any]) -> D.SpendEntry:
    """An entry as ``ledger_entry_json`` renders it."""
    return D.SpendEntry(
        id=int(raw["id"]),
        request_id=raw["request_id"],
        reservation_id=uuid.UUID(raw["reservation_id"]),
        team=raw["team"],
        agent=raw["agent"],
        model=raw["model"],
        provider=raw["provider"],
        provider_model=raw["provider_model"],
        usage=D.Usage(int(raw["input"]), int(raw["output"]), int(raw["cached"])),
        cost_nanos=int(raw["cost"]),
        held_nanos=int(raw["held"]),
        price_version=int(raw["price_version"]),
        outcome=D.Outcome(int(raw["outcome"])),
        flags=D.Flag(int(raw["flags"])),
        latency_us=int(raw["latency_us"]),
        created_at=D.from_us(int(raw["created_us"])),
        reserve_time=D.from_us(int(raw["reserve_us"])),
        run_id=raw.get("run_id", ""),
    )


def _crossings(raw: Mapping[str, Any]) -> tuple[Crossing, ...]:
    return tuple(
        Crossing(c["team"], c["agent"], D.Window(c["window"]), int(c["soft"]), int(c["spent"]))
        for c in raw.get("crossings") or ()
    )


def _rate(raw: Mapping[str, Any]) -> RateRefusal:
    return RateRefusal(
        agent=str(raw["agent"]),
        requests_per_minute=int(raw.get("rpm", 0)),
        tokens_per_minute=int(raw["tpm"]),
        requests=int(raw.get("requests", 0)),
        tokens=int(Decimal(str(raw["tokens"]))),
        retry_us=int(raw.get("retry_us", 0)),
    )


def _outcome(enum_type: type[Any], raw: Mapping[str, Any], what: str) -> Any:
    try:
        return enum_type(raw["result"])
    except ValueError:
        raise ResultShapeError(f"{what}: unknown result {raw['result']!r}") from None


def _hold_result(raw: Mapping[str, Any]) -> HoldResult:
    outcome: HoldOutcome = _outcome(HoldOutcome, raw, "ledger_hold")
    if outcome is HoldOutcome.GRANTED:
        return HoldResult(outcome, hold=_hold(raw["hold"]),
                          budgets=tuple(budget_status(b) for b in raw["budgets"]), replayed=bool(raw["replayed"]))
    if outcome is HoldOutcome.DENIED:
        return HoldResult(outcome, denied_by=budget_status(raw["budget"]), amount_nanos=int(raw["amount"]))
    if outcome is HoldOutcome.NO_SLICE:
        return HoldResult(outcome, amount_nanos=int(raw["amount"]))
    if outcome in (HoldOutcome.RATE_LIMITED, HoldOutcome.RATE_TOO_LARGE):
        return HoldResult(outcome, rate=_rate(raw))
    if outcome is HoldOutcome.NOT_PRICED:
        return HoldResult(outcome, price_version=int(raw["price_version"]))
    return HoldResult(outcome)


def _settle_result(raw: Mapping[str, Any]) -> SettleResult:
    outcome: SettleOutcome = _outcome(SettleOutcome, raw, "ledger_settle")
    if outcome is SettleOutcome.SETTLED:
        return SettleResult(
            outcome,
            entry=spend_entry(raw["entry"]),
            replayed=bool(raw["replayed"]),
            captured=bool(raw.get("captured", False)),
            was_released=raw.get("was_state") == "RELEASED",
            budgets=tuple(budget_status(b) for b in raw.get("budgets") or ()),
            crossings=_crossings(raw),
        )
    if outcome is SettleOutcome.NOT_PRICED:
        return SettleResult(outcome, price_version=int(raw["price_version"]))
    return SettleResult(outcome)


def _release_result(raw: Mapping[str, Any]) -> ReleaseResult:
    if raw["result"] == "NOT_FOUND":
        return ReleaseResult(found=False, released=False)
    return ReleaseResult(found=True, released=bool(raw["released"]))


def _capture_result(raw: Mapping[str, Any]) -> CaptureResult:
    return CaptureResult(
        captured=tuple(
            CapturedHold(str(c["id"]), str(c["request_id"]), str(c["team"]), int(c["amount"]))
            for c in raw["captured"]
        ),
        freed=int(raw["freed"]),
        crossings=_crossings(raw),
    )


def decode_hold(raw: object) -> HoldResult:
    """``ledger_hold``'s JSON."""
    return _decoding("ledger_hold", _hold_result, raw)


def decode_settle(raw: object) -> SettleResult:
    """One ``ledger_settle`` (or ``ledger_settle_batch`` item) JSON."""
    return _decoding("ledger_settle", _settle_result, raw)


def decode_release(raw: object) -> ReleaseResult:
    """``ledger_release``'s JSON."""
    return _decoding("ledger_release", _release_result, raw)


def decode_draws(raw: object, n: int) -> list[DrawOutcome]:
    """``ledger_note_draws``'s JSON: one outcome per draw, ``n`` of them."""
    if not isinstance(raw, list) or len(raw) != n:
        raise ResultShapeError("ledger_note_draws: expected one JSON result per draw")
    return [_decoding("ledger_note_draws", lambda r: _outcome(DrawOutcome, r, "ledger_note_draws"), r) for r in raw]


def decode_released_count(raw: object) -> int:
    """``ledger_release_request``'s JSON: how many holds it freed."""
    return _decoding("ledger_release_request", lambda r: int(r["released"]), raw)


def decode_capture(raw: object) -> CaptureResult:
    """``ledger_capture``'s JSON."""
    return _decoding("ledger_capture", _capture_result, raw)


def decode_budgets(raw: object) -> list[D.BudgetStatus]:
    """``ledger_budgets``' JSON array."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ResultShapeError(f"ledger_budgets: expected a JSON array, got {type(raw).__name__}")
    return [_decoding("ledger_budgets", budget_status, b) for b in raw]


def budget_config(raw: Mapping[str, Any]) -> D.BudgetConfig:
    """A ``budgets`` row (``limit_nanos`` / ``soft_limit_nanos`` columns, or ``ledger_set_budget``'s
    ``limit`` / ``soft`` keys)."""
    def row() -> D.BudgetConfig:
        limit = raw["limit_nanos"] if "limit_nanos" in raw else raw["limit"]
        soft = raw["soft_limit_nanos"] if "soft_limit_nanos" in raw else raw["soft"]
        return D.BudgetConfig(raw["team"], raw["agent"], D.Window(raw["window"]), int(limit), int(soft),
                              raw["updated_at"], raw.get("run", ""))
    return _decoding("budget row", lambda _: row(), raw)


def rate_limit(raw: Mapping[str, Any]) -> D.RateLimit:
    """A rate limit: a ``rate_limits`` row, or ``ledger_rate_limits``' item with the last 60 s's use."""
    def row() -> D.RateLimit:
        if "rpm" in raw:
            return D.RateLimit(raw["team"], raw["agent"], int(raw["rpm"]), int(raw["tpm"]), int(raw["requests"]),
                               int(Decimal(str(raw["tokens"]))), D.from_us(int(raw["updated_us"])))
        return D.RateLimit(raw["team"], raw["agent"], int(raw["requests_per_minute"]),
                           int(raw["tokens_per_minute"]), 0, 0, raw["updated_at"])
    return _decoding("rate limit row", lambda _: row(), raw)


def spend_total(raw: Mapping[str, Any]) -> D.SpendTotal:
    """One group of ``list_spend``'s totals (the group's columns present, the others absent)."""
    def row() -> D.SpendTotal:
        day = raw.get("day")
        return D.SpendTotal(
            team=raw.get("team") or "",
            agent=raw.get("agent") or "",
            model=raw.get("model") or "",
            provider=raw.get("provider") or "",
            run=raw.get("run_id") or "",
            day=day.replace(tzinfo=dt.UTC) if day is not None else None,
            request_count=int(raw["n"]),
            usage=D.Usage(int(raw["input"]), int(raw["output"]), int(raw["cached"])),
            cost_nanos=int(raw["cost"]),
        )
    return _decoding("spend total row", lambda _: row(), raw)

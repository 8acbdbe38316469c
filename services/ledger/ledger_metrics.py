"""The ledger's Prometheus metrics, its clock, and the two updates every use case shares."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge

from services.ledger import domain as D
from services.ledger.results import Crossing

_LOGGER = logging.getLogger("services.ledger.service")

Clock = Callable[[], dt.datetime]


def utcnow() -> dt.datetime:
    """The real clock."""
    return dt.datetime.now(dt.UTC)


class LedgerMetrics:
    """The ledger's own Prometheus metrics, on the runtime's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.reserves = Counter(
            "igw_ledger_reserves", "Reserve calls by outcome.", ["outcome"], registry=registry
        )
        self.settles = Counter("igw_ledger_settles", "Settle calls by outcome.", ["outcome"], registry=registry)
        self.slice_draws = Counter(
            "igw_ledger_slice_draws", "Slice draws noted (NoteSliceDraws items) by outcome.", ["outcome"],
            registry=registry,
        )
        self.releases = Counter(
            "igw_ledger_releases", "Release calls by outcome.", ["outcome"], registry=registry
        )
        self.denials = Counter(
            "igw_ledger_budget_denials", "Reserves refused for budget, by team.", ["team"], registry=registry
        )
        self.captured = Counter(
            "igw_ledger_holds_captured", "Expired holds captured at their full amount.", registry=registry
        )
        self.captured_nanos = Counter(
            "igw_ledger_holds_captured_nanodollars", "Nano-dollars captured from expired holds.", registry=registry
        )
        self.soft_crossings = Counter(
            "igw_ledger_soft_limit_crossings",
            "Soft limits crossed (once per budget window), by team.",
            ["team"],
            registry=registry,
        )
        self.remaining = Gauge(
            "igw_ledger_remaining_budget_nanodollars",
            "Smallest remaining team-wide budget in the current window, by team.",
            ["team"],
            registry=registry,
        )
        self.spend = Counter(
            "igw_ledger_spend_nanodollars", "Nano-dollars settled or captured, by team.", ["team"], registry=registry
        )
        self.rate_limited = Counter(
            "igw_ledger_rate_limited", "Holds refused by a rate limit, by team and limit kind.", ["team", "kind"],
            registry=registry,
        )
        self.rpm_limit = Gauge(
            "igw_ledger_rate_limit_requests_per_minute", "Configured requests-per-minute limit, by team and agent"
            " (agent empty: team-wide).", ["team", "agent"], registry=registry,
        )
        self.tpm_limit = Gauge(
            "igw_ledger_rate_limit_tokens_per_minute", "Configured input+output tokens-per-minute limit, by team and"
            " agent (agent empty: team-wide).", ["team", "agent"], registry=registry,
        )
        self.partitions = Gauge(
            "igw_ledger_spend_partitions", "Monthly spend-entry partitions attached.", registry=registry
        )


def record_crossings(metrics: LedgerMetrics, crossings: Sequence[Crossing]) -> None:
    """Counts and logs each soft-limit crossing."""
    for c in crossings:
        metrics.soft_crossings.labels(c.team).inc()
        _LOGGER.warning(
            "soft budget limit crossed",
            extra={"event": "soft_limit_crossed", "team": c.team, "agent": c.agent,
                   "window": c.window.name, "soft_limit_nanos": c.soft_limit_nanos,
                   "spent_nanos": c.spent_nanos},
        )


def update_remaining(metrics: LedgerMetrics, team: str, budgets: Sequence[D.BudgetStatus]) -> None:
    """Sets the team's remaining gauge from its team-wide budgets."""
    team_wide = [b.remaining_nanos for b in budgets if not b.agent and not b.run]
    if team_wide:
        metrics.remaining.labels(team).set(min(team_wide))

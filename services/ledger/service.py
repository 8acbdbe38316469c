"""The ledger's use cases: validate, call the repository, turn results into domain values.

Decisions where the issue is silent (also in the report):

- A team (and agent) that no budget applies to is refused: ``FAILED_PRECONDITION / NO_BUDGET``
  (an operator must act; waiting or retrying changes nothing, which is what FAILED_PRECONDITION
  says and RESOURCE_EXHAUSTED does not). ``IGW_LEDGER_ALLOW_UNBUDGETED=true`` lets such teams
  spend without limit; they still get holds, so their spend is exact and visible. A budget
  created later (mid-window) starts from what the team (or the
  agent) already spent in the current window, counting entries in the window of their
  reservation, and the team's holds still open in that window count in it too; all in SQL
  (``ledger_set_budget``), under the team's advisory lock that Reserve takes shared.
- Release by request id (a call that ended early) frees every open hold of the request and
  records the request as released; a later Reserve for it is ``FAILED_PRECONDITION /
  REQUEST_RELEASED`` and creates nothing. The record is kept a day (``RELEASE_RECORD_DAYS``),
  far longer than any Reserve can be in flight, then purged by the sweeper.
- Settle with an empty reservation_id settles the request's open hold of its latest attempt
  (``NOT_FOUND / OPEN_HOLD_NOT_FOUND`` when there is none); a replay without reservation_id
  is judged on the payload alone.
- Reserve is idempotent on (request_id, attempt); the same key with another team, agent,
  model or token bounds is ``ABORTED / IDEMPOTENCY_MISMATCH``. A Reserve for a request
  that already has a spend entry is ``FAILED_PRECONDITION / ALREADY_SETTLED``.
- Settle is idempotent on request_id. A different reservation, usage, provider, provider
  model, outcome or usage_estimated under the same id is ``ABORTED / IDEMPOTENCY_MISMATCH``
  (latency is reporting only and not compared). A Settle arriving after the sweeper
  captured the hold returns the captured entry (full hold amount, UNSETTLED_CAPTURE) as a
  replay and logs a warning: entries are append-only and one per request id, and the
  capture never undercharges.
- Settling a hold the router released earlier still records the spend (spend is never
  lost), in the hold's windows, flagged OVER_HOLD when above the hold.
- A captured hold's entry has outcome UNSPECIFIED (unknown) and zero tokens: the amount is
  charged, no usage is invented.
  An expired hold of a request that already has an entry (an earlier attempt that leaked)
  is freed rather than captured: one entry per request id wins.
"""

from __future__ import annotations

import logging

from services.ledger.budgets import BudgetUseCases
from services.ledger.draws import DrawUseCases
from services.ledger.holds import RELEASE_RECORD_DAYS, HoldUseCases
from services.ledger.ledger_metrics import Clock, LedgerMetrics, utcnow
from services.ledger.pricing import default_prices
from services.ledger.repository import Repository
from services.ledger.spend import SpendUseCases

__all__ = ["RELEASE_RECORD_DAYS", "Clock", "LedgerMetrics", "LedgerService", "utcnow"]

_LOGGER = logging.getLogger(__name__)


class LedgerService(HoldUseCases, DrawUseCases, BudgetUseCases, SpendUseCases):
    """Reserve / Settle / Release / capture and the operator reads, over one repository.

    The use cases are grouped by responsibility: :mod:`services.ledger.holds` (the data plane),
    :mod:`services.ledger.draws` (the calls drawn from budget slices),
    :mod:`services.ledger.budgets` (budgets, rate limits, maintenance), :mod:`services.ledger.spend`
    (spend reports and prices).
    """

    def __init__(
        self,
        repo: Repository,
        metrics: LedgerMetrics,
        *,
        now: Clock = utcnow,
        hold_ttl_seconds: int = 300,
        partitions_ahead_months: int = 3,
        retention_days: int = 0,
    ) -> None:
        self.repo = repo
        self.metrics = metrics
        self.now = now
        self.hold_ttl_us = hold_ttl_seconds * 1_000_000
        self.partitions_ahead_months = partitions_ahead_months
        self.retention_days = retention_days

    # ------------------------------------------------------------ startup

    async def seed_default_prices(self) -> bool:
        """Loads the shipped catalogue as version 1 when the catalogue is empty."""
        seeded = await self.repo.seed_prices(default_prices(), self.now())
        if seeded:
            _LOGGER.info("loaded the default price catalogue as version 1")
        return seeded

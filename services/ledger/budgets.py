"""The ledger's budgets and rate limits: reads, operator writes, partition maintenance."""

from __future__ import annotations

import datetime as dt
import logging

from services.common import errors as E
from services.ledger import domain as D
from services.ledger.ledger_metrics import Clock, LedgerMetrics
from services.ledger.page_tokens import bad_token, bounded_page_size, decode_parts, encode_parts
from services.ledger.repository import Repository

_LOGGER = logging.getLogger("services.ledger.service")


class BudgetUseCases:
    """Budgets, rate limits and maintenance (mixed into :class:`~services.ledger.service.LedgerService`)."""

    repo: Repository
    metrics: LedgerMetrics
    now: Clock
    partitions_ahead_months: int
    retention_days: int

    async def get_budget(self, *, team: str, agent: str = "") -> list[D.BudgetStatus]:
        """Every budget that applies to the team (and agent), in its current window."""
        D.check_principal("team", team)
        D.check_principal("agent", agent, required=False)
        return await self.repo.budgets(team, agent, self.now())

    async def set_budget(
        self, *, team: str, agent: str, window: int, limit_nanos: int, soft_limit_nanos: int = 0, run: str = ""
    ) -> D.BudgetConfig:
        """Creates or replaces a budget (of a team, an agent, or a run: TOTAL window, no agent)."""
        D.check_principal("team", team)
        D.check_principal("agent", agent, required=False)
        D.check_name("run", run, required=False)
        if run and window == 0:
            window = D.Window.TOTAL
        if run and (agent or window != D.Window.TOTAL):
            raise E.InvalidArgument(
                "INVALID_RUN_BUDGET", "a run budget has no agent and the TOTAL window", {"field": "run"})
        if window not in (1, 2, 3, 4):
            raise E.InvalidArgument("INVALID_WINDOW", "window is required", {"field": "window"})
        D.check_amount("limit_nanos", limit_nanos)
        D.check_amount("soft_limit_nanos", soft_limit_nanos)
        if soft_limit_nanos > limit_nanos:
            raise E.InvalidArgument(
                "INVALID_AMOUNT", "soft_limit_nanos cannot exceed limit_nanos", {"field": "soft_limit_nanos"}
            )
        budget = await self.repo.set_budget(team, agent, window, limit_nanos, soft_limit_nanos, self.now(), run)
        _LOGGER.info(
            "budget set",
            extra={"team": team, "agent": agent, "run": run, "window": D.Window(window).name,
                   "limit_nanos": limit_nanos},
        )
        return budget

    async def list_budgets(
        self, *, team: str = "", include_runs: bool = False, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[D.BudgetConfig], str]:
        """Configured budgets ordered by (team, run, agent, window), paged; (budgets, next token)."""
        D.check_principal("team", team, required=False)
        size = bounded_page_size(page_size, 100, 1000)
        after: tuple[str, str, str, int] | None = None
        if page_token:
            parts = decode_parts(page_token, 4)
            try:
                after = (parts[0], parts[1], parts[2], int(parts[3]))
            except ValueError:
                raise bad_token() from None
        budgets = await self.repo.list_budgets(team, include_runs, size + 1, after)
        out = budgets[:size]
        token = ""
        if len(budgets) > size:
            last = out[-1]
            token = encode_parts(last.team, last.run, last.agent, str(int(last.window)))
        return out, token

    async def delete_budget(self, *, team: str, agent: str = "", window: int, run: str = "") -> D.BudgetConfig:
        """Deletes one budget; NOT_FOUND / BUDGET_NOT_FOUND when there is none."""
        D.check_principal("team", team)
        D.check_principal("agent", agent, required=False)
        D.check_name("run", run, required=False)
        if run and window == 0:
            window = D.Window.TOTAL
        if window not in (1, 2, 3, 4):
            raise E.InvalidArgument("INVALID_WINDOW", "window is required", {"field": "window"})
        deleted = await self.repo.delete_budget(team, agent, run, window)
        if deleted is None:
            raise E.NotFound(
                "BUDGET_NOT_FOUND", "no such budget",
                {"team": team, "agent": agent, "run": run, "window": D.Window(window).name},
            )
        _LOGGER.info("budget deleted", extra={"team": team, "agent": agent, "run": run,
                                              "window": D.Window(window).name})
        return deleted

    async def set_rate_limit(
        self, *, team: str, agent: str = "", requests_per_minute: int = 0, tokens_per_minute: int = 0
    ) -> D.RateLimit:
        """Sets (or, both 0, clears) a team's or agent's rate limits."""
        D.check_principal("team", team)
        D.check_principal("agent", agent, required=False)
        D.check_amount("requests_per_minute", requests_per_minute)
        D.check_amount("tokens_per_minute", tokens_per_minute)
        limit = await self.repo.set_rate_limit(team, agent, requests_per_minute, tokens_per_minute, self.now())
        self.metrics.rpm_limit.labels(team, agent).set(requests_per_minute)
        self.metrics.tpm_limit.labels(team, agent).set(tokens_per_minute)
        _LOGGER.info("rate limit set", extra={"team": team, "agent": agent, "requests_per_minute": requests_per_minute,
                                              "tokens_per_minute": tokens_per_minute})
        return limit

    async def get_rate_limits(self, *, team: str) -> list[D.RateLimit]:
        """The team's limits (team-wide first, then its agents') with the last 60 s's use."""
        D.check_principal("team", team)
        return await self.repo.rate_limits(team, self.now())

    async def refresh_limit_metrics(self) -> None:
        """Sets the limit gauges from the database (every replica shows every limit)."""
        for team, agent, rpm, tpm in await self.repo.all_rate_limits():
            self.metrics.rpm_limit.labels(team, agent).set(rpm)
            self.metrics.tpm_limit.labels(team, agent).set(tpm)

    async def maintain(self) -> D.Maintenance:
        """Creates the spend partitions due ahead; drops those past retention; prunes rate events."""
        now = self.now()
        cutoff = now - dt.timedelta(days=self.retention_days) if self.retention_days else None
        created, dropped, names = await self.repo.maintain_partitions(now, self.partitions_ahead_months, cutoff)
        for name in created:
            _LOGGER.info("spend partition created", extra={"partition": name})
        for name in dropped:
            _LOGGER.warning("spend partition dropped (retention)", extra={"partition": name,
                                                                          "retention_days": self.retention_days})
        self.metrics.partitions.set(len(names))
        await self.repo.prune_rate_events(now)
        await self.refresh_limit_metrics()
        return D.Maintenance(created, dropped, names)

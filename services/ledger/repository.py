"""The ledger's repository: every query, each one round trip on the hot paths (the plpgsql
functions in ``services/ledger/sql``), with typed results decoded once (:mod:`services.ledger.results`).

The hold/settle/release/capture calls are here; the operator queries are in
:mod:`services.ledger.admin_queries`, the spend and price reads in :mod:`services.ledger.report_queries`,
and the pool with its retries and fault handling in :mod:`services.ledger.database`.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from services.ledger.admin_queries import EPOCH, AdminQueries
from services.ledger.database import CONFLICT_RETRIES, Conn, Database, libpq_dsn
from services.ledger.domain import BudgetStatus
from services.ledger.report_queries import DEFAULT_CATALOGUE_REQUEST_ID, PRICES_LOCK_KEY, ReportQueries
from services.ledger.results import (
    CaptureResult,
    DrawOutcome,
    HoldResult,
    ReleaseResult,
    ResultShapeError,
    SettleResult,
    decode_budgets,
    decode_capture,
    decode_draws,
    decode_hold,
    decode_release,
    decode_released_count,
    decode_settle,
)

__all__ = [
    "CONFLICT_RETRIES", "DEFAULT_CATALOGUE_REQUEST_ID", "EPOCH", "PRICES_LOCK_KEY", "Conn", "Database",
    "DrawArgs", "Repository", "SettleArgs", "libpq_dsn",
]


@dataclass(frozen=True)
class DrawArgs:
    """One validated slice draw (or withdrawal) as ``ledger_note_draws`` takes it."""

    reservation_id: uuid.UUID
    request_id: str
    held_nanos: int
    withdrawn: bool


@dataclass(frozen=True)
class SettleArgs:
    """One validated settle as ``ledger_settle`` takes it (without ``now``)."""

    request_id: str
    reservation_id: uuid.UUID | None  # None: the request's latest open hold
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    provider: str
    provider_model: str
    outcome: int
    latency_us: int
    usage_estimated: bool

    def columns(self) -> tuple[str, uuid.UUID | None, int, int, int, str, str, int, int, bool]:
        """The values in ``ledger_settle``'s parameter order."""
        return (self.request_id, self.reservation_id, self.input_tokens, self.output_tokens,
                self.cached_input_tokens, self.provider, self.provider_model, self.outcome,
                self.latency_us, self.usage_estimated)


class Repository(AdminQueries, ReportQueries):
    """The ledger's database: holds, settles, releases and captures here; the operator and
    report queries from its bases."""

    async def reserve(
        self,
        hold_id: uuid.UUID,
        request_id: str,
        attempt: int,
        team: str,
        agent: str,
        model: str,
        provider: str,
        prompt_tokens: int,
        max_output_tokens: int,
        ttl_us: int,
        now: dt.datetime,
        slice_calls: int = 0,
        run_id: str = "",
        run_cap_nanos: int = 0,
    ) -> HoldResult:
        """Calls ``ledger_hold`` (a call's hold, or a slice of ``slice_calls`` calls, optionally
        for a run): granted, or why not (:class:`HoldOutcome`)."""
        return decode_hold(await self._call(
            "reserve" if not slice_calls else "acquire_slice",
            "SELECT ledger_hold(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (hold_id, request_id, attempt, team, agent, model, provider, prompt_tokens,
             max_output_tokens, slice_calls, ttl_us, now, run_id, run_cap_nanos),
        ))

    async def settle(self, item: SettleArgs, now: dt.datetime) -> SettleResult:
        """Calls ``ledger_settle``; no reservation id settles the request's latest open hold."""
        return decode_settle(await self._call(
            "settle",
            "SELECT ledger_settle(%s, %s::uuid, %s, %s, %s, %s, %s, %s::smallint, %s, %s, %s)",
            (*item.columns(), now),
        ))

    async def settle_batch(self, items: Sequence[SettleArgs], now: dt.datetime) -> list[SettleResult]:
        """Calls ``ledger_settle_batch``: every item settled in one transaction, one result each.

        Each item is ``ledger_settle`` (same results, same idempotency); the batch commits once.
        """
        cols = list(zip(*(i.columns() for i in items), strict=True))
        raw = await self._call(
            "settle_batch",
            "SELECT ledger_settle_batch(%s::text[], %s::uuid[], %s::bigint[], %s::bigint[], %s::bigint[],"
            " %s::text[], %s::text[], %s::smallint[], %s::bigint[], %s::boolean[], %s)",
            (*(list(c) for c in cols), now),
        )
        if not isinstance(raw, list) or len(raw) != len(items):
            raise ResultShapeError("ledger_settle_batch: expected one JSON result per item")
        return [decode_settle(r) for r in raw]

    async def note_draws(self, draws: Sequence[DrawArgs], now: dt.datetime) -> list[DrawOutcome]:
        """Calls ``ledger_note_draws``: records (or withdraws) slice draws in one transaction."""
        raw = await self._call(
            "note_draws",
            "SELECT ledger_note_draws(%s::uuid[], %s::text[], %s::bigint[], %s::boolean[], %s)",
            ([d.reservation_id for d in draws], [d.request_id for d in draws], [d.held_nanos for d in draws],
             [d.withdrawn for d in draws], now),
        )
        return decode_draws(raw, len(draws))

    async def release(self, reservation_id: uuid.UUID, reason: str, now: dt.datetime) -> ReleaseResult:
        """Calls ``ledger_release``."""
        return decode_release(await self._call(
            "release", "SELECT ledger_release(%s, %s, %s)", (reservation_id, reason, now)
        ))

    async def release_request(self, request_id: str, reason: str, now: dt.datetime) -> int:
        """Calls ``ledger_release_request``: frees the request's open holds and refuses later ones;
        returns how many holds it freed."""
        return decode_released_count(await self._call(
            "release_request", "SELECT ledger_release_request(%s, %s, %s)", (request_id, reason, now)
        ))

    async def purge_request_releases(self, before: dt.datetime, limit: int) -> int:
        """Deletes up to ``limit`` request-release records older than ``before``; returns how many."""

        async def go(conn: Conn) -> int:
            cur = await conn.execute(
                "DELETE FROM request_releases WHERE request_id IN (SELECT request_id FROM request_releases"
                " WHERE released_at < %s LIMIT %s)",
                (before, limit),
            )
            return cur.rowcount

        return await self._run("purge_request_releases", go)

    async def capture(self, now: dt.datetime, limit: int) -> CaptureResult:
        """Calls ``ledger_capture`` for one batch of expired holds."""
        return decode_capture(await self._call("capture", "SELECT ledger_capture(%s, %s)", (now, limit)))

    async def budgets(self, team: str, agent: str, now: dt.datetime) -> list[BudgetStatus]:
        """The budgets applying to (team, agent) in their current windows."""
        return decode_budgets(await self._call(
            "budgets", "SELECT ledger_budgets(%s, %s, '', %s)", (team, agent, now)
        ))

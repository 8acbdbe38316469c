"""Helpers shared by the ledger's integration tests: a migrated database, a service with an
injectable clock, an in-process gRPC server, and invariant checks read from the database."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry

from services.common import db
from services.common.server import ServiceRuntime
from services.common.settings import RuntimeSettings
from services.ledger.authz import POLICY
from services.ledger.config import LedgerSettings
from services.ledger.repository import libpq_dsn
from services.ledger.server import SERVICE_NAMES, open_service, registrar
from services.ledger.service import LedgerService

MILLI = 1_000_000  # nano-dollars in a milli-dollar


class FakeClock:
    """A settable UTC clock: ``clock()`` returns ``clock.t``."""

    def __init__(self, t: dt.datetime | None = None) -> None:
        self.t = t or dt.datetime(2025, 3, 10, 12, 0, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.t

    def advance(self, **kw: float) -> None:
        self.t += dt.timedelta(**kw)


@asynccontextmanager
async def ledger_service(
    url: str, *, clock: Any = None, pool_size: int = 20, migrate: bool = True, ttl: int = 300,
    allow_unbudgeted: bool = False,
) -> AsyncIterator[LedgerService]:
    """A migrated, seeded ledger service on ``url`` (closed on exit).

    ``allow_unbudgeted`` is the operator's IGW_LEDGER_ALLOW_UNBUDGETED (off, as in production,
    unless a test is about teams without a budget).
    """
    settings = LedgerSettings(
        database_url=url, pool_size=pool_size, migrate=migrate, hold_ttl_seconds=ttl,
        allow_unbudgeted=allow_unbudgeted,
    )
    kwargs = {"now": clock} if clock is not None else {}
    svc = await open_service(settings, CollectorRegistry(), **kwargs)
    try:
        yield svc
    finally:
        await svc.repo.close()


@asynccontextmanager
async def grpc_server(service: LedgerService, pki: Path) -> AsyncIterator[ServiceRuntime]:
    """The ledger servicers behind the real runtime (mTLS, authz, error mapping) on port 0."""
    env = {
        "IGW_TLS_CERT": str(pki / "ledger.pem"),
        "IGW_TLS_KEY": str(pki / "ledger-key.pem"),
        "IGW_TLS_CA": str(pki / "ca.pem"),
    }
    runtime = ServiceRuntime(
        RuntimeSettings.from_env("ledger", env),
        policy=POLICY,
        registrars=[registrar(service)],
        service_names=SERVICE_NAMES,
        registry=CollectorRegistry(),
        access_log=False,
    )
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.server.stop(0)
        await runtime.probe_server.stop(0)
        if runtime._metrics_httpd is not None:
            runtime._metrics_httpd.shutdown()


def sql(url: str, query: str, params: Any = ()) -> list[tuple[Any, ...]]:
    """Runs one query on a fresh connection (test inspection only)."""
    with psycopg.connect(libpq_dsn(url), autocommit=True) as conn:
        cur = conn.execute(query, params or None)
        return cur.fetchall() if cur.description else []


def check_invariants(url: str) -> None:
    """What must hold in the database after any sequence of operations.

    A counter's spend is every entry of its team (for an agent budget, of that agent) reserved
    in its window, whether the entry's hold counted in the budget or was settled before the
    budget was created mid-window ("carried in": ``ledger_set_budget`` seeds it). Its held
    amount is the open holds counting in it.
    """
    # Counters equal what entries and open holds say, for every counter.
    mismatch = sql(
        url,
        """
        WITH held AS (
          SELECT u.b, u.w, sum(h.amount_nanos) AS held
          FROM holds h, unnest(h.budget_ids, h.window_starts) AS u(b, w)
          WHERE h.state = 'OPEN' GROUP BY u.b, u.w
        ), spent AS (
          SELECT c.budget_id AS b, c.window_start AS w, sum(e.cost_nanos) AS spent
          FROM budget_counters c JOIN budgets bu ON bu.id = c.budget_id
          JOIN spend_entries e ON e.team = bu.team AND (bu.agent = '' OR e.agent = bu.agent)
           AND (bu.run = '' OR e.run_id = bu.run)
           AND ledger_window_start(bu."window", e.reserve_time) = c.window_start
          GROUP BY c.budget_id, c.window_start
        )
        SELECT c.budget_id, c.window_start, c.spent_nanos, c.held_nanos, s.spent, h.held
        FROM budget_counters c
        LEFT JOIN spent s ON s.b = c.budget_id AND s.w = c.window_start
        LEFT JOIN held h ON h.b = c.budget_id AND h.w = c.window_start
        WHERE c.spent_nanos <> coalesce(s.spent, 0) OR c.held_nanos <> coalesce(h.held, 0)
        """,
    )
    assert mismatch == [], f"counters disagree with entries/holds: {mismatch}"
    # Hard budget: what was admitted under a budget never passes its limit. Spend carried in
    # from before the budget existed may (Reserve then refuses everything), and is set aside.
    over = sql(
        url,
        """
        WITH carried AS (
          SELECT c.budget_id AS b, c.window_start AS w, sum(e.cost_nanos) AS carried
          FROM budget_counters c JOIN budgets bu ON bu.id = c.budget_id
          JOIN spend_entries e ON e.team = bu.team AND (bu.agent = '' OR e.agent = bu.agent)
           AND (bu.run = '' OR e.run_id = bu.run)
           AND ledger_window_start(bu."window", e.reserve_time) = c.window_start
          JOIN holds h ON h.id = e.reservation_id
          WHERE NOT EXISTS (SELECT 1 FROM unnest(h.budget_ids, h.window_starts) AS u(b, w)
                            WHERE u.b = c.budget_id AND u.w = c.window_start)
          GROUP BY c.budget_id, c.window_start
        )
        SELECT b.team, b.agent, b.window, c.window_start, c.spent_nanos, c.held_nanos, b.limit_nanos,
               coalesce(k.carried, 0)
        FROM budget_counters c JOIN budgets b ON b.id = c.budget_id
        LEFT JOIN carried k ON k.b = c.budget_id AND k.w = c.window_start
        WHERE c.spent_nanos - coalesce(k.carried, 0) + c.held_nanos > b.limit_nanos
        """,
    )
    assert over == [], f"budgets overspent: {over}"
    # The hourly rollup says what the entries say (ListSpend reads it for whole hours).
    rollup = sql(
        url,
        """
        SELECT coalesce(e.team, r.team), e.n, r.n, e.cost, r.cost FROM
          (SELECT team, count(*) AS n, sum(cost_nanos) AS cost FROM spend_entries GROUP BY team) e
          FULL JOIN (SELECT team, sum(request_count) AS n, sum(cost_nanos) AS cost FROM spend_rollup_hourly
                     GROUP BY team) r ON r.team = e.team
        WHERE e.n IS DISTINCT FROM r.n OR e.cost IS DISTINCT FROM r.cost
        """,
    )
    assert rollup == [], f"rollup disagrees with entries: {rollup}"
    # One entry per request id (also a UNIQUE constraint; checked anyway).
    dup = sql(url, "SELECT request_id FROM spend_entries GROUP BY request_id HAVING count(*) > 1")
    assert dup == []
    # Every entry belongs to a closed hold of its request, or was drawn from a budget slice (whose
    # calls settle against it by their own request ids while it stays open).
    orphans = sql(
        url,
        "SELECT e.request_id FROM spend_entries e LEFT JOIN holds h ON h.id = e.reservation_id"
        " WHERE h.id IS NULL OR (h.slice_calls = 0 AND (h.request_id <> e.request_id"
        " OR h.state NOT IN ('SETTLED', 'CAPTURED')))",
    )
    assert orphans == [], f"entries without their hold: {orphans}"


def migrate(url: str) -> None:
    """upgrade head."""
    db.upgrade("ledger", url)

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
    url: str, *, clock: Any = None, pool_size: int = 20, migrate: bool = True, ttl: int = 300
) -> AsyncIterator[LedgerService]:
    """A migrated, seeded ledger service on ``url`` (closed on exit)."""
    settings = LedgerSettings(database_url=url, pool_size=pool_size, migrate=migrate, hold_ttl_seconds=ttl)
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
    """What must hold in the database after any sequence of operations."""
    # Hard budget: no counter ever above its limit.
    over = sql(
        url,
        "SELECT b.team, b.agent, b.window, c.window_start, c.spent_nanos, c.held_nanos, b.limit_nanos"
        " FROM budget_counters c JOIN budgets b ON b.id = c.budget_id"
        " WHERE c.spent_nanos + c.held_nanos > b.limit_nanos",
    )
    assert over == [], f"budgets overspent: {over}"
    # One entry per request id (also a UNIQUE constraint; checked anyway).
    dup = sql(url, "SELECT request_id FROM spend_entries GROUP BY request_id HAVING count(*) > 1")
    assert dup == []
    # Counters equal what entries and open holds say, for every counter.
    mismatch = sql(
        url,
        """
        WITH k AS (
          SELECT h.id, h.state, h.amount_nanos, u.b, u.w
          FROM holds h, unnest(h.budget_ids, h.window_starts) AS u(b, w)
        ), expect AS (
          SELECT k.b, k.w,
                 coalesce(sum(e.cost_nanos), 0) AS spent,
                 coalesce(sum(k.amount_nanos) FILTER (WHERE k.state = 'OPEN'), 0) AS held
          FROM k LEFT JOIN spend_entries e ON e.reservation_id = k.id
          GROUP BY k.b, k.w
        )
        SELECT c.budget_id, c.window_start, c.spent_nanos, c.held_nanos, x.spent, x.held
        FROM budget_counters c LEFT JOIN expect x ON x.b = c.budget_id AND x.w = c.window_start
        WHERE c.spent_nanos <> coalesce(x.spent, 0) OR c.held_nanos <> coalesce(x.held, 0)
        """,
    )
    assert mismatch == [], f"counters disagree with entries/holds: {mismatch}"
    # Every entry belongs to a closed hold of its request.
    orphans = sql(
        url,
        "SELECT e.request_id FROM spend_entries e LEFT JOIN holds h ON h.id = e.reservation_id"
        " WHERE h.id IS NULL OR h.request_id <> e.request_id OR h.state NOT IN ('SETTLED', 'CAPTURED')",
    )
    assert orphans == [], f"entries without their hold: {orphans}"


def migrate(url: str) -> None:
    """upgrade head."""
    db.upgrade("ledger", url)

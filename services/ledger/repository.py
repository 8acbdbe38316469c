"""Postgres access for the ledger: one pooled psycopg 3 connection per call, one round trip
on the hot paths (the plpgsql functions created by ``migrations/ledger``).

Fault handling lives here, once:

- a connection error (Postgres restarted, backend killed) drops the dead idle connections
  (``pool.check()``) and retries once; every mutating call is idempotent (request id,
  reservation id), so a retry after an ambiguous commit counts nothing twice;
- serialization failures and deadlocks are retried a bounded number of times with jitter;
- no connection within ``timeout`` seconds (Postgres down) fails fast.

Whatever still fails becomes ``Unavailable("DATABASE_UNAVAILABLE")``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from sqlalchemy.engine import make_url

from services.common import errors as E
from services.ledger.pricing import ModelPrice

_LOGGER = logging.getLogger(__name__)
T = TypeVar("T")

CONFLICT_RETRIES = 5
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# pg_advisory_xact_lock key serialising catalogue writes (SetPrices, default seeding).
PRICES_LOCK_KEY = 0x16E0_1ED6_E6
DEFAULT_CATALOGUE_REQUEST_ID = "igw-default-catalogue"

Conn = psycopg.AsyncConnection[Any]
# One settle as ``ledger_settle`` takes it, without ``now``: request id, reservation id (or
# None), input, output and cached input tokens, provider, provider model, outcome, latency
# in microseconds, usage estimated.
SettleArgs = tuple[str, uuid.UUID | None, int, int, int, str, str, int, int, bool]

_GROUP_COLUMNS: dict[str, tuple[str, ...]] = {
    "team": ("team",),
    "agent": ("team", "agent"),
    "model": ("model",),
    "provider": ("provider",),
    "day": ("date_trunc('day', created_at AT TIME ZONE 'UTC') AS day",),
    "run": ("team", "run_id"),
}


def _floor_hour(t: dt.datetime) -> dt.datetime:
    return t.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)


def _ceil_hour(t: dt.datetime) -> dt.datetime:
    f = _floor_hour(t)
    return f if f == t else f + dt.timedelta(hours=1)


def libpq_dsn(url: str) -> str:
    """A SQLAlchemy URL (``postgresql+psycopg://...``) as a libpq URI."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class Repository:
    """The ledger's database, behind a bounded async connection pool."""

    def __init__(self, pool: AsyncConnectionPool[Any], timeout: float) -> None:
        self._pool = pool
        self._timeout = timeout

    @classmethod
    async def open(
        cls, url: str, *, pool_size: int = 20, timeout: float = 2.0, allow_unbudgeted: bool = False
    ) -> Repository:
        """Opens the pool (waits for one connection; raises Unavailable if none comes).

        ``allow_unbudgeted`` sets ``igw.allow_unbudgeted`` on every connection: ``ledger_hold``
        then places holds for teams no budget applies to instead of refusing them (NO_BUDGET).
        """
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            libpq_dsn(url),
            min_size=min(4, pool_size),
            max_size=pool_size,
            timeout=timeout,
            kwargs={
                "autocommit": True,
                "connect_timeout": max(1, round(timeout)),
                # A statement stuck behind a lock must not hold a connection forever.
                "options": "-c statement_timeout=15000 -c TimeZone=UTC"
                + f" -c igw.allow_unbudgeted={'on' if allow_unbudgeted else 'off'}",
            },
            open=False,
            name="ledger",
        )
        try:
            await pool.open(wait=True, timeout=max(timeout, 5.0))
        except PoolTimeout:
            await pool.close()
            raise E.Unavailable("DATABASE_UNAVAILABLE", "cannot connect to the ledger database") from None
        return cls(pool, timeout)

    async def close(self) -> None:
        """Closes every connection."""
        await self._pool.close()

    async def _run(self, what: str, fn: Callable[[Conn], Awaitable[T]]) -> T:
        conflicts = 0
        reconnected = False
        while True:
            try:
                async with self._pool.connection(timeout=self._timeout) as conn:
                    return await fn(conn)
            except (pg_errors.SerializationFailure, pg_errors.DeadlockDetected) as exc:
                conflicts += 1
                if conflicts > CONFLICT_RETRIES:
                    _LOGGER.warning("giving up after %d conflicts", conflicts, extra={"op": what})
                    raise E.Unavailable(
                        "DATABASE_CONFLICT", "the ledger database is too contended; retry"
                    ) from exc
                await asyncio.sleep(random.uniform(0.001, 0.005) * conflicts)
            except PoolTimeout:
                raise E.Unavailable(
                    "DATABASE_UNAVAILABLE", "the ledger database is unavailable; retry later"
                ) from None
            except psycopg.OperationalError as exc:
                if reconnected:
                    _LOGGER.warning("database unavailable: %s", type(exc).__name__, extra={"op": what})
                    raise E.Unavailable(
                        "DATABASE_UNAVAILABLE", "the ledger database is unavailable; retry later"
                    ) from None
                reconnected = True
                _LOGGER.info("database connection lost (%s); retrying once", type(exc).__name__)
                try:
                    await asyncio.wait_for(self._pool.check(), timeout=self._timeout)
                except (TimeoutError, psycopg.Error):
                    pass

    async def _call(self, what: str, sql: str, params: Sequence[Any]) -> Any:
        async def go(conn: Conn) -> Any:
            cur = await conn.execute(sql, params)  # type: ignore[arg-type]
            row = await cur.fetchone()
            return row[0] if row else None

        return await self._run(what, go)

    # ------------------------------------------------------------ data plane

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
    ) -> dict[str, Any]:
        """Calls ``ledger_hold`` (a call's hold, or a slice of ``slice_calls`` calls, optionally
        for a run); the JSON result says OK / DENIED / RATE_LIMITED / MISMATCH / ..."""
        return await self._call(  # type: ignore[no-any-return]
            "reserve" if not slice_calls else "acquire_slice",
            "SELECT ledger_hold(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (hold_id, request_id, attempt, team, agent, model, provider, prompt_tokens,
             max_output_tokens, slice_calls, ttl_us, now, run_id, run_cap_nanos),
        )

    async def settle(
        self,
        request_id: str,
        reservation_id: uuid.UUID | None,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int,
        provider: str,
        provider_model: str,
        outcome: int,
        latency_us: int,
        usage_estimated: bool,
        now: dt.datetime,
    ) -> dict[str, Any]:
        """Calls ``ledger_settle``; no reservation id settles the request's latest open hold."""
        return await self._call(  # type: ignore[no-any-return]
            "settle",
            "SELECT ledger_settle(%s, %s::uuid, %s, %s, %s, %s, %s, %s::smallint, %s, %s, %s)",
            (request_id, reservation_id, input_tokens, output_tokens, cached_input_tokens, provider,
             provider_model, outcome, latency_us, usage_estimated, now),
        )

    async def settle_batch(self, items: Sequence[SettleArgs], now: dt.datetime) -> list[dict[str, Any]]:
        """Calls ``ledger_settle_batch``: every item settled in one transaction, one result each.

        Each item is ``ledger_settle`` (same results, same idempotency); the batch commits once.
        """
        cols = list(zip(*items, strict=True))
        return await self._call(  # type: ignore[no-any-return]
            "settle_batch",
            "SELECT ledger_settle_batch(%s::text[], %s::uuid[], %s::bigint[], %s::bigint[], %s::bigint[],"
            " %s::text[], %s::text[], %s::smallint[], %s::bigint[], %s::boolean[], %s)",
            (*(list(c) for c in cols), now),
        )

    async def release(self, reservation_id: uuid.UUID, reason: str, now: dt.datetime) -> dict[str, Any]:
        """Calls ``ledger_release``."""
        return await self._call(  # type: ignore[no-any-return]
            "release", "SELECT ledger_release(%s, %s, %s)", (reservation_id, reason, now)
        )

    async def release_request(self, request_id: str, reason: str, now: dt.datetime) -> dict[str, Any]:
        """Calls ``ledger_release_request``: frees the request's open holds and refuses later ones."""
        return await self._call(  # type: ignore[no-any-return]
            "release_request", "SELECT ledger_release_request(%s, %s, %s)", (request_id, reason, now)
        )

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

    async def capture(self, now: dt.datetime, limit: int) -> dict[str, Any]:
        """Calls ``ledger_capture`` for one batch of expired holds."""
        return await self._call(  # type: ignore[no-any-return]
            "capture", "SELECT ledger_capture(%s, %s)", (now, limit)
        )

    async def budgets(self, team: str, agent: str, now: dt.datetime) -> list[dict[str, Any]]:
        """The budgets applying to (team, agent) in their current windows."""
        return await self._call(  # type: ignore[no-any-return]
            "budgets", "SELECT ledger_budgets(%s, %s, '', %s)", (team, agent, now)
        )

    # ------------------------------------------------------------ administration

    async def set_budget(
        self, team: str, agent: str, window: int, limit: int, soft: int, now: dt.datetime, run: str = ""
    ) -> dict[str, Any]:
        """Calls ``ledger_set_budget``: upserts a budget (and its team); a new budget's current
        window starts from the spend and open holds its team (or agent, or run) already has there."""
        row: dict[str, Any] = await self._call(
            "set_budget",
            "SELECT ledger_set_budget(%s, %s, %s, %s::smallint, %s, %s, %s)",
            (team, agent, run, window, limit, soft, now),
        )
        return {**row, "updated_at": EPOCH + dt.timedelta(microseconds=int(row["updated_us"]))}

    async def list_budgets(
        self, team: str, include_runs: bool, limit: int, after: tuple[str, str, str, int] | None
    ) -> list[dict[str, Any]]:
        """Budgets ordered by (team, run, agent, window), keyset-paged after ``after``."""
        conds = ["true"]
        params: list[Any] = []
        if team:
            conds.append("team = %s")
            params.append(team)
        if not include_runs:
            conds.append("run = ''")
        if after is not None:
            conds.append('(team, run, agent, "window") > (%s, %s, %s, %s)')
            params.extend(after)
        sql = (
            'SELECT team, run, agent, "window", limit_nanos, soft_limit_nanos, updated_at FROM budgets'  # noqa: S608
            f" WHERE {' AND '.join(conds)} ORDER BY team, run, agent, \"window\" LIMIT %s"
        )
        params.append(limit)

        async def go(conn: Conn) -> list[dict[str, Any]]:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(sql, params)  # type: ignore[arg-type]
            return await cur.fetchall()

        return await self._run("list_budgets", go)

    async def delete_budget(self, team: str, agent: str, run: str, window: int) -> dict[str, Any] | None:
        """Deletes one budget and its counters (under the team's lock); None when there is none."""

        async def go(conn: Conn) -> dict[str, Any] | None:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(ledger_team_lock_key(%s))", (team,))
                cur = conn.cursor(row_factory=dict_row)
                await cur.execute(
                    'DELETE FROM budgets WHERE team = %s AND agent = %s AND run = %s AND "window" = %s'
                    ' RETURNING team, run, agent, "window", limit_nanos, soft_limit_nanos, updated_at',
                    (team, agent, run, window),
                )
                return await cur.fetchone()

        return await self._run("delete_budget", go)

    async def set_rate_limit(self, team: str, agent: str, rpm: int, tpm: int, now: dt.datetime) -> dict[str, Any]:
        """Upserts a rate limit (both 0: deletes it, so the team's holds skip the rate check)."""

        async def go(conn: Conn) -> dict[str, Any]:
            cur = conn.cursor(row_factory=dict_row)
            if rpm == 0 and tpm == 0:
                await cur.execute("DELETE FROM rate_limits WHERE team = %s AND agent = %s", (team, agent))
                return {"team": team, "agent": agent, "requests_per_minute": 0, "tokens_per_minute": 0,
                        "updated_at": now}
            await cur.execute(
                "INSERT INTO rate_limits (team, agent, requests_per_minute, tokens_per_minute, updated_at)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (team, agent) DO UPDATE SET"
                " requests_per_minute = EXCLUDED.requests_per_minute,"
                " tokens_per_minute = EXCLUDED.tokens_per_minute, updated_at = EXCLUDED.updated_at"
                " RETURNING team, agent, requests_per_minute, tokens_per_minute, updated_at",
                (team, agent, rpm, tpm, now),
            )
            row = await cur.fetchone()
            assert row is not None
            return row

        return await self._run("set_rate_limit", go)

    async def rate_limits(self, team: str, now: dt.datetime) -> list[dict[str, Any]]:
        """``ledger_rate_limits``: the team's limits with what the last 60 s counted."""
        return await self._call(  # type: ignore[no-any-return]
            "rate_limits", "SELECT ledger_rate_limits(%s, %s)", (team, now)
        )

    async def all_rate_limits(self) -> list[tuple[str, str, int, int]]:
        """Every configured rate limit (for the metrics)."""

        async def go(conn: Conn) -> list[tuple[str, str, int, int]]:
            cur = await conn.execute(
                "SELECT team, agent, requests_per_minute, tokens_per_minute FROM rate_limits ORDER BY 1, 2 LIMIT 10000"
            )
            return [tuple(r) for r in await cur.fetchall()]  # type: ignore[misc]

        return await self._run("all_rate_limits", go)

    async def prune_rate_events(self, now: dt.datetime) -> int:
        """Forgets rate events older than every window."""
        return int(await self._call("prune_rate_events", "SELECT ledger_prune_rate_events(%s)", (now,)))

    async def maintain_partitions(
        self, now: dt.datetime, ahead_months: int, cutoff: dt.datetime | None
    ) -> tuple[list[str], list[str], list[str]]:
        """Creates the partitions due ahead, drops those wholly before ``cutoff``; returns
        (created, dropped, every partition)."""

        async def go(conn: Conn) -> tuple[list[str], list[str], list[str]]:
            async with conn.transaction():
                cur = await conn.execute("SELECT ledger_ensure_partitions(%s, %s)", (now, ahead_months))
                row = await cur.fetchone()
                created = list(row[0]) if row else []
                dropped: list[str] = []
                if cutoff is not None:
                    cur = await conn.execute("SELECT ledger_drop_partitions(%s)", (cutoff,))
                    row = await cur.fetchone()
                    dropped = list(row[0]) if row else []
                cur = await conn.execute("SELECT name FROM ledger_partitions() ORDER BY lo")
                names = [r[0] for r in await cur.fetchall()]
            return created, dropped, names

        return await self._run("maintain_partitions", go)

    async def list_spend(
        self,
        start: dt.datetime,
        end: dt.datetime,
        group_by: Sequence[str],
        team: str,
        run: str = "",
        limit: int = 1000,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """Totals over [start, end) grouped by a whitelist of dimensions.

        Whole UTC hours come from ``spend_rollup_hourly`` (a few rows per hour and group); only
        the partial hours at the two ends are read from the entries, through the time index.
        So the cost follows the range and the number of groups, not the size of the table.
        """
        cols: list[str] = []
        for dim in group_by:
            for col in _GROUP_COLUMNS[dim]:
                if col not in cols:
                    cols.append(col)
        names = [c.rsplit(" AS ", 1)[-1] for c in cols]
        lo = _ceil_hour(start)
        hi = _floor_hour(end)
        filt = (" AND team = %s" if team else "") + (" AND run_id = %s" if run else "")
        fparams: list[Any] = ([team] if team else []) + ([run] if run else [])
        parts: list[str] = []
        params: list[Any] = []
        entry_cols = ", ".join([*cols, ""]) if cols else ""
        entry_sel = (
            f"SELECT {entry_cols}count(*) AS n, sum(input_tokens) AS input, sum(output_tokens) AS output,"  # noqa: S608
            " sum(cached_input_tokens) AS cached, sum(cost_nanos) AS cost FROM spend_entries"
        )
        group = f" GROUP BY {', '.join(names)}" if names else ""
        if lo < hi:
            roll_cols = ", ".join([*(c.replace("created_at", "hour") for c in cols), ""]) if cols else ""
            parts.append(
                f"SELECT {roll_cols}sum(request_count) AS n, sum(input_tokens) AS input,"  # noqa: S608
                " sum(output_tokens) AS output, sum(cached_input_tokens) AS cached, sum(cost_nanos) AS cost"
                f" FROM spend_rollup_hourly WHERE hour >= %s AND hour < %s{filt}{group}"
            )
            params += [lo, hi, *fparams]
            edges = [(start, lo), (hi, end)]
        else:
            edges = [(start, end)]
        for a, b in edges:
            if a < b:
                parts.append(f"{entry_sel} WHERE created_at >= %s AND created_at < %s{filt}{group}")
                params += [a, b, *fparams]
        if not parts:
            parts.append(f"{entry_sel} WHERE false{group}")
        union = " UNION ALL ".join(f"({p})" for p in parts)
        outer = ", ".join([*names, ""]) if names else ""
        sql = (
            f"SELECT {outer}coalesce(sum(n), 0) AS n, coalesce(sum(input), 0) AS input,"  # noqa: S608
            " coalesce(sum(output), 0) AS output, coalesce(sum(cached), 0) AS cached,"
            f" coalesce(sum(cost), 0) AS cost FROM ({union}) u"
            + (f" GROUP BY {', '.join(names)} ORDER BY {', '.join(names)}" if names else "")
            + " LIMIT %s OFFSET %s"
        )
        params += [limit, offset]

        async def go(conn: Conn) -> list[dict[str, Any]]:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(sql, params)  # type: ignore[arg-type]
            return await cur.fetchall()

        return await self._run("list_spend", go)

    async def list_entries(
        self,
        team: str,
        start: dt.datetime | None,
        end: dt.datetime | None,
        limit: int,
        before: tuple[dt.datetime, int] | None,
    ) -> list[dict[str, Any]]:
        """Entries newest first, keyset-paged on (created_at, id)."""
        conds: list[str] = []
        params: list[Any] = []
        if team:
            conds.append("team = %s")
            params.append(team)
        if start is not None:
            conds.append("created_at >= %s")
            params.append(start)
        if end is not None:
            conds.append("created_at < %s")
            params.append(end)
        if before is not None:
            conds.append("(created_at, id) < (%s, %s)")
            params.extend(before)
        where = (" WHERE " + " AND ".join(conds)) if conds else ""
        sql = (
            f"SELECT ledger_entry_json(e) FROM spend_entries e{where}"  # noqa: S608
            " ORDER BY created_at DESC, id DESC LIMIT %s"
        )
        params.append(limit)

        async def go(conn: Conn) -> list[dict[str, Any]]:
            cur = await conn.execute(sql, params)  # type: ignore[arg-type]
            return [r[0] for r in await cur.fetchall()]

        return await self._run("list_entries", go)

    async def set_prices(
        self,
        request_id: str,
        payload_sha256: str,
        prices: Sequence[ModelPrice],
        remove: Sequence[str],
        now: dt.datetime,
    ) -> tuple[int, bool] | None:
        """Creates a new catalogue version: (version, replayed), or None on a payload mismatch."""

        async def go(conn: Conn) -> tuple[int, bool] | None:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (PRICES_LOCK_KEY,))
                cur = await conn.execute(
                    "SELECT version, payload_sha256 FROM price_versions WHERE request_id = %s", (request_id,)
                )
                row = await cur.fetchone()
                if row is not None:
                    return (int(row[0]), True) if row[1] == payload_sha256 else None
                cur = await conn.execute("SELECT coalesce(max(version), 0) FROM price_versions")
                row = await cur.fetchone()
                current = int(row[0]) if row else 0
                new = current + 1
                await conn.execute(
                    "INSERT INTO price_versions (version, request_id, payload_sha256, created_at)"
                    " VALUES (%s, %s, %s, %s)",
                    (new, request_id, payload_sha256, now),
                )
                changed = [p.model for p in prices]
                await conn.execute(
                    "INSERT INTO prices (version, model, input_per_mtok_nanos, output_per_mtok_nanos,"
                    " cached_input_per_mtok_nanos)"
                    " SELECT %s, model, input_per_mtok_nanos, output_per_mtok_nanos, cached_input_per_mtok_nanos"
                    " FROM prices WHERE version = %s AND NOT (model = ANY(%s))",
                    (new, current, [*changed, *remove]),
                )
                if prices:
                    async with conn.cursor() as c:
                        await c.executemany(
                            "INSERT INTO prices (version, model, input_per_mtok_nanos, output_per_mtok_nanos,"
                            " cached_input_per_mtok_nanos) VALUES (%s, %s, %s, %s, %s)",
                            [(new, p.model, p.input_per_mtok, p.output_per_mtok, p.cached_input_per_mtok)
                             for p in prices],
                        )
                return new, False

        return await self._run("set_prices", go)

    async def seed_prices(self, prices: Sequence[ModelPrice], now: dt.datetime) -> bool:
        """Writes ``prices`` as version 1 if the catalogue is empty (safe across replicas)."""

        async def go(conn: Conn) -> bool:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (PRICES_LOCK_KEY,))
                cur = await conn.execute("SELECT EXISTS (SELECT 1 FROM price_versions)")
                row = await cur.fetchone()
                if row and row[0]:
                    return False
                await conn.execute(
                    "INSERT INTO price_versions (version, request_id, created_at) VALUES (1, %s, %s)",
                    (DEFAULT_CATALOGUE_REQUEST_ID, now),
                )
                async with conn.cursor() as c:
                    await c.executemany(
                        "INSERT INTO prices (version, model, input_per_mtok_nanos, output_per_mtok_nanos,"
                        " cached_input_per_mtok_nanos) VALUES (1, %s, %s, %s, %s)",
                        [(p.model, p.input_per_mtok, p.output_per_mtok, p.cached_input_per_mtok) for p in prices],
                    )
                return True

        return await self._run("seed_prices", go)

    async def list_prices(self, version: int) -> tuple[int, dt.datetime, list[tuple[str, int, int, int]]] | None:
        """One catalogue version (0 = current), or None when it does not exist."""

        async def go(conn: Conn) -> tuple[int, dt.datetime, list[tuple[str, int, int, int]]] | None:
            if version:
                cur = await conn.execute(
                    "SELECT version, created_at FROM price_versions WHERE version = %s", (version,)
                )
            else:
                cur = await conn.execute(
                    "SELECT version, created_at FROM price_versions ORDER BY version DESC LIMIT 1"
                )
            row = await cur.fetchone()
            if row is None:
                return None
            cur = await conn.execute(
                "SELECT model, input_per_mtok_nanos, output_per_mtok_nanos, cached_input_per_mtok_nanos"
                " FROM prices WHERE version = %s ORDER BY model",
                (row[0],),
            )
            return int(row[0]), row[1], [tuple(r) for r in await cur.fetchall()]  # type: ignore[misc]

        return await self._run("list_prices", go)

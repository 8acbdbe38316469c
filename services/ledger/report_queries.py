"""The ledger's reads over spend (totals, entries) and the price catalogue's versions."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from psycopg.rows import dict_row

from services.ledger import domain as D
from services.ledger.database import Conn, Database
from services.ledger.pricing import ModelPrice
from services.ledger.results import spend_entry, spend_total

# pg_advisory_xact_lock key serialising catalogue writes (SetPrices, default seeding).
PRICES_LOCK_KEY = 0x16E0_1ED6_E6
DEFAULT_CATALOGUE_REQUEST_ID = "igw-default-catalogue"

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





class ReportQueries(Database):
    """Spend totals and entries, and the price catalogue."""

    async def list_spend(
        self,
        start: dt.datetime,
        end: dt.datetime,
        group_by: Sequence[str],
        team: str,
        run: str = "",
        limit: int = 1000,
        offset: int = 0,
    ) -> list[D.SpendTotal]:
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

        return [spend_total(r) for r in await self._run("list_spend", go)]

    async def list_entries(
        self,
        team: str,
        start: dt.datetime | None,
        end: dt.datetime | None,
        limit: int,
        before: tuple[dt.datetime, int] | None,
    ) -> list[D.SpendEntry]:
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

        return [spend_entry(r) for r in await self._run("list_entries", go)]

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

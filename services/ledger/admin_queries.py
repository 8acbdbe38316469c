"""The ledger's operator writes and reads: budgets, rate limits, partitions."""

from __future__ import annotations

import datetime as dt
from typing import Any

from psycopg.rows import dict_row

from services.ledger import domain as D
from services.ledger.database import Conn, Database
from services.ledger.results import ResultShapeError, budget_config, rate_limit

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class AdminQueries(Database):
    """Budgets, rate limits and partition maintenance."""

    async def set_budget(
        self, team: str, agent: str, window: int, limit: int, soft: int, now: dt.datetime, run: str = ""
    ) -> D.BudgetConfig:
        """Calls ``ledger_set_budget``: upserts a budget (and its team); a new budget's current
        window starts from the spend and open holds its team (or agent, or run) already has there."""
        row = await self._call(
            "set_budget",
            "SELECT ledger_set_budget(%s, %s, %s, %s::smallint, %s, %s, %s)",
            (team, agent, run, window, limit, soft, now),
        )
        if not isinstance(row, dict) or "updated_us" not in row:
            raise ResultShapeError("ledger_set_budget: expected a JSON object with updated_us")
        return budget_config({**row, "updated_at": EPOCH + dt.timedelta(microseconds=int(row["updated_us"]))})

    async def list_budgets(
        self, team: str, include_runs: bool, limit: int, after: tuple[str, str, str, int] | None
    ) -> list[D.BudgetConfig]:
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

        return [budget_config(r) for r in await self._run("list_budgets", go)]

    async def delete_budget(self, team: str, agent: str, run: str, window: int) -> D.BudgetConfig | None:
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

        row = await self._run("delete_budget", go)
        return None if row is None else budget_config(row)

    async def set_rate_limit(self, team: str, agent: str, rpm: int, tpm: int, now: dt.datetime) -> D.RateLimit:
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

        return rate_limit(await self._run("set_rate_limit", go))

    async def rate_limits(self, team: str, now: dt.datetime) -> list[D.RateLimit]:
        """``ledger_rate_limits``: the team's limits with what the last 60 s counted."""
        rows = await self._call("rate_limits", "SELECT ledger_rate_limits(%s, %s)", (team, now))
        return [rate_limit(r) for r in rows or ()]

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

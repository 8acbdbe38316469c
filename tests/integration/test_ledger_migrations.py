"""Ledger migrations up and down (empty and populated) and the operator reads' plans."""

from __future__ import annotations

import datetime as dt

import psycopg
import pytest
from sqlalchemy import CheckConstraint

from services.common import db
from services.ledger import domain as D
from services.ledger.orm import Base
from tests.integration.ledger_support import FakeClock, check_invariants, ledger_service, sql

TABLES = {"teams", "budgets", "budget_counters", "holds", "spend_entries", "price_versions", "prices",
          "rate_limits", "rate_events", "spend_rollup_hourly", "ledger_saved_functions", "request_releases",
          "slice_draws"}


def _tables(url: str) -> set[str]:
    """Tables, partitions of spend_entries left out (they come and go with time)."""
    return {r[0] for r in sql(url, "SELECT c.relname FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace"
                                   " AND c.relkind IN ('r', 'p') AND NOT c.relispartition")} - {"alembic_version"}


def _checks(url: str) -> set[tuple[str, str]]:
    return {
        (r[0], r[1])
        for r in sql(url, "SELECT conrelid::regclass::text, conname FROM pg_constraint k"
                          " JOIN pg_class c ON c.oid = k.conrelid"
                          " WHERE contype = 'c' AND connamespace = 'public'::regnamespace AND NOT c.relispartition")
    }


def _orm_checks() -> set[tuple[str, str]]:
    return {
        (table.name, str(c.name))
        for table in Base.metadata.tables.values()
        for c in table.constraints
        if isinstance(c, CheckConstraint)
    }


def _insert_hold(url: str, prompt: int, max_out: int) -> None:
    sql(url, "INSERT INTO holds (id, request_id, attempt, team, agent, model, prompt_tokens, max_output_tokens,"
             " amount_nanos, price_version, budget_ids, window_starts, created_at, expires_at)"
             " VALUES (gen_random_uuid(), gen_random_uuid()::text, 0, 't', 'a', 'm', %s, %s, 0, 1, '{}', '{}',"
             " now(), now())", (prompt, max_out))


HEAD_ONLY_FUNCTIONS = {"ledger_set_budget", "ledger_team_lock_key", "ledger_window_end"}


def _functions(url: str) -> set[str]:
    return {r[0] for r in sql(url, "SELECT proname FROM pg_proc WHERE proname LIKE 'ledger%%'")}


def _function_defs(url: str) -> list[tuple[str, str]]:
    return sql(url, "SELECT proname, pg_get_functiondef(oid) FROM pg_proc WHERE proname LIKE 'ledger%%' ORDER BY 1")


def test_migrations_go_up_and_down_on_an_empty_database(fresh_database: str) -> None:
    db.upgrade("ledger", fresh_database, "0001")
    defs_0001 = _function_defs(fresh_database)
    db.upgrade("ledger", fresh_database)
    assert _tables(fresh_database) == TABLES
    db.upgrade("ledger", fresh_database)  # idempotent
    # The database has exactly the CHECK constraints the ORM declares, by name.
    assert _checks(fresh_database) == _orm_checks()
    assert {("holds", "ck_holds_prompt_tokens_nonneg"), ("holds", "ck_holds_max_output_tokens_nonneg")} <= (
        _checks(fresh_database)
    )
    for prompt, max_out in [(-1, 0), (0, -1)]:
        with pytest.raises(psycopg.errors.CheckViolation):
            _insert_hold(fresh_database, prompt, max_out)
    assert HEAD_ONLY_FUNCTIONS <= _functions(fresh_database)
    # 0002 down: its constraints and functions go, 0001's functions are back as they were.
    db.downgrade("ledger", fresh_database, "0001")
    assert not {n for _, n in _checks(fresh_database)} & {"ck_holds_prompt_tokens_nonneg",
                                                           "ck_holds_max_output_tokens_nonneg"}
    assert not HEAD_ONLY_FUNCTIONS & _functions(fresh_database)
    assert _function_defs(fresh_database) == defs_0001
    _insert_hold(fresh_database, -1, -1)  # 0001 allowed it (why 0002 exists)
    sql(fresh_database, "DELETE FROM holds")
    db.upgrade("ledger", fresh_database)
    assert _checks(fresh_database) == _orm_checks()
    db.downgrade("ledger", fresh_database, "base")
    assert _tables(fresh_database) == set()
    assert sql(fresh_database, "SELECT count(*) FROM pg_proc WHERE proname LIKE 'ledger%%'") == [(0,)]
    db.upgrade("ledger", fresh_database)
    assert _tables(fresh_database) == TABLES


async def test_migrations_go_down_and_up_on_a_populated_database(fresh_database: str) -> None:
    async with ledger_service(fresh_database) as svc:
        await svc.set_budget(team="t", agent="", window=1, limit_nanos=10**9)
        res = await svc.reserve(request_id="r1", attempt=0, team="t", agent="a", model="fake-small",
                                prompt_tokens_upper_bound=10, max_output_tokens=10)
        await svc.settle(request_id="r1", reservation_id=str(res.hold.reservation_id), usage=D.Usage(1, 1, 0),
                         provider="p", provider_model="m")
        await svc.reserve(request_id="r2", attempt=0, team="t", agent="a", model="fake-small",
                          prompt_tokens_upper_bound=10, max_output_tokens=10)
    before = sql(fresh_database, "SELECT request_id, state, prompt_tokens, max_output_tokens FROM holds ORDER BY 1")
    db.downgrade("ledger", fresh_database, "0001")
    db.upgrade("ledger", fresh_database)  # 0002 again, over the data
    assert sql(fresh_database, "SELECT request_id, state, prompt_tokens, max_output_tokens FROM holds"
                               " ORDER BY 1") == before == [("r1", "SETTLED", 10, 10), ("r2", "OPEN", 10, 10)]
    async with ledger_service(fresh_database) as svc:
        [status] = await svc.get_budget(team="t")
        assert status.spent_nanos > 0 and status.held_nanos > 0
        out = await svc.settle(request_id="r2", reservation_id="", usage=D.Usage(1, 1, 0), provider="p",
                               provider_model="m")
        assert out.entry.request_id == "r2"
    check_invariants(fresh_database)
    db.downgrade("ledger", fresh_database, "base")
    assert _tables(fresh_database) == set()
    async with ledger_service(fresh_database) as svc:  # migrates and seeds again
        assert (await svc.list_prices()).version == 1


async def test_operator_reads_use_indexes_with_many_entries(fresh_database: str) -> None:
    db.upgrade("ledger", fresh_database)
    for month in ("2025-01-01", "2025-02-01", "2025-03-01"):
        sql(fresh_database, "SELECT ledger_create_partition(%s::timestamptz)", (month,))
    sql(
        fresh_database,
        """
        INSERT INTO spend_entries (request_id, reservation_id, team, agent, model, provider, provider_model,
          input_tokens, output_tokens, cached_input_tokens, cost_nanos, held_nanos, price_version, outcome,
          created_at, reserve_time)
        SELECT 'r' || g, gen_random_uuid(), 'team' || (g % 500), 'a' || (g % 7), 'm' || (g % 5), 'p', 'pm',
               g % 1000, g % 300, 0, g % 100000, g % 100000, 1, 1,
               timestamptz '2025-01-01' + (g * interval '13 seconds'),
               timestamptz '2025-01-01' + (g * interval '13 seconds')
        FROM generate_series(1, 200000) AS g
        """,
    )
    sql(fresh_database, "ANALYZE spend_entries")
    day = (dt.datetime(2025, 1, 15, tzinfo=dt.UTC), dt.datetime(2025, 1, 16, tzinfo=dt.UTC))
    plans = {
        "list_spend_team_day": sql(
            fresh_database,
            "EXPLAIN SELECT model, count(*), sum(cost_nanos) FROM spend_entries"
            " WHERE created_at >= %s AND created_at < %s AND team = %s GROUP BY model",
            (*day, "team42"),
        ),
        "list_spend_all_day": sql(
            fresh_database,
            "EXPLAIN SELECT team, count(*), sum(cost_nanos) FROM spend_entries"
            " WHERE created_at >= %s AND created_at < %s GROUP BY team",
            day,
        ),
        "entries_team_day": sql(
            fresh_database,
            "EXPLAIN SELECT ledger_entry_json(e) FROM spend_entries e WHERE team = %s AND created_at >= %s"
            " AND created_at < %s ORDER BY created_at DESC, id DESC LIMIT 101",
            ("team42", *day),
        ),
        "entries_page_2": sql(
            fresh_database,
            "EXPLAIN SELECT ledger_entry_json(e) FROM spend_entries e WHERE (created_at, id) < (%s, %s)"
            " ORDER BY created_at DESC, id DESC LIMIT 101",
            (day[1], 10**9),
        ),
    }
    for name, rows in plans.items():
        text = "\n".join(r[0] for r in rows)
        assert "Seq Scan on spend_entries" not in text, f"{name}:\n{text}"
        # Partition pruning: a one-day read touches January's partition only.
        if name != "entries_page_2":
            assert "spend_entries_p202502" not in text and "spend_entries_p202503" not in text, f"{name}:\n{text}"
    # The same, for the SQL the repository itself builds: capture each statement the service runs
    # for the operator reads, then EXPLAIN it with its own parameters.
    captured: list[tuple[str, tuple[object, ...]]] = []
    real_execute = psycopg.AsyncCursor.execute

    async def capture(self: psycopg.AsyncCursor[object], query: object, params: object = None,
                      **kw: object) -> object:
        if isinstance(query, str) and ("spend_entries" in query or "spend_rollup" in query):
            captured.append((query, tuple(params or ())))  # type: ignore[arg-type]
        return await real_execute(self, query, params, **kw)  # type: ignore[arg-type]

    # "Now" is a month after most of the history, so the default 30-day range is the recent slice an
    # operator looks at every minute (a range that covers most of the table is rightly a full scan).
    clock = FakeClock(dt.datetime(2025, 3, 1, tzinfo=dt.UTC))
    async with ledger_service(fresh_database, clock=clock, migrate=False) as svc:
        psycopg.AsyncCursor.execute = capture  # type: ignore[method-assign]
        try:
            await svc.list_spend(start=day[0], end=day[1], group_by=["model"], team="team42")
            await svc.list_spend(start=day[0], end=day[1], group_by=["team", "day"])
            await svc.list_spend(start=None, end=None, group_by=["agent", "provider"])  # default range
            page, token = await svc.list_entries(team="team42", start=day[0], end=day[1], page_size=5)
            assert page and token
            await svc.list_entries(team="team42", start=day[0], end=day[1], page_size=5, page_token=token)
            await svc.list_entries(page_size=50)
        finally:
            psycopg.AsyncCursor.execute = real_execute  # type: ignore[method-assign]
    assert len(captured) == 6
    for query, params in captured:
        text = "\n".join(r[0] for r in sql(fresh_database, "EXPLAIN " + query, params))
        assert "Seq Scan on spend_entries" not in text, f"{query}:\n{text}"
        # Whole hours come from the rollup, the rest through the entries' indexes.
        assert "spend_rollup_hourly" in text or "Index" in text, f"{query}:\n{text}"


async def test_list_spend_and_entries_group_and_page(fresh_database: str) -> None:
    clock = FakeClock(dt.datetime(2025, 5, 1, 10, tzinfo=dt.UTC))
    async with ledger_service(fresh_database, allow_unbudgeted=True, clock=clock) as svc:
        for i in range(25):
            team = "x" if i % 2 else "y"
            res = await svc.reserve(request_id=f"r{i}", attempt=0, team=team, agent="a", model="fake-small",
                                    prompt_tokens_upper_bound=100, max_output_tokens=100)
            await svc.settle(request_id=f"r{i}", reservation_id=str(res.hold.reservation_id),
                             usage=D.Usage(100, 100, 0), provider="fake", provider_model="m")
            clock.advance(hours=2)
        totals = await svc.list_spend(start=None, end=None, group_by=["team", "day"])
        assert sum(t.request_count for t in totals) == 25
        assert {t.team for t in totals} == {"x", "y"} and all(t.day is not None for t in totals)
        assert sum(t.cost_nanos for t in totals) == 25 * (10_000 + 40_000)
        seen: list[str] = []
        token = ""
        while True:
            page, token = await svc.list_entries(team="x", page_size=5, page_token=token)
            seen += [e.request_id for e in page]
            if not token:
                break
        assert seen == [f"r{i}" for i in range(23, 0, -2)]
        v2 = await svc.set_prices(request_id="p1", prices=[], remove_models=["fake-large"])
        assert await svc.set_prices(request_id="p1", prices=[], remove_models=["fake-large"]) == v2 == 2
        assert "fake-large" not in {m for m, *_ in (await svc.list_prices()).prices}
        assert "fake-large" in {m for m, *_ in (await svc.list_prices(version=1)).prices}


def test_0005_goes_down_to_0004_as_it_was(fresh_database: str) -> None:
    db.upgrade("ledger", fresh_database, "0004")
    defs_0004 = _function_defs(fresh_database)
    db.upgrade("ledger", fresh_database)
    assert "request_releases" in _tables(fresh_database)
    assert {"ledger_release_request", "ledger_request_lock_key"} <= _functions(fresh_database)
    db.downgrade("ledger", fresh_database, "0004")
    assert "request_releases" not in _tables(fresh_database)
    assert _function_defs(fresh_database) == defs_0004
    db.upgrade("ledger", fresh_database)
    assert _checks(fresh_database) == _orm_checks()

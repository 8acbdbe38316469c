"""A budget created mid-window starts from what its team (or agent) already spent and still
holds in that window, so settled spend + open holds never pass the limit."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import psycopg
import pytest

from services.common import errors as E
from services.ledger import domain as D
from services.ledger.repository import libpq_dsn
from services.ledger.service import LedgerService
from tests.integration.ledger_support import FakeClock, check_invariants, ledger_service, sql

HOLD = 500_000  # fake-small, 1000 in + 1000 out
USAGE = D.Usage(800, 300, 0)  # 80_000 + 120_000
COST = 200_000


async def _reserve(svc: LedgerService, rid: str, *, team: str = "t", agent: str = "a") -> D.ReserveResult:
    return await svc.reserve(request_id=rid, attempt=0, team=team, agent=agent, model="fake-small",
                             prompt_tokens_upper_bound=1000, max_output_tokens=1000)


async def _spend(svc: LedgerService, rid: str, *, team: str = "t", agent: str = "a") -> D.SettleResult:
    res = await _reserve(svc, rid, team=team, agent=agent)
    return await svc.settle(request_id=rid, reservation_id=str(res.hold.reservation_id), usage=USAGE,
                            provider="fake", provider_model="fake-small-v1")


async def test_a_monthly_budget_created_mid_month_counts_the_months_earlier_spend(fresh_database: str) -> None:
    clock = FakeClock(dt.datetime(2025, 3, 10, 12, tzinfo=dt.UTC))
    async with ledger_service(fresh_database, allow_unbudgeted=True, clock=clock) as svc:
        for i in range(5):
            await _spend(svc, f"early{i}")
            clock.advance(hours=1)
        await svc.set_budget(team="t", agent="", window=D.Window.MONTHLY, limit_nanos=4 * COST)
        [status] = await svc.get_budget(team="t")
        assert (status.spent_nanos, status.held_nanos, status.remaining_nanos) == (5 * COST, 0, 0)
        assert status.window_start == dt.datetime(2025, 3, 1, tzinfo=dt.UTC)
        with pytest.raises(E.ResourceExhausted) as err:
            await _reserve(svc, "late")
        assert err.value.reason == "BUDGET_EXCEEDED"
        assert err.value.metadata["spent_nanos"] == str(5 * COST)
        assert err.value.metadata["limit_nanos"] == str(4 * COST)
        # Raising the limit does not count the carried-in spend twice.
        await svc.set_budget(team="t", agent="", window=D.Window.MONTHLY, limit_nanos=5 * COST + HOLD)
        [status] = await svc.get_budget(team="t")
        assert (status.spent_nanos, status.remaining_nanos) == (5 * COST, HOLD)
        await _spend(svc, "late")
        with pytest.raises(E.ResourceExhausted):
            await _reserve(svc, "later")
    assert sql(fresh_database, "SELECT spent_nanos, held_nanos FROM budget_counters") == [(6 * COST, 0)]
    check_invariants(fresh_database)


async def test_only_spend_reserved_in_the_current_window_is_carried_in(fresh_database: str) -> None:
    clock = FakeClock(dt.datetime(2025, 3, 31, 23, 59, 50, tzinfo=dt.UTC))  # a Monday, last day of March
    async with ledger_service(fresh_database, allow_unbudgeted=True, clock=clock) as svc:
        await _spend(svc, "march")  # reserved and settled in March
        held = await _reserve(svc, "march-hold")  # reserved in March, settled in April
        clock.advance(seconds=20)  # 2025-04-01 00:00:10: new day and month, same week
        await svc.settle(request_id="march-hold", reservation_id=str(held.hold.reservation_id), usage=USAGE,
                         provider="fake", provider_model="fake-small-v1")
        await _spend(svc, "april")
        for window in D.Window:
            await svc.set_budget(team="t", agent="", window=window, limit_nanos=10**12)
        spent = {s.window: s.spent_nanos for s in await svc.get_budget(team="t")}
        assert spent == {D.Window.DAILY: COST, D.Window.MONTHLY: COST, D.Window.WEEKLY: 3 * COST,
                         D.Window.TOTAL: 3 * COST}
    check_invariants(fresh_database)


async def test_an_agent_budget_carries_in_only_that_agents_spend(fresh_database: str) -> None:
    async with ledger_service(fresh_database, allow_unbudgeted=True) as svc:
        await _spend(svc, "a1", agent="alice")
        await _spend(svc, "a2", agent="alice")
        await _spend(svc, "b1", agent="bob")
        await _spend(svc, "other", team="other-team", agent="alice")
        await svc.set_budget(team="t", agent="alice", window=D.Window.DAILY, limit_nanos=2 * COST + HOLD - 1)
        await svc.set_budget(team="t", agent="", window=D.Window.DAILY, limit_nanos=10**12)
        by_agent = {s.agent: s.spent_nanos for s in await svc.get_budget(team="t", agent="alice")}
        assert by_agent == {"alice": 2 * COST, "": 3 * COST}
        with pytest.raises(E.ResourceExhausted) as err:
            await _reserve(svc, "a3", agent="alice")
        assert err.value.metadata["agent"] == "alice"
        await _spend(svc, "b2", agent="bob")  # bob is held to the team budget only
    check_invariants(fresh_database)


async def test_holds_open_when_the_budget_is_created_count_in_it(fresh_database: str) -> None:
    async with ledger_service(fresh_database, allow_unbudgeted=True) as svc:
        first = await _reserve(svc, "r1")
        second = await _reserve(svc, "r2")
        await svc.set_budget(team="t", agent="", window=D.Window.DAILY, limit_nanos=2 * HOLD + HOLD - 1)
        [status] = await svc.get_budget(team="t")
        assert (status.spent_nanos, status.held_nanos) == (0, 2 * HOLD)
        with pytest.raises(E.ResourceExhausted):
            await _reserve(svc, "r3")
        await svc.settle(request_id="r1", reservation_id=str(first.hold.reservation_id), usage=USAGE,
                         provider="fake", provider_model="fake-small-v1")
        assert await svc.release(reservation_id=str(second.hold.reservation_id))
        [status] = await svc.get_budget(team="t")
        assert (status.spent_nanos, status.held_nanos) == (COST, 0)
    check_invariants(fresh_database)


async def test_budgets_created_while_the_team_reserves_and_settles_stay_exact(fresh_database: str) -> None:
    async with ledger_service(fresh_database, allow_unbudgeted=True, pool_size=20) as svc:
        gate = asyncio.Event()

        async def call(i: int) -> None:
            await gate.wait()
            try:
                res = await _reserve(svc, f"r{i}", agent=f"a{i % 3}")
            except E.ResourceExhausted:
                return
            if i % 4 == 0:
                await svc.release(reservation_id=str(res.hold.reservation_id))
            elif i % 4 != 1:  # i % 4 == 1 stays open
                await svc.settle(request_id=f"r{i}", reservation_id=str(res.hold.reservation_id), usage=USAGE,
                                 provider="fake", provider_model="fake-small-v1")

        async def budgets() -> None:
            await gate.wait()
            for window in D.Window:
                await asyncio.sleep(0.01)
                await svc.set_budget(team="t", agent="", window=window, limit_nanos=10**12)
                await svc.set_budget(team="t", agent="a1", window=window, limit_nanos=60 * HOLD)

        tasks = [asyncio.create_task(call(i)) for i in range(160)] + [asyncio.create_task(budgets())]
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(*tasks)
        [status] = [s for s in await svc.get_budget(team="t") if s.window is D.Window.TOTAL and not s.agent]
        entries = sql(fresh_database, "SELECT coalesce(sum(cost_nanos), 0) FROM spend_entries")[0][0]
        open_held = sql(fresh_database, "SELECT coalesce(sum(amount_nanos), 0) FROM holds WHERE state = 'OPEN'")
        assert (status.spent_nanos, status.held_nanos) == (entries, open_held[0][0])
    check_invariants(fresh_database)


async def test_a_budget_created_while_a_reserve_is_in_flight_counts_its_hold(fresh_database: str) -> None:
    clock = FakeClock()
    async with ledger_service(fresh_database, allow_unbudgeted=True, clock=clock) as svc:
        # A Reserve caught between placing its hold and committing (held open on purpose).
        async with await psycopg.AsyncConnection.connect(
            libpq_dsn(fresh_database), options="-c igw.allow_unbudgeted=on"
        ) as conn:
            await conn.execute("SELECT ledger_reserve(%s, 'inflight', 0, 't', 'a', 'fake-small', '', 1000, 1000,"
                               " 60000000, %s)", (uuid.uuid4(), clock()))
            creating = asyncio.create_task(
                svc.set_budget(team="t", agent="", window=D.Window.DAILY, limit_nanos=10 * HOLD))
            await asyncio.sleep(0.3)
            assert not creating.done()  # waits for the team's in-flight Reserve
            await conn.commit()
            await creating
        [status] = await svc.get_budget(team="t")
        assert (status.spent_nanos, status.held_nanos) == (0, HOLD)
    check_invariants(fresh_database)

"""Settle, Release, the sweeper and windows against real Postgres."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from services.common import errors as E
from services.ledger import domain as D
from services.ledger.service import LedgerService
from tests.integration.ledger_support import FakeClock, check_invariants, ledger_service, sql

HOLD = 500_000  # fake-small, 1000 in + 1000 out
USAGE = D.Usage(800, 300, 0)  # 80_000 + 120_000
COST = 200_000


async def _reserve(svc: LedgerService, rid: str, team: str = "t", attempt: int = 0, **kw: object) -> D.ReserveResult:
    return await svc.reserve(request_id=rid, attempt=attempt, team=team, agent="a", model="fake-small",
                             prompt_tokens_upper_bound=1000, max_output_tokens=1000, **kw)  # type: ignore[arg-type]


async def _settle(svc: LedgerService, rid: str, res: D.ReserveResult, usage: D.Usage = USAGE,
                  **kw: object) -> D.SettleResult:
    return await svc.settle(request_id=rid, reservation_id=str(res.hold.reservation_id), usage=usage,
                            provider="fake", provider_model="fake-small-v1", **kw)  # type: ignore[arg-type]


async def test_settle_records_one_entry_and_frees_the_rest(fresh_database: str) -> None:
    async with ledger_service(fresh_database) as svc:
        await svc.set_budget(team="t", agent="", window=1, limit_nanos=10 * HOLD)
        res = await _reserve(svc, "r1")
        out = await _settle(svc, "r1", res, latency=dt.timedelta(milliseconds=250))
        assert not out.replayed
        assert out.entry.cost_nanos == COST and out.entry.held_nanos == HOLD and out.entry.flags == D.Flag(0)
        assert out.entry.outcome == D.Outcome.SUCCESS and out.entry.latency_us == 250_000
        [status] = await svc.get_budget(team="t")
        assert (status.spent_nanos, status.held_nanos, status.remaining_nanos) == (COST, 0, 10 * HOLD - COST)
    check_invariants(fresh_database)


async def test_duplicate_settle_sequential_and_concurrent_writes_one_entry(fresh_database: str) -> None:
    async with ledger_service(fresh_database) as svc:
        await svc.set_budget(team="t", agent="", window=1, limit_nanos=10 * HOLD)
        res = await _reserve(svc, "seq")
        first = await _settle(svc, "seq", res)
        again = await _settle(svc, "seq", res)
        assert again.replayed and again.entry == first.entry
        res2 = await _reserve(svc, "conc")
        gate = asyncio.Event()

        async def one() -> D.SettleResult:
            await gate.wait()
            return await _settle(svc, "conc", res2)

        tasks = [asyncio.create_task(one()) for _ in range(30)]
        await asyncio.sleep(0.05)
        gate.set()
        outs = await asyncio.gather(*tasks)
        assert sum(not o.replayed for o in outs) == 1
        assert len({o.entry.id for o in outs}) == 1
    assert sql(fresh_database, "SELECT request_id, count(*) FROM spend_entries GROUP BY 1 ORDER BY 1") == [
        ("conc", 1), ("seq", 1)
    ]
    assert sql(fresh_database, "SELECT spent_nanos, held_nanos FROM budget_counters") == [(2 * COST, 0)]
    check_invariants(fresh_database)


@pytest.mark.parametrize(
    "change",
    [
        {"usage": D.Usage(801, 300, 0)},
        {"provider": "other"},
        {"provider_model": "other-model"},
        {"outcome": D.Outcome.CANCELLED},
        {"usage_estimated": True},
    ],
)
async def test_same_request_id_with_a_different_payload_is_refused(fresh_database: str, change: dict) -> None:  # type: ignore[type-arg]
    async with ledger_service(fresh_database, allow_unbudgeted=True) as svc:
        res = await _reserve(svc, "r1")
        await _settle(svc, "r1", res)
        kw = {"usage": USAGE, "provider": "fake", "provider_model": "fake-small-v1", **change}
        with pytest.raises(E.Aborted) as err:
            await svc.settle(request_id="r1", reservation_id=str(res.hold.reservation_id), **kw)
        assert err.value.reason == "IDEMPOTENCY_MISMATCH"
        # Another attempt's reservation under a settled request id is a mismatch too.
        other = await _reserve(svc, "r2")
        with pytest.raises(E.Aborted):
            await _settle(svc, "r1", other)
    assert sql(fresh_database, "SELECT count(*) FROM spend_entries") == [(1,)]


async def test_actual_above_the_hold_is_recorded_in_full_and_flagged(fresh_database: str) -> None:
    async with ledger_service(fresh_database) as svc:
        await svc.set_budget(team="t", agent="", window=1, limit_nanos=HOLD)
        res = await _reserve(svc, "r1")
        out = await _settle(svc, "r1", res, usage=D.Usage(1000, 5000, 0), usage_estimated=True)
        assert out.entry.cost_nanos == 100_000 + 2_000_000
        assert out.entry.flags == D.Flag.OVER_HOLD | D.Flag.USAGE_ESTIMATED
        [status] = await svc.get_budget(team="t")
        assert status.spent_nanos == 2_100_000 and status.remaining_nanos == 0
        with pytest.raises(E.ResourceExhausted):
            await _reserve(svc, "r2")


async def test_settle_validates_and_writes_nothing_on_bad_input(fresh_database: str) -> None:
    async with ledger_service(fresh_database, allow_unbudgeted=True) as svc:
        res = await _reserve(svc, "r1")
        for usage, reason in [
            (D.Usage(-1, 0, 0), "INVALID_TOKENS"),
            (D.Usage(0, 2**62 + 1, 0), "INVALID_TOKENS"),
            (D.Usage(5, 0, 6), "INVALID_TOKENS"),
        ]:
            with pytest.raises(E.InvalidArgument) as err:
                await _settle(svc, "r1", res, usage=usage)
            assert err.value.reason == reason
        with pytest.raises(E.InvalidArgument):
            await svc.settle(request_id="r1", reservation_id="not-a-uuid", usage=USAGE, provider="p",
                             provider_model="m")
        with pytest.raises(E.NotFound):
            await svc.settle(request_id="r1", reservation_id="00000000-0000-0000-0000-000000000000",
                             usage=USAGE, provider="p", provider_model="m")
    assert sql(fresh_database, "SELECT count(*) FROM spend_entries") == [(0,)]


async def test_release_frees_once_and_never_touches_settled_holds(fresh_database: str) -> None:
    async with ledger_service(fresh_database) as svc:
        await svc.set_budget(team="t", agent="", window=1, limit_nanos=10 * HOLD)
        res = await _reserve(svc, "r1")
        results = await asyncio.gather(*[svc.release(reservation_id=str(res.hold.reservation_id)) for _ in range(10)])
        assert sorted(results) == [False] * 9 + [True]
        settled = await _reserve(svc, "r2")
        await _settle(svc, "r2", settled)
        assert not await svc.release(reservation_id=str(settled.hold.reservation_id))
        [status] = await svc.get_budget(team="t")
        assert (status.spent_nanos, status.held_nanos) == (COST, 0)
    check_invariants(fresh_database)


async def test_expired_hold_is_captured_once_by_racing_sweepers(fresh_database: str) -> None:
    clock = FakeClock()
    async with ledger_service(fresh_database, clock=clock) as a, ledger_service(fresh_database, clock=clock) as b:
        await a.set_budget(team="t", agent="", window=1, limit_nanos=1000 * HOLD)
        holds = [await _reserve(a, f"r{i}", hold_ttl=dt.timedelta(seconds=30)) for i in range(300)]
        clock.advance(seconds=31)
        captured = await asyncio.gather(*[s.sweep_once(batch=50) for s in (a, b, a, b)])
        assert sum(captured) == 300
        assert await a.sweep_once() == 0
        # A late settle gets the captured entry back (never a second one).
        late = await _settle(a, "r0", holds[0])
        assert late.replayed and D.Flag.UNSETTLED_CAPTURE in late.entry.flags
        assert late.entry.cost_nanos == HOLD and late.entry.outcome == D.Outcome.UNKNOWN
        assert not await a.release(reservation_id=str(holds[1].hold.reservation_id))
    assert sql(fresh_database, "SELECT count(*), sum(cost_nanos) FROM spend_entries WHERE flags & 2 = 2") == [
        (300, 300 * HOLD)
    ]
    assert sql(fresh_database, "SELECT spent_nanos, held_nanos FROM budget_counters") == [(300 * HOLD, 0)]
    check_invariants(fresh_database)


async def test_an_expired_hold_of_an_already_settled_request_is_freed_not_captured(fresh_database: str) -> None:
    clock = FakeClock()
    async with ledger_service(fresh_database, clock=clock) as svc:
        await svc.set_budget(team="t", agent="", window=1, limit_nanos=10 * HOLD)
        await _reserve(svc, "r1", attempt=0)  # leaked: release never arrived
        second = await _reserve(svc, "r1", attempt=1)
        await _settle(svc, "r1", second)
        clock.advance(hours=1)
        assert await svc.sweep_once() == 0
        [status] = await svc.get_budget(team="t")
        assert (status.spent_nanos, status.held_nanos) == (COST, 0)
    check_invariants(fresh_database)


async def test_a_hold_settled_after_the_window_rolled_counts_where_it_was_reserved(fresh_database: str) -> None:
    clock = FakeClock(dt.datetime(2025, 3, 31, 23, 59, 50, tzinfo=dt.UTC))  # a Monday, last day of March
    async with ledger_service(fresh_database, clock=clock) as svc:
        for window in (1, 2, 3, 4):
            await svc.set_budget(team="t", agent="", window=window, limit_nanos=10 * HOLD)
        res = await _reserve(svc, "r1")
        clock.advance(seconds=20)  # now 2025-04-01 00:00:10: new day and month, same week
        await _settle(svc, "r1", res)
        by_window = {s.window: s for s in await svc.get_budget(team="t")}
        assert by_window[D.Window.DAILY].spent_nanos == 0
        assert by_window[D.Window.MONTHLY].spent_nanos == 0
        assert by_window[D.Window.WEEKLY].spent_nanos == COST
        assert by_window[D.Window.TOTAL].spent_nanos == COST
        assert by_window[D.Window.DAILY].window_start == dt.datetime(2025, 4, 1, tzinfo=dt.UTC)
        assert by_window[D.Window.WEEKLY].window_end == dt.datetime(2025, 4, 7, tzinfo=dt.UTC)
    rows = sql(fresh_database, "SELECT b.window, c.window_start, c.spent_nanos, c.held_nanos FROM budget_counters c"
                               " JOIN budgets b ON b.id = c.budget_id ORDER BY 1")
    assert rows == [
        (1, dt.datetime(2025, 3, 31, tzinfo=dt.UTC), COST, 0),
        (2, dt.datetime(2025, 3, 31, tzinfo=dt.UTC), COST, 0),
        (3, dt.datetime(2025, 3, 1, tzinfo=dt.UTC), COST, 0),
        (4, dt.datetime(1970, 1, 1, tzinfo=dt.UTC), COST, 0),
    ]
    check_invariants(fresh_database)


async def test_soft_limit_crossing_is_reported_once_per_window(fresh_database: str) -> None:
    clock = FakeClock()
    async with ledger_service(fresh_database, clock=clock) as svc:
        await svc.set_budget(team="t", agent="", window=1, limit_nanos=100 * HOLD, soft_limit_nanos=3 * COST)
        crossings = svc.metrics.soft_crossings.labels("t")
        for i in range(6):
            await _settle(svc, f"r{i}", await _reserve(svc, f"r{i}"))
        assert crossings._value.get() == 1
        clock.advance(days=1)
        for i in range(6, 12):
            await _settle(svc, f"r{i}", await _reserve(svc, f"r{i}"))
        assert crossings._value.get() == 2
        assert svc.metrics.remaining.labels("t")._value.get() == 100 * HOLD - 6 * COST


async def test_settling_a_released_hold_still_records_the_spend(fresh_database: str) -> None:
    async with ledger_service(fresh_database) as svc:
        await svc.set_budget(team="t", agent="", window=1, limit_nanos=10 * HOLD)
        res = await _reserve(svc, "r1")
        assert await svc.release(reservation_id=str(res.hold.reservation_id))
        out = await _settle(svc, "r1", res)
        assert out.entry.cost_nanos == COST
        [status] = await svc.get_budget(team="t")
        assert (status.spent_nanos, status.held_nanos) == (COST, 0)
    check_invariants(fresh_database)


async def _settle_by_request(svc: LedgerService, rid: str, usage: D.Usage = USAGE) -> D.SettleResult:
    return await svc.settle(request_id=rid, reservation_id="", usage=usage, provider="fake",
                            provider_model="fake-small-v1")


async def test_settle_by_request_id_alone_settles_the_latest_open_attempt(fresh_database: str) -> None:
    async with ledger_service(fresh_database) as svc:
        await svc.set_budget(team="t", agent="", window=1, limit_nanos=10 * HOLD)
        first = await _reserve(svc, "r1", attempt=0)
        assert await svc.release(reservation_id=str(first.hold.reservation_id))  # attempt 0 failed over
        second = await _reserve(svc, "r1", attempt=1)
        third = await _reserve(svc, "r1", attempt=2)  # the latest open attempt
        out = await _settle_by_request(svc, "r1")
        assert not out.replayed and out.entry.reservation_id == third.hold.reservation_id
        assert out.entry.cost_nanos == COST and out.entry.request_id == "r1"
        # Replays: without a reservation id, and with the settled one; the same entry each time.
        again = await _settle_by_request(svc, "r1")
        assert again.replayed and again.entry == out.entry
        explicit = await _settle(svc, "r1", third)
        assert explicit.replayed and explicit.entry == out.entry
        # A different payload, or another attempt's reservation, is a mismatch.
        with pytest.raises(E.Aborted) as err:
            await _settle_by_request(svc, "r1", usage=D.Usage(801, 300, 0))
        assert err.value.reason == "IDEMPOTENCY_MISMATCH"
        with pytest.raises(E.Aborted):
            await _settle(svc, "r1", second)
        [status] = await svc.get_budget(team="t")
        assert (status.spent_nanos, status.held_nanos) == (COST, HOLD)  # attempt 1 is still open
    assert sql(fresh_database, "SELECT count(*) FROM spend_entries") == [(1,)]
    check_invariants(fresh_database)


async def test_settle_by_request_id_without_an_open_hold_is_not_found(fresh_database: str) -> None:
    async with ledger_service(fresh_database, allow_unbudgeted=True) as svc:
        with pytest.raises(E.NotFound) as err:
            await _settle_by_request(svc, "never-reserved")
        assert err.value.reason == "OPEN_HOLD_NOT_FOUND"
        assert err.value.metadata == {"request_id": "never-reserved"}
        released = await _reserve(svc, "released")
        assert await svc.release(reservation_id=str(released.hold.reservation_id))
        with pytest.raises(E.NotFound) as err:
            await _settle_by_request(svc, "released")
        assert err.value.reason == "OPEN_HOLD_NOT_FOUND"
    assert sql(fresh_database, "SELECT count(*) FROM spend_entries") == [(0,)]
    check_invariants(fresh_database)


async def test_concurrent_settles_by_request_id_write_one_entry(fresh_database: str) -> None:
    async with ledger_service(fresh_database) as svc:
        await svc.set_budget(team="t", agent="", window=1, limit_nanos=10 * HOLD)
        res = await _reserve(svc, "conc")
        gate = asyncio.Event()

        async def one(i: int) -> D.SettleResult:
            await gate.wait()
            if i % 2:
                return await _settle(svc, "conc", res)
            return await _settle_by_request(svc, "conc")

        tasks = [asyncio.create_task(one(i)) for i in range(30)]
        await asyncio.sleep(0.05)
        gate.set()
        outs = await asyncio.gather(*tasks)
        assert sum(not o.replayed for o in outs) == 1
        assert {o.entry.id for o in outs} == {outs[0].entry.id}
    assert sql(fresh_database, "SELECT spent_nanos, held_nanos FROM budget_counters") == [(COST, 0)]
    check_invariants(fresh_database)


async def test_settle_by_request_id_after_capture_returns_the_captured_entry(fresh_database: str) -> None:
    clock = FakeClock()
    async with ledger_service(fresh_database, allow_unbudgeted=True, clock=clock) as svc:
        await _reserve(svc, "r1", hold_ttl=dt.timedelta(seconds=30))
        clock.advance(seconds=31)
        assert await svc.sweep_once() == 1
        late = await _settle_by_request(svc, "r1")
        assert late.replayed and D.Flag.UNSETTLED_CAPTURE in late.entry.flags and late.entry.cost_nanos == HOLD
    check_invariants(fresh_database)

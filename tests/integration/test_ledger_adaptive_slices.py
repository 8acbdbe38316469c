"""Adaptive budget slices (ledger 0007): smaller as the budget nears its limit, none at the end,
refused exactly where per-call holds would refuse, never starving another router."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from igw.ledger.v1 import ledger_pb2 as pb
from igw.ledger.v1 import ledger_pb2_grpc
from services.common.errors import error_info_from_rpc_error
from tests.integration.ledger_support import FakeClock, check_invariants, grpc_server, ledger_service, sql
from tests.integration.test_ledger_slices import BOUNDS, _counter, _stub, _unit

# A settle that uses the whole bound: it costs exactly one unit (the per-call hold).
FULL = pb.TokenUsage(input_tokens=1000, output_tokens=1000)


def _slice(sid: str, team: str, calls: int = 64, **kw: object) -> pb.AcquireSliceRequest:
    return pb.AcquireSliceRequest(slice_id=sid, team=team, agent="a", model="fake-small", calls=calls,
                                  **BOUNDS, **kw)  # type: ignore[arg-type]


def _reserve(rid: str, team: str) -> pb.ReserveRequest:
    return pb.ReserveRequest(request_id=rid, attempt=0, team=team, agent="a", model="fake-small", **BOUNDS)


def _full_settle(rid: str, reservation: str) -> pb.SettleRequest:
    return pb.SettleRequest(request_id=rid, reservation_id=reservation, usage=FULL, provider="p", provider_model="m")


async def _router(stub: ledger_pb2_grpc.LedgerServiceStub, name: str, team: str) -> int:
    """A router that calls until refused: slices while it gets them (each fully used, every call
    settled at its full bound), then per-call holds. Returns how many calls it was allowed."""
    calls = 0
    n = 0
    while True:
        n += 1
        try:
            s = await stub.AcquireSlice(_slice(f"{name}-s{n}", team))
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                return calls
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert error_info_from_rpc_error(err).reason == "SLICE_NOT_GRANTED"
            try:
                h = await stub.Reserve(_reserve(f"{name}-r{n}", team))
            except grpc.aio.AioRpcError as err2:
                assert err2.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                return calls
            await stub.Settle(_full_settle(f"{name}-r{n}", h.reservation_id))
            calls += 1
            continue
        batch = [_full_settle(f"{name}-s{n}-c{i}", s.reservation_id) for i in range(s.calls)]
        res = await stub.SettleBatch(pb.SettleBatchRequest(settles=batch))
        assert [r.code for r in res.results] == [0] * len(batch)
        calls += s.calls
        await stub.Release(pb.ReleaseRequest(reservation_id=s.reservation_id))


async def test_slices_shrink_towards_the_limit_and_end_with_none(fresh_database: str, pki: Path) -> None:
    async with ledger_service(fresh_database, allow_unbudgeted=True) as svc, grpc_server(svc, pki) as rt:
        channel, stub = _stub(rt.port, pki)
        async with channel:
            unit = await _unit(stub)
            await svc.set_budget(team="t", agent="", window=4, limit_nanos=1000 * unit)
            grants = []
            while True:
                try:
                    s = await stub.AcquireSlice(_slice(f"s{len(grants)}", "t"))
                except grpc.aio.AioRpcError as err:
                    assert error_info_from_rpc_error(err).reason == "SLICE_NOT_GRANTED"
                    break
                grants.append(s.calls)
            # Far from the limit as large as asked; then a quarter of what is free; none below two.
            assert grants[:3] == [64] * 3
            assert grants[-1] == 2 and sorted(grants, reverse=True) == grants
            free = 1000 - sum(grants)
            assert all(g <= (1000 - sum(grants[:i])) // 4 for i, g in enumerate(grants))
            assert 2 <= free < 8
            # What is left is only per-call holds, every one of them up to the limit.
            for i in range(free):
                await stub.Reserve(_reserve(f"r{i}", "t"))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Reserve(_reserve("over", "t"))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert _counter(fresh_database, "t") == (0, 1000 * unit)
    check_invariants(fresh_database)


async def test_racing_routers_at_the_limit_get_exactly_what_per_call_holds_would(
    fresh_database: str, pki: Path,
) -> None:
    """Four routers race one team to its limit: together they are allowed exactly as many calls
    as per-call holds would allow (the limit over one call's cost), never one more or fewer."""
    async with ledger_service(fresh_database, allow_unbudgeted=True) as svc, grpc_server(svc, pki) as rt:
        channel, stub = _stub(rt.port, pki)
        async with channel:
            unit = await _unit(stub)
            limit_calls = 500
            await svc.set_budget(team="race", agent="", window=4, limit_nanos=limit_calls * unit + unit // 2)
            allowed = await asyncio.gather(*(_router(stub, f"r{i}", "race") for i in range(4)))
            assert sum(allowed) == limit_calls
            # Nobody was starved: every router got calls while budget was free.
            assert all(a > 0 for a in allowed)
            assert _counter(fresh_database, "race") == (limit_calls * unit, 0)
            rows = sql(fresh_database, "SELECT count(*), count(DISTINCT request_id) FROM spend_entries"
                                       " WHERE team = 'race'")
            assert rows == [(limit_calls, limit_calls)]
    check_invariants(fresh_database)


async def test_a_router_dying_with_open_slices_starves_nobody_and_is_captured(fresh_database: str, pki: Path) -> None:
    clock = FakeClock()
    async with ledger_service(fresh_database, clock=clock) as svc, grpc_server(svc, pki) as rt:
        channel, stub = _stub(rt.port, pki)
        async with channel:
            unit = await _unit_budgeted(svc, stub)
            await svc.set_budget(team="d", agent="", window=4, limit_nanos=100 * unit)
            ttl = duration_pb2.Duration(seconds=30)
            # The dying router takes two slices, settles one call of the first, then dies.
            first = await stub.AcquireSlice(_slice("dead-1", "d", hold_ttl=ttl))
            second = await stub.AcquireSlice(_slice("dead-2", "d", hold_ttl=ttl))
            assert (first.calls, second.calls) == (25, 18)  # a quarter of 100, then of 75
            done = await stub.Settle(_full_settle("dead-c0", first.reservation_id))
            # The survivor still gets everything else that is free: 100 - 43 calls.
            assert await _router(stub, "alive", "d") == 57
            clock.advance(seconds=31)
            assert await svc.sweep_once() == 2
            spent, held = _counter(fresh_database, "d")
            assert held == 0 and spent == 100 * unit  # the dead router's slices charged, not more
            flags = sql(fresh_database, "SELECT request_id, cost_nanos FROM spend_entries WHERE flags = 2"
                                        " ORDER BY request_id")
            assert flags == [("dead-1", first.held_nanos - done.entry.cost_nanos), ("dead-2", second.held_nanos)]
    check_invariants(fresh_database)


async def test_a_window_rolling_over_mid_slice_charges_the_slice_window(fresh_database: str, pki: Path) -> None:
    """A slice placed in one day keeps drawing from that day's counter after midnight; the new
    day's budget starts whole, and its first slice is sized from it."""
    clock = FakeClock(dt.datetime(2025, 3, 10, 23, 59, 50, tzinfo=dt.UTC))
    async with ledger_service(fresh_database, clock=clock) as svc, grpc_server(svc, pki) as rt:
        channel, stub = _stub(rt.port, pki)
        async with channel:
            unit = await _unit_budgeted(svc, stub)
            await svc.set_budget(team="w", agent="", window=1, limit_nanos=40 * unit)
            s = await stub.AcquireSlice(_slice("day1", "w"))
            assert s.calls == 10
            await stub.Settle(_full_settle("before-midnight", s.reservation_id))
            clock.advance(seconds=20)
            await stub.Settle(_full_settle("after-midnight", s.reservation_id))
            day2 = await stub.AcquireSlice(_slice("day2", "w"))
            assert day2.calls == 10  # a quarter of the new day's whole budget
            await stub.Release(pb.ReleaseRequest(reservation_id=s.reservation_id))
            await stub.Release(pb.ReleaseRequest(reservation_id=day2.reservation_id))
            rows = sql(fresh_database, "SELECT c.window_start, c.spent_nanos, c.held_nanos FROM budget_counters c"
                                       " JOIN budgets b ON b.id = c.budget_id WHERE b.team = 'w'"
                                       " ORDER BY c.window_start")
            assert [(r[1], r[2]) for r in rows] == [(2 * unit, 0), (0, 0)]
            assert rows[0][0].date() == dt.date(2025, 3, 10) and rows[1][0].date() == dt.date(2025, 3, 11)
    check_invariants(fresh_database)


async def test_a_router_dying_mid_slice_is_never_charged_less_than_it_served(fresh_database: str, pki: Path) -> None:
    """A router dies having served 6 calls from its slice, 2 of them settled: the expiry capture
    charges the slice's whole remainder (what it was granted less what was settled), which covers
    the 4 served calls whose settles died with it; the unused rest is charged too (the ledger
    cannot tell served from unused)."""
    clock = FakeClock()
    async with ledger_service(fresh_database, clock=clock) as svc, grpc_server(svc, pki) as rt:
        channel, stub = _stub(rt.port, pki)
        async with channel:
            unit = await _unit_budgeted(svc, stub)
            await svc.set_budget(team="k", agent="", window=4, limit_nanos=100 * unit)
            s = await stub.AcquireSlice(_slice("dying", "k", hold_ttl=duration_pb2.Duration(seconds=30)))
            assert s.calls == 25 and s.held_nanos == 25 * unit
            for i in range(2):
                await stub.Settle(_full_settle(f"served-{i}", s.reservation_id))
            served = 6 * unit
            clock.advance(seconds=31)
            assert await svc.sweep_once() == 1
            spent, held = _counter(fresh_database, "k")
            assert held == 0 and spent == 25 * unit >= served
            rows = sql(fresh_database, "SELECT request_id, cost_nanos, flags FROM spend_entries WHERE team = 'k'"
                                       " ORDER BY request_id")
            assert rows == [("dying", 23 * unit, 2), ("served-0", unit, 0), ("served-1", unit, 0)]
            # A settle that arrives after the capture still gets its own entry, charged on top of
            # the capture (the capture already counted it): late settles err towards the budget.
            late = await stub.Settle(_full_settle("served-2", s.reservation_id))
            assert late.entry.cost_nanos == unit
            assert _counter(fresh_database, "k") == (26 * unit, 0)
    check_invariants(fresh_database)


async def test_a_rate_limit_minute_rolling_over_mid_slice_counts_its_calls_in_the_minute_it_was_granted(
    fresh_database: str, pki: Path,
) -> None:
    """A slice's calls count against the rate limit when it is granted (all of them, until it
    is returned); a call settled from it after the minute rolled over does not count again in
    the new minute, which starts whole: a new slice is sized from it and per-call holds are
    refused exactly at the limit."""
    clock = FakeClock()
    async with ledger_service(fresh_database, clock=clock, allow_unbudgeted=True) as svc, \
            grpc_server(svc, pki) as rt:
        channel, stub = _stub(rt.port, pki)
        async with channel:
            await svc.set_rate_limit(team="rw", requests_per_minute=20)
            old = await stub.AcquireSlice(_slice("m1", "rw", calls=10))
            assert old.calls == 5  # a quarter of the 20 requests free
            again = await stub.AcquireSlice(_slice("m1b", "rw", calls=10))
            assert again.calls == 3  # a quarter of the 15 left in this minute
            await stub.Settle(_full_settle("m1-c0", old.reservation_id))
            clock.advance(seconds=61)
            new = await stub.AcquireSlice(_slice("m2", "rw", calls=10))
            assert new.calls == 5  # the new minute is whole again
            await stub.Settle(_full_settle("m1-c1", old.reservation_id))  # drawn before the roll-over
            for sid in (old, again, new):
                await stub.Release(pb.ReleaseRequest(reservation_id=sid.reservation_id))
            for i in range(20):
                await stub.Reserve(_reserve(f"r{i}", "rw"))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Reserve(_reserve("over", "rw"))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error_info_from_rpc_error(err.value).reason == "RATE_LIMITED"
    check_invariants(fresh_database)


async def _unit_budgeted(svc: object, stub: ledger_pb2_grpc.LedgerServiceStub) -> int:
    """One call's cost at fake-small's price, probed on a team of its own with a large budget."""
    await svc.set_budget(team="unit-probe", agent="", window=4, limit_nanos=10**15)  # type: ignore[attr-defined]
    return await _unit(stub)

"""NoteSliceDraws: the calls a router drew from its budget slices, recorded before they are
answered, are each captured under their own request id if the router dies (real Postgres, the
real gRPC servicer over mTLS)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from igw.ledger.v1 import ledger_pb2 as pb
from tests.integration.ledger_support import FakeClock, check_invariants, grpc_server, ledger_service, sql
from tests.integration.test_ledger_slices import BOUNDS, _counter, _settle, _slice, _stub

OK = 0


def _draws(*items: tuple[str, str, int] | tuple[str, str, int, bool]) -> pb.NoteSliceDrawsRequest:
    return pb.NoteSliceDrawsRequest(draws=[
        pb.SliceDraw(reservation_id=i[0], request_id=i[1], held_nanos=i[2], withdrawn=bool(i[3:] and i[3]))
        for i in items])


async def test_a_dead_routers_recorded_draws_are_captured_under_their_own_request_ids(
    fresh_database: str, pki: Path,
) -> None:
    """A slice with three recorded draws: one settled, one withdrawn (the call failed before
    spending), one answered but never settled (the router died). At expiry the unsettled one
    gets its own entry at its hold, flagged unsettled; what is left of the slice goes under the
    slice's id; the withdrawn call costs nothing; a settle arriving later is a replay."""
    clock = FakeClock()
    async with ledger_service(fresh_database, clock=clock) as svc, grpc_server(svc, pki) as rt:
        await svc.set_budget(team="st", agent="", window=4, limit_nanos=10**12)
        channel, stub = _stub(rt.port, pki)
        async with channel:
            s = await stub.AcquireSlice(_slice("slice-dying", hold_ttl=duration_pb2.Duration(seconds=30)))
            per_call = s.per_call_nanos
            res = await stub.NoteSliceDraws(_draws((s.reservation_id, "settled", per_call),
                                                   (s.reservation_id, "withdrawn", per_call),
                                                   (s.reservation_id, "answered", per_call)))
            assert [r.code for r in res.results] == [OK] * 3
            # A repeat (a retried batch) records nothing twice.
            res = await stub.NoteSliceDraws(_draws((s.reservation_id, "answered", per_call)))
            assert [r.code for r in res.results] == [OK]
            assert sql(fresh_database, "SELECT count(*) FROM slice_draws") == [(3,)]
            done = await stub.Settle(_settle("settled", s.reservation_id))
            res = await stub.NoteSliceDraws(_draws((s.reservation_id, "withdrawn", per_call, True)))
            assert [r.code for r in res.results] == [OK]
            clock.advance(seconds=31)
            assert await svc.sweep_once() == 2
            rows = sql(fresh_database, "SELECT request_id, cost_nanos, flags FROM spend_entries ORDER BY request_id")
            left = s.held_nanos - done.entry.cost_nanos - per_call
            assert rows == [("answered", per_call, 2), ("settled", done.entry.cost_nanos, 0), ("slice-dying", left, 2)]
            # The whole slice is charged, never more: the team pays what it held.
            assert _counter(fresh_database, "st") == (s.held_nanos, 0)
            assert sql(fresh_database, "SELECT count(*) FROM slice_draws") == [(0,)]
            # The answered call's settle arrives late (another router retried it): a replay of the
            # captured entry, nothing charged on top.
            late = await stub.Settle(_settle("answered", s.reservation_id))
            assert late.replayed and late.entry.cost_nanos == per_call
            assert _counter(fresh_database, "st") == (s.held_nanos, 0)
            # A draw for a slice that is gone is refused, not recorded.
            res = await stub.NoteSliceDraws(_draws((s.reservation_id, "too-late", per_call)))
            assert [(r.code, r.reason) for r in res.results] == [
                (grpc.StatusCode.FAILED_PRECONDITION.value[0], "SLICE_CLOSED")]
    check_invariants(fresh_database)


async def test_unsettled_draws_are_never_charged_more_than_the_slice_has_left(fresh_database: str, pki: Path) -> None:
    """Draws recorded for more than the slice holds (a router bug) are charged only up to what
    is left of the slice: the capture never charges more than was held."""
    clock = FakeClock()
    async with ledger_service(fresh_database, clock=clock) as svc, grpc_server(svc, pki) as rt:
        await svc.set_budget(team="st", agent="", window=4, limit_nanos=10**12)
        channel, stub = _stub(rt.port, pki)
        async with channel:
            s = await stub.AcquireSlice(_slice("slice-greedy", calls=2, hold_ttl=duration_pb2.Duration(seconds=5)))
            res = await stub.NoteSliceDraws(_draws(*[(s.reservation_id, f"d{i}", s.held_nanos // 2) for i in range(3)]))
            assert [r.code for r in res.results] == [OK] * 3
            clock.advance(seconds=6)
            await svc.sweep_once()
            rows = sql(fresh_database, "SELECT request_id, cost_nanos FROM spend_entries ORDER BY request_id")
            assert sum(r[1] for r in rows) == s.held_nanos
            assert [r[0] for r in rows] == ["d0", "d1", "d2", "slice-greedy"]
            assert rows[2][1] == s.held_nanos - 2 * (s.held_nanos // 2)
    check_invariants(fresh_database)


async def test_a_released_slice_forgets_its_draws(fresh_database: str, pki: Path) -> None:
    async with ledger_service(fresh_database) as svc, grpc_server(svc, pki) as rt:
        await svc.set_budget(team="st", agent="", window=4, limit_nanos=10**12)
        channel, stub = _stub(rt.port, pki)
        async with channel:
            s = await stub.AcquireSlice(_slice("slice-kept"))
            await stub.NoteSliceDraws(_draws((s.reservation_id, "c1", s.per_call_nanos)))
            await stub.Settle(_settle("c1", s.reservation_id))
            await stub.Release(pb.ReleaseRequest(reservation_id=s.reservation_id))
            assert sql(fresh_database, "SELECT count(*) FROM slice_draws") == [(0,)]
            assert sql(fresh_database, "SELECT request_id FROM spend_entries") == [("c1",)]
    check_invariants(fresh_database)


async def test_bad_draws_are_refused_one_by_one(fresh_database: str, pki: Path) -> None:
    """Each item gets its own answer: a malformed one does not spoil the batch; an empty or
    oversized batch is refused whole; only the router identity may record draws."""
    async with ledger_service(fresh_database) as svc, grpc_server(svc, pki) as rt:
        await svc.set_budget(team="st", agent="", window=4, limit_nanos=10**12)
        channel, stub = _stub(rt.port, pki)
        async with channel:
            s = await stub.AcquireSlice(_slice("slice-ok"))
            hold = await stub.Reserve(pb.ReserveRequest(request_id="per-call", attempt=0, team="st", agent="a",
                                                        model="fake-small", **BOUNDS))
            res = await stub.NoteSliceDraws(_draws(
                (s.reservation_id, "good", 5),
                (s.reservation_id, "bad id\n", 5),
                ("not-a-uuid", "x", 5),
                (s.reservation_id, "negative", -1),
                ("00000000-0000-4000-8000-000000000000", "nowhere", 5),
                (hold.reservation_id, "per-call", 5),
            ))
            invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert [(r.code, r.reason) for r in res.results] == [
                (OK, ""),
                (invalid, "INVALID_NAME"),
                (invalid, "INVALID_RESERVATION_ID"),
                (invalid, "INVALID_AMOUNT"),
                (grpc.StatusCode.NOT_FOUND.value[0], "SLICE_NOT_FOUND"),
                (grpc.StatusCode.FAILED_PRECONDITION.value[0], "NOT_A_SLICE"),
            ]
            assert sql(fresh_database, "SELECT request_id FROM slice_draws") == [("good",)]
            for req in (pb.NoteSliceDrawsRequest(),
                        _draws(*[(s.reservation_id, f"r{i}", 1) for i in range(1025)])):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.NoteSliceDraws(req)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        channel, op_stub = _stub(rt.port, pki, "operator-admin")
        async with channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await op_stub.NoteSliceDraws(_draws((s.reservation_id, "op", 1)))
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    _ = _counter


async def test_a_draw_note_says_when_the_slices_team_is_over_a_lowered_limit(fresh_database: str, pki: Path) -> None:
    """A slice granted far from the limit; the operator then lowers the limit below what is spent
    and held: the next draw is still recorded, but answered ``over_limit`` (the router gives the
    team's slices back). An agent budget lowered the same way says so too; raised again, no flag."""
    async with ledger_service(fresh_database) as svc, grpc_server(svc, pki) as rt:
        await svc.set_budget(team="st", agent="", window=4, limit_nanos=10**12)
        channel, stub = _stub(rt.port, pki)
        async with channel:
            s = await stub.AcquireSlice(_slice("slice-lowered"))
            per_call = s.per_call_nanos
            res = await stub.NoteSliceDraws(_draws((s.reservation_id, "before", per_call)))
            assert [(r.code, r.over_limit) for r in res.results] == [(OK, False)]
            # Lowered below the slice's hold (spent 0, held s.held_nanos).
            await svc.set_budget(team="st", agent="", window=4, limit_nanos=s.held_nanos - 1)
            res = await stub.NoteSliceDraws(_draws((s.reservation_id, "after", per_call),
                                                   (s.reservation_id, "gone", per_call, True)))
            assert [(r.code, r.over_limit) for r in res.results] == [(OK, True), (OK, False)]
            assert sql(fresh_database, "SELECT request_id FROM slice_draws ORDER BY request_id") == [
                ("after",), ("before",)]
            # Exactly at the limit is not over it.
            await svc.set_budget(team="st", agent="", window=4, limit_nanos=s.held_nanos)
            res = await stub.NoteSliceDraws(_draws((s.reservation_id, "at", per_call)))
            assert [(r.code, r.over_limit) for r in res.results] == [(OK, False)]
            # An agent budget set below what the slice holds (it counts against it from now on).
            await svc.set_budget(team="st", agent="a", window=4, limit_nanos=per_call)
            res = await stub.NoteSliceDraws(_draws((s.reservation_id, "agent", per_call)))
            assert [(r.code, r.over_limit) for r in res.results] == [(OK, True)]
            await stub.Release(pb.ReleaseRequest(reservation_id=s.reservation_id, reason="test"))
    check_invariants(fresh_database)

"""Budget slices (AcquireSlice): one hold for many calls, each call still its own spend entry."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from igw.ledger.v1 import ledger_pb2 as pb
from igw.ledger.v1 import ledger_pb2_grpc
from services.common.errors import error_info_from_rpc_error
from services.common.money import call_cost
from services.common.tls import secure_channel
from tests.integration.ledger_support import FakeClock, check_invariants, grpc_server, ledger_service, sql

# fake-small's catalogue prices and one call's bounds: the unit every slice here is sized in.
BOUNDS = {"prompt_tokens_upper_bound": 1000, "max_output_tokens": 1000}


def _slice(sid: str, team: str = "st", calls: int = 10, **kw: object) -> pb.AcquireSliceRequest:
    return pb.AcquireSliceRequest(slice_id=sid, team=team, agent="a", model="fake-small", calls=calls,
                                  **BOUNDS, **kw)  # type: ignore[arg-type]


def _settle(rid: str, reservation: str, out: int = 10) -> pb.SettleRequest:
    return pb.SettleRequest(request_id=rid, reservation_id=reservation,
                            usage=pb.TokenUsage(input_tokens=100, output_tokens=out),
                            provider="p", provider_model="m")


def _stub(port: int, pki: Path, who: str = "router") -> tuple[grpc.aio.Channel, ledger_pb2_grpc.LedgerServiceStub]:
    channel = secure_channel(f"127.0.0.1:{port}", pki / f"{who}.pem", pki / f"{who}-key.pem", pki / "ca.pem")
    return channel, ledger_pb2_grpc.LedgerServiceStub(channel)


def _counter(url: str, team: str) -> tuple[int, int]:
    rows = sql(url, "SELECT c.spent_nanos, c.held_nanos FROM budget_counters c JOIN budgets b ON b.id = c.budget_id"
                    " WHERE b.team = %s AND b.agent = ''", (team,))
    assert len(rows) == 1
    return int(rows[0][0]), int(rows[0][1])


async def _unit(stub: ledger_pb2_grpc.LedgerServiceStub) -> int:
    probe = await stub.AcquireSlice(_slice("unit-probe", team="unit-probe", calls=1))
    await stub.Release(pb.ReleaseRequest(reservation_id=probe.reservation_id))
    return probe.per_call_nanos


async def test_a_slice_is_one_hold_and_each_call_settles_to_its_own_entry(fresh_database: str, pki: Path) -> None:
    async with ledger_service(fresh_database) as svc, grpc_server(svc, pki) as rt:
        await svc.set_budget(team="st", agent="", window=4, limit_nanos=10**12)
        channel, stub = _stub(rt.port, pki)
        async with channel:
            s = await stub.AcquireSlice(_slice("s1"))
            assert s.calls == 10 and s.per_call_nanos > 0 and s.held_nanos == 10 * s.per_call_nanos
            assert s.per_call_nanos == call_cost(1000, 1000, 0, *_prices(fresh_database, s.price_version))
            assert _counter(fresh_database, "st") == (0, s.held_nanos)
            costs = []
            for i in range(3):
                r = await stub.Settle(_settle(f"call-{i}", s.reservation_id, out=10 + i))
                assert not r.replayed and r.entry.request_id == f"call-{i}" and r.entry.team == "st"
                assert r.entry.held_nanos == r.entry.cost_nanos  # drawn from the slice, all of it
                costs.append(r.entry.cost_nanos)
            assert _counter(fresh_database, "st") == (sum(costs), s.held_nanos - sum(costs))
            # Exactly once per request id: a replay returns the same entry, another payload is refused.
            again = await stub.Settle(_settle("call-1", s.reservation_id, out=11))
            assert again.replayed and again.entry.cost_nanos == costs[1]
            for bad, reason in ((_settle("call-1", s.reservation_id, out=99), "IDEMPOTENCY_MISMATCH"),
                                (_settle("s1", s.reservation_id), "RESERVATION_MISMATCH")):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Settle(bad)
                assert error_info_from_rpc_error(err.value).reason == reason
            # The slice stays open for its other calls; releasing it returns what is left.
            assert sql(fresh_database, "SELECT state, amount_nanos FROM holds WHERE id = %s",
                       (s.reservation_id,)) == [("OPEN", s.held_nanos - sum(costs))]
            assert (await stub.Release(pb.ReleaseRequest(reservation_id=s.reservation_id))).released
            assert _counter(fresh_database, "st") == (sum(costs), 0)
            # A settle that arrives after the release still gets its one entry, and counts as spent.
            late = await stub.Settle(_settle("call-late", s.reservation_id))
            assert _counter(fresh_database, "st") == (sum(costs) + late.entry.cost_nanos, 0)
    assert sql(fresh_database, "SELECT count(*) FROM spend_entries") == [(4,)]
    check_invariants(fresh_database)


def _prices(url: str, version: int) -> tuple[int, int, int]:
    rows = sql(url, "SELECT input_per_mtok_nanos, output_per_mtok_nanos FROM prices WHERE version = %s"
                    " AND model = 'fake-small'", (version,))
    return int(rows[0][0]), int(rows[0][1]), 0


async def test_a_slice_gets_a_quarter_of_what_the_tightest_budget_has_free(fresh_database: str, pki: Path) -> None:
    async with ledger_service(fresh_database, allow_unbudgeted=True) as svc, grpc_server(svc, pki) as rt:
        channel, stub = _stub(rt.port, pki)
        async with channel:
            unit = await _unit(stub)
            await svc.set_budget(team="st", agent="", window=4, limit_nanos=100 * unit)
            await svc.set_budget(team="st", agent="a", window=1, limit_nanos=unit * 29 // 2)  # room for 14
            s = await stub.AcquireSlice(_slice("s1", calls=10))
            assert (s.calls, s.held_nanos) == (3, 3 * unit)  # a quarter of 14.5 calls' room
            assert {(b.agent, b.held_nanos) for b in s.budgets} == {("", 3 * unit), ("a", 3 * unit)}
            assert (await stub.AcquireSlice(_slice("s2", calls=10))).calls == 2  # a quarter of 11.5
            assert (await stub.AcquireSlice(_slice("s3", calls=10))).calls == 2  # a quarter of 9.5
            # 7.5 calls free: a quarter is one call, so no slice (nothing placed); per-call holds instead.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.AcquireSlice(_slice("s4", calls=10))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert error_info_from_rpc_error(err.value).reason == "SLICE_NOT_GRANTED"
            assert sql(fresh_database, "SELECT count(*) FROM holds WHERE request_id = 's4'") == [(0,)]
            for i in range(7):
                await stub.Reserve(pb.ReserveRequest(request_id=f"r{i}", attempt=0, team="st", agent="a",
                                                     model="fake-small", **BOUNDS))
            # Not even one more call fits: refused like a Reserve, with the budget in the details.
            for call in (stub.AcquireSlice(_slice("s5", calls=1)),
                         stub.Reserve(pb.ReserveRequest(request_id="r", attempt=0, team="st", agent="a",
                                                        model="fake-small", **BOUNDS))):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                info = error_info_from_rpc_error(err.value)
                assert info.reason == "BUDGET_EXCEEDED" and info.metadata["agent"] == "a"
            # Another agent of the team is only bound by the team budget (86 calls free).
            other = await stub.AcquireSlice(pb.AcquireSliceRequest(
                slice_id="s6", team="st", agent="b", model="fake-small", calls=64, **BOUNDS))
            assert other.calls == 21
            await stub.Settle(_settle("c1", s.reservation_id))
            await stub.Release(pb.ReleaseRequest(reservation_id=s.reservation_id))
            # The release gave the agent's budget room again: one per-call hold more fits.
            await stub.Reserve(pb.ReserveRequest(request_id="r8", attempt=0, team="st", agent="a",
                                                 model="fake-small", **BOUNDS))
    check_invariants(fresh_database)


async def test_acquire_slice_is_idempotent_and_validates_its_input(fresh_database: str, pki: Path) -> None:
    async with ledger_service(fresh_database, allow_unbudgeted=True) as svc, grpc_server(svc, pki) as rt:
        channel, stub = _stub(rt.port, pki)
        async with channel:
            first, again = await asyncio.gather(stub.AcquireSlice(_slice("same")), stub.AcquireSlice(_slice("same")))
            assert first.reservation_id == again.reservation_id
            assert sql(fresh_database, "SELECT count(*) FROM holds WHERE request_id = 'same'") == [(1,)]
            bad = [
                (_slice("same", team="other"), grpc.StatusCode.ABORTED, "IDEMPOTENCY_MISMATCH"),
                (_slice("x", calls=0), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SLICE_CALLS"),
                (_slice("x", calls=1025), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SLICE_CALLS"),
                (_slice("bad id!"), grpc.StatusCode.INVALID_ARGUMENT, None),
                (pb.AcquireSliceRequest(slice_id="x", team="st", agent="a", model="no-such-model", calls=2, **BOUNDS),
                 grpc.StatusCode.FAILED_PRECONDITION, "MODEL_NOT_PRICED"),
            ]
            for req, code, reason in bad:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.AcquireSlice(req)
                assert err.value.code() == code, req
                if reason:
                    assert error_info_from_rpc_error(err.value).reason == reason
        # Only the router identity may lease budget.
        channel, op_stub = _stub(rt.port, pki, "operator-admin")
        async with channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await op_stub.AcquireSlice(_slice("op"))
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_slice_nobody_releases_is_captured_at_expiry(fresh_database: str, pki: Path) -> None:
    """A router that dies leaves its slice open: at expiry the ledger charges what is left of it,
    flagged unsettled; a settle that still arrives later gets its entry and counts on top."""
    clock = FakeClock()
    async with ledger_service(fresh_database, clock=clock) as svc, grpc_server(svc, pki) as rt:
        await svc.set_budget(team="st", agent="", window=4, limit_nanos=10**12)
        channel, stub = _stub(rt.port, pki)
        async with channel:
            s = await stub.AcquireSlice(_slice("dying", hold_ttl=duration_pb2.Duration(seconds=30)))
            done = await stub.Settle(_settle("before-crash", s.reservation_id))
            clock.advance(seconds=29)
            assert await svc.sweep_once() == 0
            clock.advance(seconds=2)
            assert await svc.sweep_once() == 1
            left = s.held_nanos - done.entry.cost_nanos
            rows = sql(fresh_database, "SELECT request_id, cost_nanos, flags FROM spend_entries ORDER BY id")
            assert rows == [("before-crash", done.entry.cost_nanos, 0), ("dying", left, 2)]
            assert _counter(fresh_database, "st") == (s.held_nanos, 0)
            late = await stub.Settle(_settle("after-capture", s.reservation_id))
            assert _counter(fresh_database, "st") == (s.held_nanos + late.entry.cost_nanos, 0)
    check_invariants(fresh_database)


async def test_slices_and_reserves_at_once_never_overspend_or_deadlock(fresh_database: str, pki: Path) -> None:
    """Two 'routers' lease slices of the same teams and settle their calls in batches in
    opposite orders, while other calls Reserve: every budget holds, every settle lands once."""
    rng = random.Random(7)
    teams = ["h0", "h1"]
    async with ledger_service(fresh_database, allow_unbudgeted=True) as svc, grpc_server(svc, pki) as rt:
        channel, stub = _stub(rt.port, pki)
        async with channel:
            unit = await _unit(stub)
            for team in teams:
                await svc.set_budget(team=team, agent="", window=4, limit_nanos=40 * unit)
            deadlocks = sql(fresh_database, "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")

            async def router(name: str) -> list[str]:
                settled: list[str] = []
                for round_ in range(6):
                    slices = []
                    for team in teams:
                        try:
                            req = _slice(f"{name}-{round_}-{team}", team=team, calls=4)
                            slices.append(await stub.AcquireSlice(req))
                        except grpc.aio.AioRpcError as err:
                            assert err.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                  grpc.StatusCode.FAILED_PRECONDITION)
                    batch = [_settle(f"{name}-{round_}-{k}-{i}", s.reservation_id, out=rng.randint(1, 900))
                             for k, s in enumerate(slices) for i in range(s.calls)]
                    if name == "r2":
                        batch.reverse()
                    if batch:
                        res = await stub.SettleBatch(pb.SettleBatchRequest(settles=batch))
                        assert [r.code for r in res.results] == [0] * len(batch)
                        settled += [b.request_id for b in batch]
                    await asyncio.gather(*(stub.Release(pb.ReleaseRequest(reservation_id=s.reservation_id))
                                           for s in slices))
                return settled

            async def reserver() -> int:
                n = 0
                for i in range(30):
                    try:
                        h = await stub.Reserve(pb.ReserveRequest(request_id=f"rv-{i}", attempt=0, team=teams[i % 2],
                                                                 agent="a", model="fake-small", **BOUNDS))
                    except grpc.aio.AioRpcError as err:
                        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                        continue
                    await stub.Settle(_settle(f"rv-{i}", h.reservation_id, out=500))
                    n += 1
                return n

            a, b, reserved = await asyncio.gather(router("r1"), router("r2"), reserver())
    rows = sql(fresh_database, "SELECT count(*), count(DISTINCT request_id) FROM spend_entries")
    assert rows == [(len(a) + len(b) + reserved,) * 2]
    assert len(a) + len(b) > 0
    spent = sql(fresh_database, "SELECT c.spent_nanos, c.held_nanos FROM budget_counters c")
    assert all(s <= 40 * unit and h == 0 for s, h in spent)
    after = sql(fresh_database, "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
    assert after == deadlocks
    check_invariants(fresh_database)


async def test_one_team_many_agents_concurrent_settle_batches_never_deadlock(fresh_database: str, pki: Path) -> None:
    """A hot team: four agents each draw from a slice of their own (each agent with a budget too),
    three 'routers' settle batches mixing the agents in different orders while single settles
    and Reserves of the same team run: before 0008 these deadlocked (hold, rollup row and budget
    counters taken in different orders), which Postgres breaks only after a second."""
    rng = random.Random(11)
    agents = ["a0", "a1", "a2", "a3"]
    async with ledger_service(fresh_database) as svc, grpc_server(svc, pki) as rt:
        await svc.set_budget(team="hot", agent="", window=4, limit_nanos=10**15)
        for agent in agents:
            await svc.set_budget(team="hot", agent=agent, window=4, limit_nanos=10**14)
        channel, stub = _stub(rt.port, pki)
        async with channel:
            deadlocks = sql(fresh_database, "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
            slices = {}
            for agent in agents:
                req = pb.AcquireSliceRequest(slice_id=f"s-{agent}", team="hot", agent=agent, model="fake-small",
                                             calls=200, **BOUNDS)  # type: ignore[arg-type]
                slices[agent] = (await stub.AcquireSlice(req)).reservation_id
            counter = iter(range(10**6))

            async def router(name: str) -> int:
                n = 0
                for _ in range(12):
                    batch = [_settle(f"{name}-{next(counter)}", slices[rng.choice(agents)], out=rng.randint(1, 50))
                             for _ in range(rng.randint(2, 8))]
                    res = await stub.SettleBatch(pb.SettleBatchRequest(settles=batch, codes_only=True), timeout=30)
                    assert [r.code for r in res.results] == [0] * len(batch)
                    n += len(batch)
                return n

            async def single() -> int:
                for i in range(20):
                    await stub.Settle(_settle(f"one-{i}", slices[agents[i % 4]]), timeout=30)
                return 20

            async def reserver() -> int:
                for i in range(20):
                    h = await stub.Reserve(pb.ReserveRequest(request_id=f"rv-{i}", attempt=0, team="hot",
                                                             agent=agents[(i + 1) % 4], model="fake-small", **BOUNDS))
                    await stub.Settle(_settle(f"rv-{i}", h.reservation_id), timeout=30)
                return 20

            counts = await asyncio.gather(router("r1"), router("r2"), router("r3"), single(), reserver())
            for rid in slices.values():
                await stub.Release(pb.ReleaseRequest(reservation_id=rid))
    rows = sql(fresh_database, "SELECT count(*), count(DISTINCT request_id) FROM spend_entries")
    assert rows == [(sum(counts),) * 2]
    after = sql(fresh_database, "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
    assert after == deadlocks
    check_invariants(fresh_database)

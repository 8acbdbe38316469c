"""Reserve against real Postgres: exact budgets under real concurrency, validation, idempotency."""

from __future__ import annotations

import asyncio
import datetime as dt

import grpc
import pytest

from igw.ledger.v1 import ledger_pb2 as pb
from igw.ledger.v1 import ledger_pb2_grpc
from services.common import errors as E
from services.common.tls import secure_channel
from services.ledger.service import LedgerService
from tests.integration.ledger_support import FakeClock, check_invariants, grpc_server, ledger_service, sql

# fake-small: $0.10 in / $0.40 out per Mtok -> 1000 in + 1000 out = 100_000 + 400_000 nanos.
HOLD = 500_000


async def _race(svc: LedgerService, team: str, n: int, *, agent: str = "a") -> list[object]:
    gate = asyncio.Event()

    async def one(i: int) -> object:
        await gate.wait()
        try:
            return await svc.reserve(
                request_id=f"{team}-r{i}", attempt=0, team=team, agent=agent, model="fake-small",
                prompt_tokens_upper_bound=1000, max_output_tokens=1000,
            )
        except E.IgwError as err:
            return err

    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    await asyncio.sleep(0.05)
    gate.set()
    return await asyncio.gather(*tasks)


@pytest.mark.parametrize("case", ["existing-counters", "brand-new-team", "new-window"])
async def test_200_concurrent_reserves_exactly_n_fit_the_budget(fresh_database: str, case: str) -> None:
    n_fit = 37
    clock = FakeClock()
    async with ledger_service(fresh_database, pool_size=20, clock=clock) as svc:
        await svc.set_budget(team="t", agent="", window=1, limit_nanos=n_fit * HOLD + HOLD - 1)
        if case == "existing-counters":  # a reserve in this window, then released
            r = await svc.reserve(request_id="warm", attempt=0, team="t", agent="a", model="fake-small",
                                  prompt_tokens_upper_bound=1000, max_output_tokens=1000)
            assert await svc.release(reservation_id=str(r.hold.reservation_id))
        elif case == "new-window":  # the racing reserves create today's counter themselves
            clock.advance(days=1)
            sql(fresh_database, "DELETE FROM budget_counters")  # yesterday's, empty: one row to check below
        else:  # SetBudget created the team and its counter just now, with nothing spent
            assert sql(fresh_database, "SELECT spent_nanos, held_nanos FROM budget_counters") == [(0, 0)]
        results = await _race(svc, "t", 200)
    ok = [r for r in results if not isinstance(r, E.IgwError)]
    denied = [r for r in results if isinstance(r, E.IgwError)]
    assert len(ok) == n_fit
    assert all(isinstance(d, E.ResourceExhausted) and d.reason == "BUDGET_EXCEEDED" for d in denied)
    for r in ok:
        for b in r.budgets:  # type: ignore[attr-defined]
            assert b.spent_nanos + b.held_nanos <= b.limit_nanos
    assert sql(fresh_database, "SELECT held_nanos FROM budget_counters") == [(n_fit * HOLD,)]
    check_invariants(fresh_database)


async def test_team_and_agent_budgets_must_both_hold(fresh_database: str) -> None:
    async with ledger_service(fresh_database) as svc:
        await svc.set_budget(team="t", agent="", window=3, limit_nanos=10 * HOLD)
        await svc.set_budget(team="t", agent="small", window=4, limit_nanos=2 * HOLD)
        results = await _race(svc, "t", 10, agent="small")
        assert sum(not isinstance(r, E.IgwError) for r in results) == 2
        denied = next(r for r in results if isinstance(r, E.IgwError))
        assert denied.metadata["agent"] == "small" and denied.metadata["window"] == "TOTAL"
        assert denied.metadata["remaining_nanos"] == "0"
        # Another agent still has the rest of the team budget.
        results = await _race(svc, "t", 20, agent="other")
        assert sum(not isinstance(r, E.IgwError) for r in results) == 8
    check_invariants(fresh_database)


async def test_a_team_without_budget_is_refused_by_default(fresh_database: str) -> None:
    async with ledger_service(fresh_database) as svc:
        with pytest.raises(E.FailedPrecondition) as exc:
            await svc.reserve(request_id="r1", attempt=0, team="free", agent="a", model="fake-small",
                              prompt_tokens_upper_bound=10, max_output_tokens=10)
        assert exc.value.reason == "NO_BUDGET"
        assert exc.value.metadata == {"team": "free", "agent": "a"}
        with pytest.raises(E.FailedPrecondition) as exc:
            await svc.acquire_slice(slice_id="s1", team="free", agent="a", model="fake-small",
                                    prompt_tokens_upper_bound=10, max_output_tokens=10, calls=4)
        assert exc.value.reason == "NO_BUDGET"
        # An agent budget applies to its agent only; the team's other agents are still refused.
        await svc.set_budget(team="free", agent="b", window=1, limit_nanos=10**9)
        await svc.reserve(request_id="r2", attempt=0, team="free", agent="b", model="fake-small",
                          prompt_tokens_upper_bound=10, max_output_tokens=10)
        with pytest.raises(E.FailedPrecondition):
            await svc.reserve(request_id="r3", attempt=0, team="free", agent="a", model="fake-small",
                              prompt_tokens_upper_bound=10, max_output_tokens=10)
    assert sql(fresh_database, "SELECT request_id FROM holds") == [("r2",)]


async def test_a_team_without_budget_is_unlimited_when_the_operator_allows_it(fresh_database: str) -> None:
    async with ledger_service(fresh_database, allow_unbudgeted=True) as svc:
        res = await svc.reserve(request_id="r1", attempt=0, team="free", agent="a", model="fake-large",
                                prompt_tokens_upper_bound=10**6, max_output_tokens=10**6)
        assert res.budgets == []
        assert res.hold.amount_nanos == 3_000_000_000 + 15_000_000_000
    assert sql(fresh_database, "SELECT state, amount_nanos FROM holds") == [("OPEN", 18_000_000_000)]


async def test_reserve_is_idempotent_on_request_id_and_attempt(fresh_database: str) -> None:
    async with ledger_service(fresh_database) as svc:
        await svc.set_budget(team="t", agent="", window=1, limit_nanos=10 * HOLD)
        kw = dict(request_id="r1", team="t", agent="a", model="fake-small",
                  prompt_tokens_upper_bound=1000, max_output_tokens=1000)
        first = await svc.reserve(attempt=0, **kw)  # type: ignore[arg-type]
        again = await svc.reserve(attempt=0, **kw)  # type: ignore[arg-type]
        assert again.replayed and again.hold.reservation_id == first.hold.reservation_id
        other = await svc.reserve(attempt=1, **kw)  # type: ignore[arg-type]
        assert other.hold.reservation_id != first.hold.reservation_id
        with pytest.raises(E.Aborted) as err:
            await svc.reserve(attempt=0, **{**kw, "max_output_tokens": 5})  # type: ignore[arg-type]
        assert err.value.reason == "IDEMPOTENCY_MISMATCH"
        # Concurrent duplicates place one hold.
        results = await asyncio.gather(*[svc.reserve(attempt=7, **kw) for _ in range(20)])  # type: ignore[arg-type]
        assert len({r.hold.reservation_id for r in results}) == 1
    assert sql(fresh_database, "SELECT held_nanos FROM budget_counters") == [(3 * HOLD,)]
    check_invariants(fresh_database)


BAD = [
    ({"prompt_tokens_upper_bound": -1}, E.InvalidArgument, "INVALID_TOKENS"),
    ({"max_output_tokens": -5}, E.InvalidArgument, "INVALID_TOKENS"),
    ({"prompt_tokens_upper_bound": 2**62 + 1}, E.InvalidArgument, "INVALID_TOKENS"),
    ({"max_output_tokens": 2**62 + 1}, E.InvalidArgument, "INVALID_TOKENS"),
    ({"model": ""}, E.InvalidArgument, "MISSING_FIELD"),
    ({"team": ""}, E.InvalidArgument, "MISSING_FIELD"),
    ({"request_id": ""}, E.InvalidArgument, "MISSING_FIELD"),
    ({"team": "bad team!"}, E.InvalidArgument, "INVALID_NAME"),
    ({"model": "no-such-model"}, E.FailedPrecondition, "MODEL_NOT_PRICED"),
    # Fits in tokens but the hold would pass 2**62 nano-dollars.
    ({"prompt_tokens_upper_bound": 2**62, "model": "claude-opus-4-1"}, E.InvalidArgument, "INVALID_TOKENS"),
]


@pytest.mark.parametrize(("change", "exc", "reason"), BAD)
async def test_bad_reserve_is_refused_and_nothing_is_written(
    fresh_database: str, change: dict[str, object], exc: type[E.IgwError], reason: str
) -> None:
    async with ledger_service(fresh_database) as svc:
        await svc.set_budget(team="t", agent="", window=1, limit_nanos=10**12)
        kw: dict[str, object] = dict(request_id="r1", attempt=0, team="t", agent="a", model="fake-small",
                                     prompt_tokens_upper_bound=1000, max_output_tokens=1000)
        with pytest.raises(exc) as err:
            await svc.reserve(**{**kw, **change})  # type: ignore[arg-type]
        assert err.value.reason == reason
    assert sql(fresh_database, "SELECT (SELECT count(*) FROM holds), (SELECT count(*) FROM spend_entries),"
                               " (SELECT coalesce(sum(held_nanos + spent_nanos), 0) FROM budget_counters)") == [
        (0, 0, 0)
    ]


async def test_grpc_maps_errors_and_budget_details(fresh_database: str, pki) -> None:  # type: ignore[no-untyped-def]
    clock = FakeClock()
    async with ledger_service(fresh_database, clock=clock) as svc, grpc_server(svc, pki) as rt:
        await svc.set_budget(team="t", agent="", window=1, limit_nanos=HOLD, soft_limit_nanos=HOLD // 2)
        router = secure_channel(f"127.0.0.1:{rt.port}", pki / "router.pem", pki / "router-key.pem", pki / "ca.pem")
        agent = secure_channel(f"127.0.0.1:{rt.port}", pki / "agent-demo-quickstart.pem",
                               pki / "agent-demo-quickstart-key.pem", pki / "ca.pem")
        async with router, agent:
            stub = ledger_pb2_grpc.LedgerServiceStub(router)
            req = pb.ReserveRequest(request_id="g1", attempt=0, team="t", agent="a", model="fake-small",
                                    prompt_tokens_upper_bound=1000, max_output_tokens=1000)
            ok = await stub.Reserve(req)
            assert ok.held_nanos == HOLD and ok.budgets[0].remaining_nanos == 0
            assert ok.budgets[0].window_start.ToDatetime(tzinfo=dt.UTC) == dt.datetime(2025, 3, 10, tzinfo=dt.UTC)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Reserve(pb.ReserveRequest(**{**_fields(req), "request_id": "g2"}))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            info = E.error_info_from_rpc_error(err.value)
            assert info is not None and info.reason == "BUDGET_EXCEEDED" and info.domain == "ledger.igw"
            assert info.metadata["limit_nanos"] == str(HOLD) and info.metadata["held_nanos"] == str(HOLD)
            assert info.metadata["remaining_nanos"] == "0" and info.metadata["window"] == "DAILY"
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Reserve(pb.ReserveRequest(**{**_fields(req), "request_id": "g3",
                                                        "prompt_tokens_upper_bound": -1}))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert E.error_info_from_rpc_error(err.value).reason == "INVALID_TOKENS"  # type: ignore[union-attr]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Reserve(pb.ReserveRequest(**{**_fields(req), "request_id": "g4", "model": "nope"}))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            # Agents may not call Reserve.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ledger_pb2_grpc.LedgerServiceStub(agent).Reserve(req)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            budget = await stub.GetBudget(pb.GetBudgetRequest(team="t"))
            assert budget.budgets[0].held_nanos == HOLD
    assert sql(fresh_database, "SELECT count(*) FROM holds") == [(1,)]


def _fields(msg: pb.ReserveRequest) -> dict[str, object]:
    return {f.name: v for f, v in msg.ListFields()}

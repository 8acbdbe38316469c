"""Release by request id: a call that ended early leaves no hold, even one placed after it left."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from pathlib import Path

import grpc
import pytest

from igw.ledger.v1 import ledger_pb2 as pb
from igw.ledger.v1 import ledger_pb2_grpc
from services.common import errors as E
from services.common.errors import error_info_from_rpc_error
from services.common.tls import secure_channel
from services.ledger import domain as D
from services.ledger.service import LedgerService
from tests.integration.ledger_support import FakeClock, check_invariants, grpc_server, ledger_service, sql

BUDGET = 10**12


async def _reserve(svc: LedgerService, rid: str, attempt: int = 1, team: str = "t") -> str:
    res = await svc.reserve(request_id=rid, attempt=attempt, team=team, agent="a", model="fake-small",
                            prompt_tokens_upper_bound=100, max_output_tokens=1024)
    return str(res.hold.reservation_id)


async def test_release_by_request_id_frees_every_attempt_and_refuses_later_holds(fresh_database: str) -> None:
    async with ledger_service(fresh_database) as svc:
        await svc.set_budget(team="t", agent="", window=1, limit_nanos=BUDGET)
        await _reserve(svc, "call-1", 1)
        await _reserve(svc, "call-1", 2)
        other = await _reserve(svc, "call-2", 1)
        [before] = await svc.get_budget(team="t")
        assert before.held_nanos > 0

        assert await svc.release_request(request_id="call-1", reason="cancelled") is True
        # Idempotent: a second release frees nothing and changes nothing.
        assert await svc.release_request(request_id="call-1", reason="cancelled") is False
        [after] = await svc.get_budget(team="t")
        assert after.held_nanos == before.held_nanos * 1 // 3  # only call-2's hold is left
        # A Reserve for the released request id, of a known or a new attempt, creates nothing.
        for attempt in (1, 3):
            with pytest.raises(E.FailedPrecondition) as exc:
                await _reserve(svc, "call-1", attempt)
            assert exc.value.reason == "REQUEST_RELEASED"
            assert exc.value.metadata == {"request_id": "call-1"}
        # Other requests are untouched.
        assert sql(fresh_database, "SELECT id::text, state FROM holds WHERE request_id = 'call-2'") == [
            (other, "OPEN")]
    assert sql(fresh_database, "SELECT attempt, state, release_reason FROM holds WHERE request_id = 'call-1'"
                               " ORDER BY attempt") == [(1, "RELEASED", "cancelled"), (2, "RELEASED", "cancelled")]
    assert sql(fresh_database, "SELECT count(*) FROM spend_entries") == [(0,)]
    check_invariants(fresh_database)


async def test_a_release_before_the_reserve_lands_means_the_reserve_creates_nothing(fresh_database: str) -> None:
    async with ledger_service(fresh_database) as svc:
        await svc.set_budget(team="t", agent="", window=1, limit_nanos=BUDGET)
        # The router gave up before its Reserve reached the ledger: the release comes first.
        assert await svc.release_request(request_id="late", reason="deadline") is False
        with pytest.raises(E.FailedPrecondition) as exc:
            await _reserve(svc, "late")
        assert exc.value.reason == "REQUEST_RELEASED"
        [status] = await svc.get_budget(team="t")
        assert status.held_nanos == 0
    assert sql(fresh_database, "SELECT count(*) FROM holds") == [(0,)]


async def test_releases_racing_reserves_of_the_same_request_never_leave_an_open_hold(fresh_database: str) -> None:
    async with ledger_service(fresh_database, pool_size=20) as svc:
        await svc.set_budget(team="t", agent="", window=1, limit_nanos=BUDGET)

        async def reserve(rid: str) -> None:
            with contextlib.suppress(E.FailedPrecondition):
                await _reserve(svc, rid)

        for round_ in range(5):
            rids = [f"race-{round_}-{i}" for i in range(40)]
            await asyncio.gather(*(op for rid in rids for op in (
                reserve(rid), svc.release_request(request_id=rid, reason="cancelled"))))
        [status] = await svc.get_budget(team="t")
        assert status.held_nanos == 0
    assert sql(fresh_database, "SELECT count(*) FROM holds WHERE state = 'OPEN'") == [(0,)]
    assert sql(fresh_database, "SELECT count(*) FROM request_releases") == [(200,)]
    check_invariants(fresh_database)


async def test_a_settled_call_released_by_request_id_keeps_its_entry(fresh_database: str) -> None:
    async with ledger_service(fresh_database) as svc:
        await svc.set_budget(team="t", agent="", window=1, limit_nanos=BUDGET)
        rid = await _reserve(svc, "done")
        res = await svc.settle(request_id="done", reservation_id=rid, usage=D.Usage(4, 2, 0), provider="p",
                               provider_model="m")
        assert await svc.release_request(request_id="done", reason="cancelled") is False
        [status] = await svc.get_budget(team="t")
        assert (status.spent_nanos, status.held_nanos) == (res.entry.cost_nanos, 0)
    check_invariants(fresh_database)


async def test_release_records_are_purged_after_a_day(fresh_database: str) -> None:
    clock = FakeClock()
    async with ledger_service(fresh_database, clock=clock) as svc:
        await svc.release_request(request_id="old", reason="cancelled")
        clock.advance(hours=23)
        await svc.release_request(request_id="young", reason="cancelled")
        await svc.sweep_once()
        assert sql(fresh_database, "SELECT request_id FROM request_releases ORDER BY 1") == [("old",), ("young",)]
        clock.advance(hours=2)
        await svc.sweep_once()
        assert sql(fresh_database, "SELECT request_id FROM request_releases") == [("young",)]


async def test_a_captured_hold_records_its_amount_and_no_tokens(fresh_database: str) -> None:
    clock = FakeClock()
    async with ledger_service(fresh_database, clock=clock) as svc:
        await svc.set_budget(team="t", agent="", window=1, limit_nanos=BUDGET)
        res = await svc.reserve(request_id="dead-router", attempt=1, team="t", agent="a", model="fake-small",
                                prompt_tokens_upper_bound=100, max_output_tokens=1024,
                                hold_ttl=dt.timedelta(seconds=1))
        clock.advance(seconds=2)
        assert await svc.sweep_once() == 1
    assert sql(fresh_database, "SELECT cost_nanos, input_tokens, output_tokens, cached_input_tokens, flags"
                               " FROM spend_entries") == [(res.hold.amount_nanos, 0, 0, 0, 2)]
    check_invariants(fresh_database)


async def test_release_by_request_id_over_grpc(fresh_database: str, pki: Path) -> None:
    async with ledger_service(fresh_database) as svc, grpc_server(svc, pki) as rt:
        await svc.set_budget(team="t", agent="", window=1, limit_nanos=BUDGET)
        await _reserve(svc, "g1")
        async with secure_channel(f"127.0.0.1:{rt.port}", pki / "router.pem", pki / "router-key.pem",
                                  pki / "ca.pem") as ch:
            stub = ledger_pb2_grpc.LedgerServiceStub(ch)
            assert (await stub.Release(pb.ReleaseRequest(request_id="g1", reason="cancelled"))).released
            assert not (await stub.Release(pb.ReleaseRequest(request_id="g1"))).released
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stub.Reserve(pb.ReserveRequest(
                    request_id="g1", attempt=2, team="t", agent="a", model="fake-small",
                    prompt_tokens_upper_bound=1, max_output_tokens=1))
            assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stub.Release(pb.ReleaseRequest(request_id="g1", reservation_id="x"))
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stub.Reserve(pb.ReserveRequest(
                    request_id="g2", attempt=1, team="nobudget", agent="a", model="fake-small",
                    prompt_tokens_upper_bound=1, max_output_tokens=1))
            assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            info = error_info_from_rpc_error(exc.value)
            assert info is not None and info.reason == "NO_BUDGET"

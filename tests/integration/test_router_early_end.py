"""A call that ends early is billed for what the provider did, and every lease ends visibly.

The router against a real ledger (Postgres, mTLS) with a stand-in vault that records EndLease:
a Reserve whose answer comes after the caller left, or never comes, leaves no hold (the call
releases its request id); a stream cut after the provider reported its input count is charged
with that count; a lease that comes back unused is returned with the reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from igw.keyvault.v1 import keyvault_pb2
from services.common import errors as E
from services.router import service as service_mod
from services.router.providers import TextDelta, Usage, UsageSoFar
from services.router.providers.errors import ErrorKind, ProviderError
from services.router.translate import prepare
from tests.integration.ledger_support import check_invariants, sql
from tests.integration.test_router_attempt_cleanup import AGENT, TEAM, _call, _request, _router


def _spy_ledger(router: Any, **methods: Any) -> None:
    ledger = router.backends.ledger
    spy = SimpleNamespace(Reserve=ledger.Reserve, Release=ledger.Release, AcquireSlice=ledger.AcquireSlice)
    for name, fn in methods.items():
        setattr(spy, name, fn)
    router.backends = dataclasses.replace(router.backends, ledger=spy)


def _unavailable() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                details="connection reset")


async def _no_hold_left(database: str, svc: Any, rid: str) -> None:
    assert sql(database, "SELECT count(*) FROM holds WHERE request_id = %s AND state = 'OPEN'", (rid,)) == [(0,)]
    (budget,) = await svc.get_budget(team=TEAM)
    assert (budget.held_nanos, budget.spent_nanos) == (0, 0)


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
async def test_a_reserve_that_lands_after_the_caller_left_leaves_no_hold(
    fresh_database: str, pki: Path, streaming: bool,
) -> None:
    rid = f"r-{uuid.uuid4().hex}"
    async with _router(fresh_database, pki) as (router, svc):
        real = router.backends.ledger.Reserve
        landed: list[asyncio.Task[Any]] = []

        def reserve(req: Any, timeout: float) -> Any:
            async def slow() -> Any:  # the ledger commits the hold well after the caller gave up
                await asyncio.sleep(0.3)
                return await real(req, timeout=5)

            landed.append(asyncio.ensure_future(slow()))
            return asyncio.shield(landed[0])  # hanging up does not stop the ledger

        _spy_ledger(router, Reserve=reserve)
        call = asyncio.ensure_future(_call(router, rid, streaming))
        await asyncio.sleep(0.05)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await landed[0]  # the late Reserve is refused: the request id was released first
        assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        await router.drain(5)
        await _no_hold_left(fresh_database, svc, rid)
        assert sql(fresh_database, "SELECT count(*) FROM holds") == [(0,)]
        # The lease issued alongside went back unused.
        ends = router.backends.vault.ended
        assert [(e.end, e.reason, e.request_id) for e in ends] == [
            (keyvault_pb2.LEASE_END_RETURNED, "CANCELLED", rid)]
        assert router.metrics.lease_ends.labels("returned")._value.get() == 1
    check_invariants(fresh_database)


async def test_a_reserve_committed_by_a_ledger_that_died_before_answering_is_released(
    fresh_database: str, pki: Path,
) -> None:
    rid = f"r-{uuid.uuid4().hex}"
    async with _router(fresh_database, pki) as (router, svc):
        real = router.backends.ledger.Reserve

        async def reserve_then_die(req: Any, timeout: float) -> Any:
            await real(req, timeout=5)  # committed...
            raise _unavailable()  # ...and the answer never came

        _spy_ledger(router, Reserve=lambda req, timeout: asyncio.ensure_future(reserve_then_die(req, timeout)))
        with pytest.raises(E.Unavailable) as info:
            await _call(router, rid, False)
        assert info.value.reason == "LEDGER_UNAVAILABLE"
        await router.drain(5)
        await _no_hold_left(fresh_database, svc, rid)
        assert sql(fresh_database, "SELECT state, release_reason FROM holds WHERE request_id = %s", (rid,)) == [
            ("RELEASED", "unavailable")]
        assert router.metrics.request_releases.labels("sent")._value.get() == 1
    check_invariants(fresh_database)


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
async def test_calls_with_deadlines_of_a_few_milliseconds_leave_nothing_held(
    fresh_database: str, pki: Path, streaming: bool,
) -> None:
    async with _router(fresh_database, pki) as (router, svc):
        rids = [f"r-{uuid.uuid4().hex}" for _ in range(40)]

        async def one(i: int, rid: str) -> None:
            deadline = (1 + i % 10) / 1000
            req = _request(rid)
            try:
                if streaming:
                    async for _ in router.generate_stream(AGENT, req, deadline):
                        pass
                else:
                    await asyncio.wait_for(router.generate(AGENT, req, deadline), deadline)
            except (E.IgwError, TimeoutError):
                pass

        await asyncio.gather(*(one(i, rid) for i, rid in enumerate(rids)))
        await router.drain(10)
        # Every call reached the ledger or gave up first; none left a hold, none was charged.
        (budget,) = await svc.get_budget(team=TEAM)
        assert (budget.held_nanos, budget.spent_nanos) == (0, 0)
        assert sql(fresh_database, "SELECT count(*) FROM holds WHERE state = 'OPEN'") == [(0,)]
        # The sweeper has nothing to capture, now or later.
        assert await svc.sweep_once() == 0
    assert sql(fresh_database, "SELECT count(*) FROM spend_entries") == [(0,)]
    check_invariants(fresh_database)


class _CutStream:
    """A stream that reports its input count (as Anthropic's message_start does), sends one text
    delta, then breaks (or, ``hang``, waits for the agent to hang up)."""

    name = "cut"

    def __init__(self, hang: bool) -> None:
        self.hang = hang

    async def complete(self, *args: Any) -> Any:
        raise AssertionError("unary not used")

    async def stream(self, *args: Any) -> AsyncIterator[Any]:
        yield UsageSoFar(Usage(input_tokens=4, output_tokens=1))
        yield TextDelta("partial answer")
        if self.hang:
            await asyncio.Event().wait()
        raise ProviderError(ErrorKind.SERVER_ERROR, "stream broke", status_code=None)


@pytest.mark.parametrize("hang", [False, True], ids=["broken", "agent_hung_up"])
async def test_a_stream_cut_after_the_provider_reported_its_input_is_charged_with_that_count(
    fresh_database: str, pki: Path, monkeypatch: pytest.MonkeyPatch, hang: bool,
) -> None:
    monkeypatch.setattr(service_mod, "get_adapter", lambda kind: _CutStream(hang))
    rid = f"r-{uuid.uuid4().hex}"
    async with _router(fresh_database, pki) as (router, svc):
        upper = prepare(_request(rid), router.config.limits).prompt_tokens_upper_bound
        assert upper > 4
        got: list[Any] = []
        streamed = asyncio.Event()

        async def consume() -> None:
            async for msg in router.generate_stream(AGENT, _request(rid), 10.0):
                got.append(msg)
                if msg.HasField("text_delta"):
                    streamed.set()

        if hang:  # the agent hangs up while the stream waits for more
            task = asyncio.ensure_future(consume())
            await asyncio.wait_for(streamed.wait(), 5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            with pytest.raises(E.Unavailable):
                await consume()
        assert any(m.HasField("text_delta") for m in got)
        await router.drain(5)
        rows = sql(fresh_database, "SELECT input_tokens, output_tokens, outcome, flags FROM spend_entries"
                                   " WHERE request_id = %s", (rid,))
        # The provider's 4 input tokens, not the router's upper bound; output counted from the text.
        assert [(r[0], r[1] >= 1, r[2], r[3] & 2) for r in rows] == [(4, True, 2 if hang else 3, 0)]
        (budget,) = await svc.get_budget(team=TEAM)
        assert budget.held_nanos == 0
        # The lease was used (the request went out), and said so.
        assert [(e.end, e.reason) for e in router.backends.vault.ended] == [
            (keyvault_pb2.LEASE_END_USED, "STREAMED")]
    check_invariants(fresh_database)


async def test_a_call_refused_for_budget_returns_its_lease_unused_with_the_reason(
    fresh_database: str, pki: Path,
) -> None:
    async with _router(fresh_database, pki) as (router, svc):
        await svc.set_budget(team=TEAM, agent="", window=4, limit_nanos=1)  # nothing fits
        rid = f"r-{uuid.uuid4().hex}"
        with pytest.raises(E.ResourceExhausted):
            await _call(router, rid, False)
        await router.drain(5)
        ends = router.backends.vault.ended
        assert [(e.end, e.reason, e.request_id, e.lease_id, e.team, e.provider) for e in ends] == [
            (keyvault_pb2.LEASE_END_RETURNED, "BUDGET_EXCEEDED", rid, "l1", TEAM, "p")]
        # Refused by the ledger: no hold was placed, so nothing is released by request id.
        assert sql(fresh_database, "SELECT count(*) FROM request_releases") == [(0,)]
    check_invariants(fresh_database)


class _SlowProvider:
    """A provider slower than the agent's deadline: the router's timeout (the deadline) cuts it."""

    name = "slow"

    async def complete(self, http: Any, base_url: str, secret: str, req: Any, timeouts: Any) -> Any:
        await asyncio.sleep(timeouts.total_s)
        raise ProviderError(ErrorKind.TIMEOUT, "timed out", status_code=None)

    async def stream(self, *args: Any) -> AsyncIterator[Any]:
        raise AssertionError("not used")
        yield


async def test_a_timeout_the_agents_deadline_imposed_does_not_open_the_breaker(
    fresh_database: str, pki: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(service_mod, "get_adapter", lambda kind: _SlowProvider())
    async with _router(fresh_database, pki) as (router, svc):  # breaker threshold: one failure
        for _ in range(3):
            with pytest.raises(E.DeadlineExceeded):
                await router.generate(AGENT, _request(f"r-{uuid.uuid4().hex}"), 0.15)
        assert router.breakers["d"].try_acquire() is True  # closed: the deployment did nothing wrong
        await router.drain(5)
        (budget,) = await svc.get_budget(team=TEAM)
        assert (budget.held_nanos, budget.spent_nanos) == (0, 0)
    check_invariants(fresh_database)


class _StartedOnly:
    """A stream that reports its input count (message_start) and then sends nothing for a while."""

    name = "started"

    async def complete(self, *args: Any) -> Any:
        raise AssertionError("unary not used")

    async def stream(self, *args: Any) -> AsyncIterator[Any]:
        yield UsageSoFar(Usage(input_tokens=4, output_tokens=1))
        await asyncio.Event().wait()
        yield TextDelta("never")


async def test_an_agent_that_leaves_after_the_provider_reported_its_input_pays_that_input(
    fresh_database: str, pki: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(service_mod, "get_adapter", lambda kind: _StartedOnly())
    rid = f"r-{uuid.uuid4().hex}"
    async with _router(fresh_database, pki) as (router, svc):
        task = asyncio.ensure_future(_call(router, rid, True))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await router.drain(5)
        rows = sql(fresh_database, "SELECT input_tokens, output_tokens, outcome FROM spend_entries"
                                   " WHERE request_id = %s", (rid,))
        assert rows == [(4, 1, 2)]  # the provider's counts, outcome CANCELLED
        (budget,) = await svc.get_budget(team=TEAM)
        assert budget.held_nanos == 0 and budget.spent_nanos > 0
        assert [(e.end, e.reason) for e in router.backends.vault.ended] == [(keyvault_pb2.LEASE_END_USED, "CANCELLED")]
    check_invariants(fresh_database)

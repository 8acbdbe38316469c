"""The router with budget slices on, against a real ledger (Postgres, mTLS): calls take their
holds from a slice instead of a Reserve each, still settle one spend entry per request id, never
overspend, give failed attempts' holds back, and return what is left at shutdown."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from igw.ledger.v1 import ledger_pb2_grpc
from igw.router.v1 import router_pb2
from services.common import errors as E
from services.common.identity import Identity, Kind
from services.common.tls import secure_channel
from services.ledger.service import LedgerService
from services.router import service as service_mod
from services.router.metrics import RouterMetrics
from services.router.providers import make_http_client
from services.router.providers.domain import ChatResponse, FinishReason, Usage
from services.router.providers.errors import ErrorKind, ProviderError
from services.router.routing import parse_config
from services.router.service import Backends, Router
from services.router.translate import prepare
from tests.integration.ledger_support import check_invariants, grpc_server, ledger_service, sql
from tests.integration.test_router_attempt_cleanup import BASE_URL, _Vault

TEAM = "sliced"
CONFIG = f"""
providers:
  p: {{type: openai, base_url: "{BASE_URL}", local: true}}
deployments:
  d: {{provider: p, model: fake-small, price: fake-small}}
models:
  m: {{candidates: [d]}}
retries: {{max_attempts: 1}}
breaker: {{failure_threshold: 1000}}
budget_slices: {{enabled: true, calls: 8, draw_window_ms: 60000, teams: [{TEAM}], busy_calls: 1, busy_in_flight: 1}}
""".encode()
MAX_OUT = 64


def _agent(team: str = TEAM) -> Identity:
    return Identity(f"spiffe://igw.local/team/{team}/agent/a1", Kind.AGENT, team=team, agent="a1")


class _Adapter:
    """Answers at once; usage is the call's full bounds (so a call costs exactly its hold) or
    small; ``fail`` makes every call a retryable provider error."""

    name = "stub"

    def __init__(self) -> None:
        self.full = False
        self.fail = False
        # The prompt token bound the router holds for (_request's prompt): a "full" call uses it all.
        self.prompt_bound = prepare(_request("x"), parse_config(CONFIG).limits).prompt_tokens_upper_bound

    async def complete(self, http: Any, base: str, secret: str, chat: Any, timeouts: Any) -> ChatResponse:
        await asyncio.sleep(0.001)
        if self.fail:
            raise ProviderError(ErrorKind.SERVER_ERROR, "HTTP 500", status_code=500)
        usage = Usage(self.prompt_bound, chat.max_output_tokens) if self.full else Usage(7, 3)
        return ChatResponse("hi", (), FinishReason.STOP, usage, "r")


class _Spy:
    """The real ledger stub, counting the Reserves that went through."""

    def __init__(self, stub: ledger_pb2_grpc.LedgerServiceStub) -> None:
        self._stub = stub
        self.reserves = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stub, name)

    def Reserve(self, req: Any, timeout: float) -> Any:
        self.reserves += 1
        return self._stub.Reserve(req, timeout=timeout)


@asynccontextmanager
async def _router(database: str, pki: Path, adapter: _Adapter, limit: int = 10**12
                  ) -> AsyncIterator[tuple[Router, LedgerService, _Spy]]:
    async with ledger_service(database) as svc, grpc_server(svc, pki) as rt:
        for team in (TEAM, "plain"):
            await svc.set_budget(team=team, agent="", window=4, limit_nanos=limit)
        channel = secure_channel(f"127.0.0.1:{rt.port}", pki / "router.pem", pki / "router-key.pem", pki / "ca.pem")
        http = make_http_client()
        spy = _Spy(ledger_pb2_grpc.LedgerServiceStub(channel))
        try:
            backends = Backends(ledger=spy, ledger_admin=ledger_pb2_grpc.LedgerAdminServiceStub(channel),  # type: ignore[arg-type]
                                vault=_Vault())  # type: ignore[arg-type]
            router = Router(parse_config(CONFIG), backends, http, RouterMetrics(CollectorRegistry()))
            yield router, svc, spy
        finally:
            await http.aclose()
            await channel.close()


def _request(rid: str) -> router_pb2.GenerateRequest:
    req = router_pb2.GenerateRequest(model="m", request_id=rid, max_output_tokens=MAX_OUT)
    req.messages.add(role=router_pb2.ROLE_USER).parts.add(text="hello there")
    return req


@pytest.fixture
def adapter(monkeypatch: pytest.MonkeyPatch) -> _Adapter:
    a = _Adapter()
    monkeypatch.setattr(service_mod, "get_adapter", lambda kind: a)
    return a


def _held_spent(url: str, team: str) -> tuple[int, int]:
    rows = sql(url, "SELECT c.held_nanos, c.spent_nanos FROM budget_counters c JOIN budgets b ON b.id = c.budget_id"
                    " WHERE b.team = %s", (team,))
    return (int(rows[0][0]), int(rows[0][1])) if rows else (0, 0)


async def test_sliced_calls_take_no_reserve_and_settle_once_each(
    fresh_database: str, pki: Path, adapter: _Adapter,
) -> None:
    async with _router(fresh_database, pki, adapter) as (router, _svc, spy):
        rids = [f"s-{i}-{uuid.uuid4().hex[:8]}" for i in range(40)]
        answers = await asyncio.gather(*(router.generate(_agent(), _request(r), 10.0) for r in rids))
        assert [a.request_id for a in answers] == rids
        assert all(a.cost_nanos > 0 for a in answers)
        # A team without slices still reserves per call.
        await router.generate(_agent("plain"), _request("plain-1"), 10.0)
        assert spy.reserves == 1
        assert router.metrics.slice_draws._value.get() == 40
        held, _ = _held_spent(fresh_database, TEAM)
        assert held > 0  # the active slice is still leased
        await router.drain(10)
    slices = sql(fresh_database, "SELECT slice_calls, state FROM holds WHERE team = %s", (TEAM,))
    assert slices and all(n == 8 and state == "RELEASED" for n, state in slices)
    assert 5 <= len(slices) <= 8  # 40 calls in slices of 8 (concurrent callers share acquisitions)
    entries = sql(fresh_database, "SELECT request_id, cost_nanos FROM spend_entries WHERE team = %s", (TEAM,))
    assert sorted(r for r, _ in entries) == sorted(rids)
    assert sum(c for _, c in entries) == sum(a.cost_nanos for a in answers)
    # Drained: every slice went back, the team is charged exactly its calls.
    assert _held_spent(fresh_database, TEAM) == (0, sum(a.cost_nanos for a in answers))
    check_invariants(fresh_database)


async def test_a_failed_attempt_gives_its_hold_back_to_the_slice(
    fresh_database: str, pki: Path, adapter: _Adapter,
) -> None:
    adapter.fail = True
    async with _router(fresh_database, pki, adapter) as (router, _svc, spy):
        for i in range(3):
            with pytest.raises(E.IgwError) as err:
                await router.generate(_agent(), _request(f"f-{i}"), 10.0)
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert spy.reserves == 0
        book = router.slices.stats()
        assert book == {"active": 1, "open_calls": 0}
        await router.drain(10)
    assert sql(fresh_database, "SELECT count(*) FROM spend_entries") == [(0,)]
    assert sql(fresh_database, "SELECT state FROM holds") == [("RELEASED",)]
    assert _held_spent(fresh_database, TEAM) == (0, 0)
    check_invariants(fresh_database)


async def test_a_team_at_its_limit_is_refused_and_never_overspends(
    fresh_database: str, pki: Path, adapter: _Adapter,
) -> None:
    """Each call costs exactly its hold; the budget has room for 3.5 calls: three calls are
    served from a slice granted for 3, the fourth is refused with the budget in the details."""
    adapter.full = True
    async with _router(fresh_database, pki, adapter) as (router, svc, _spy):
        probe = await router.generate(_agent("plain"), _request("probe"), 10.0)
        unit = probe.cost_nanos
        await svc.set_budget(team=TEAM, agent="", window=4, limit_nanos=unit * 7 // 2)
        served = [await router.generate(_agent(), _request(f"l-{i}"), 10.0) for i in range(3)]
        assert [a.cost_nanos for a in served] == [unit] * 3
        with pytest.raises(E.IgwError) as err:
            await router.generate(_agent(), _request("l-3"), 10.0)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.value.reason == "BUDGET_EXCEEDED"
        await router.drain(10)
    assert _held_spent(fresh_database, TEAM) == (0, 3 * unit)
    check_invariants(fresh_database)


async def test_a_call_cancelled_while_its_lease_is_pending_gives_its_hold_back(
    fresh_database: str, pki: Path, adapter: _Adapter,
) -> None:
    async with _router(fresh_database, pki, adapter) as (router, _svc, _spy):
        await router.generate(_agent(), _request("warm"), 10.0)  # a slice is active
        router.backends.vault.hang = True  # type: ignore[attr-defined]
        call = asyncio.ensure_future(router.generate(_agent(), _request("gone"), 10.0))
        await asyncio.sleep(0.1)
        assert router.slices.stats()["open_calls"] == 1
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert router.slices.stats()["open_calls"] == 0
        await router.drain(10)
    assert sql(fresh_database, "SELECT request_id FROM spend_entries") == [("warm",)]
    held, _ = _held_spent(fresh_database, TEAM)
    assert held == 0
    check_invariants(fresh_database)


async def test_a_slice_whose_answer_was_lost_is_found_again_and_given_back(
    fresh_database: str, pki: Path, adapter: _Adapter,
) -> None:
    """The ledger placed the slice but the router never heard (a timeout): the call falls back to
    a Reserve, and the router asks again with the same slice id and releases what it finds."""
    async with _router(fresh_database, pki, adapter) as (router, _svc, spy):
        real = spy._stub.AcquireSlice
        lost: list[str] = []

        async def first_answer_lost(req: Any, timeout: float) -> Any:
            resp = await real(req, timeout=timeout)
            if not lost:
                lost.append(resp.reservation_id)
                raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                           details="connection reset")
            return resp

        spy.AcquireSlice = first_answer_lost  # type: ignore[attr-defined]
        answer = await router.generate(_agent(), _request("lost-1"), 10.0)
        assert answer.cost_nanos > 0 and spy.reserves == 1  # served through a per-call hold
        deadline = asyncio.get_running_loop().time() + 10
        while sql(fresh_database, "SELECT state FROM holds WHERE id = %s", (lost[0],)) != [("RELEASED",)]:
            assert asyncio.get_running_loop().time() < deadline, "the orphaned slice was not given back"
            await asyncio.sleep(0.05)
        assert router.metrics.slices.labels("failed")._value.get() == 1
        await router.drain(10)
    assert _held_spent(fresh_database, TEAM) == (0, answer.cost_nanos)
    check_invariants(fresh_database)

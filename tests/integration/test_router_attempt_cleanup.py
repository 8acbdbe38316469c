"""The router's attempt path against a real ledger (Postgres, mTLS): an attempt that ends in an
exception other than a ProviderError releases its budget hold and its breaker probe before the
error reaches the agent; an adapter's ValueError (untranslatable request) is INVALID_ARGUMENT."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from igw.keyvault.v1 import keyvault_pb2
from igw.ledger.v1 import ledger_pb2_grpc
from igw.router.v1 import router_pb2
from services.common import errors as E
from services.common.identity import Identity, Kind
from services.common.tls import secure_channel
from services.ledger.service import LedgerService
from services.router import service as service_mod
from services.router.metrics import RouterMetrics
from services.router.providers import make_http_client
from services.router.routing import parse_config
from services.router.service import Backends, Router
from tests.integration.ledger_support import check_invariants, grpc_server, ledger_service, sql

BASE_URL = "http://127.0.0.1:9"
CONFIG = f"""
providers:
  p: {{type: gemini, base_url: "{BASE_URL}", local: true}}
deployments:
  d: {{provider: p, model: fake-small, price: fake-small}}
models:
  m: {{candidates: [d]}}
retries: {{max_attempts: 1}}
breaker: {{failure_threshold: 1, cooldown_ms: 1, probe_timeout_ms: 600000}}
budget_slices: {{enabled: false}}  # per-call holds: each attempt's own hold is what is checked
""".encode()
TEAM = "cleanup"
AGENT = Identity(f"spiffe://igw.local/team/{TEAM}/agent/a1", Kind.AGENT, team=TEAM, agent="a1")


class _Vault:
    """Stands in for the KeyVault: every lease is good for the configured base URL. Like a gRPC
    aio call, the call is under way once made and can be cancelled; ``hang`` never answers."""

    def __init__(self) -> None:
        self.hang = False
        self.refuse: BaseException | None = None
        self.ended: list[keyvault_pb2.EndLeaseRequest] = []

    def IssueCredential(self, req: Any, timeout: float) -> asyncio.Future[keyvault_pb2.IssueCredentialResponse]:
        return asyncio.ensure_future(self._issue())

    def EndLease(self, req: keyvault_pb2.EndLeaseRequest, timeout: float) -> asyncio.Future[None]:
        self.ended.append(req)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    def EndLeaseBatch(self, req: keyvault_pb2.EndLeaseBatchRequest, timeout: float) -> asyncio.Future[None]:
        self.ended.extend(req.items)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    async def _issue(self) -> keyvault_pb2.IssueCredentialResponse:
        if self.hang:
            await asyncio.Event().wait()
        if self.refuse is not None:
            raise self.refuse
        return keyvault_pb2.IssueCredentialResponse(lease_id="l1", secret="sk-test-key", base_url=BASE_URL)


class _BrokenAdapter:
    """An adapter that fails with ``exc`` before sending anything, unary and streaming."""

    name = "broken"

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def complete(self, *args: Any) -> Any:
        raise self.exc

    async def stream(self, *args: Any) -> AsyncIterator[Any]:
        raise self.exc
        yield  # an async generator, like the real adapters


@asynccontextmanager
async def _router(database: str, pki: Path) -> AsyncIterator[tuple[Router, LedgerService]]:
    async with ledger_service(database) as svc, grpc_server(svc, pki) as rt:
        await svc.set_budget(team=TEAM, agent="", window=4, limit_nanos=10**12)
        channel = secure_channel(f"127.0.0.1:{rt.port}", pki / "router.pem", pki / "router-key.pem", pki / "ca.pem")
        http = make_http_client()
        try:
            backends = Backends(ledger=ledger_pb2_grpc.LedgerServiceStub(channel),
                                ledger_admin=ledger_pb2_grpc.LedgerAdminServiceStub(channel),
                                vault=_Vault())  # type: ignore[arg-type]
            yield Router(parse_config(CONFIG), backends, http, RouterMetrics(CollectorRegistry())), svc
        finally:
            await http.aclose()
            await channel.close()


def _request(rid: str) -> router_pb2.GenerateRequest:
    req = router_pb2.GenerateRequest(model="m", request_id=rid, max_output_tokens=64)
    req.messages.add(role=router_pb2.ROLE_USER).parts.add(text="hello there")
    return req


async def _call(router: Router, rid: str, streaming: bool) -> None:
    if streaming:
        async for _ in router.generate_stream(AGENT, _request(rid), 10.0):
            pass
    else:
        await router.generate(AGENT, _request(rid), 10.0)


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize(
    ("exc", "expected"),
    [(ValueError("tool result cannot be matched"), E.InvalidArgument), (RuntimeError("a bug"), RuntimeError)],
    ids=["untranslatable", "unexpected"],
)
async def test_an_attempt_that_raises_releases_its_hold_and_its_breaker_probe(
    fresh_database: str, pki: Path, monkeypatch: pytest.MonkeyPatch, streaming: bool, exc: BaseException,
    expected: type[BaseException],
) -> None:
    monkeypatch.setattr(service_mod, "get_adapter", lambda kind: _BrokenAdapter(exc))
    rid = f"r-{uuid.uuid4().hex}"
    async with _router(fresh_database, pki) as (router, svc):
        breaker = router.breakers["d"]
        breaker.record_failure()  # threshold 1: open; the 1 ms cooldown makes the next call the probe
        await asyncio.sleep(0.01)
        with pytest.raises(expected) as info:
            await _call(router, rid, streaming)
        if isinstance(info.value, E.InvalidArgument):
            assert info.value.reason == "UNTRANSLATABLE_REQUEST"
            assert info.value.metadata == {"deployment": "d", "provider": "p"}
            assert "tool result" not in info.value.message  # the adapter's words stay out of the answer
        await router.drain(5)
        # The ledger saw a hold for this request, and it is released: nothing held, nothing spent.
        assert sql(fresh_database, "SELECT state FROM holds WHERE request_id = %s", (rid,)) == [("RELEASED",)]
        (budget,) = await svc.get_budget(team=TEAM)
        assert (budget.held_nanos, budget.spent_nanos) == (0, 0)
        # The probe ticket was handed back: another probe may go (a held one would block it for 10 min).
        assert breaker.try_acquire() == "probe"
    assert sql(fresh_database, "SELECT count(*) FROM spend_entries") == [(0,)]
    check_invariants(fresh_database)


async def test_retry_rounds_are_counted_by_the_reason_the_round_before_failed(
    fresh_database: str, pki: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from services.router.providers.errors import ErrorKind, ProviderError

    monkeypatch.setattr(service_mod, "get_adapter", lambda kind: _BrokenAdapter(
        ProviderError(ErrorKind.SERVER_ERROR, "HTTP 500", status_code=500)))
    async with _router(fresh_database, pki) as (router, _svc):
        cfg = parse_config(CONFIG.replace(b"max_attempts: 1", b"max_attempts: 3, backoff_initial_ms: 1")
                           .replace(b"failure_threshold: 1,", b"failure_threshold: 100,"))
        router.apply_config(cfg)
        with pytest.raises(E.IgwError):
            await router.generate(AGENT, _request(f"r-{uuid.uuid4().hex}"), 10.0)
        await router.drain(5)
        retries = router.metrics.retries
        assert retries.labels("server_error")._value.get() == 2  # three attempts: two retry rounds
        assert {s.labels["reason"] for s in retries.collect()[0].samples if s.value} == {"server_error"}
    check_invariants(fresh_database)


async def test_an_agent_that_hangs_up_while_the_lease_is_pending_gets_its_hold_released(
    fresh_database: str, pki: Path,
) -> None:
    """Reserve answered, IssueCredential still pending, the agent goes away: the hold is released
    at once rather than left to expire and be captured at its full amount."""
    rid = f"r-{uuid.uuid4().hex}"
    async with _router(fresh_database, pki) as (router, svc):
        router.backends.vault.hang = True  # type: ignore[attr-defined]
        ledger = router.backends.ledger
        answered = asyncio.Event()

        def reserve(req: Any, timeout: float) -> Any:  # the real Reserve, noting when it answered
            call = ledger.Reserve(req, timeout=timeout)
            call.add_done_callback(lambda _: answered.set())
            return call

        spy = SimpleNamespace(Reserve=reserve, Release=ledger.Release)
        router.backends = dataclasses.replace(router.backends, ledger=spy)
        call = asyncio.ensure_future(router.generate(AGENT, _request(rid), 10.0))
        await asyncio.wait_for(answered.wait(), 10)
        await asyncio.sleep(0.05)  # the router takes the answer and waits on the lease
        assert sql(fresh_database, "SELECT state FROM holds WHERE request_id = %s", (rid,)) == [("OPEN",)]
        assert not call.done()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await router.drain(5)
        assert sql(fresh_database, "SELECT state FROM holds WHERE request_id = %s", (rid,)) == [("RELEASED",)]
        (budget,) = await svc.get_budget(team=TEAM)
        assert (budget.held_nanos, budget.spent_nanos) == (0, 0)
    check_invariants(fresh_database)


@pytest.mark.parametrize(("vault_error", "code", "reason", "cause"), [
    (E.FailedPrecondition("NO_ACTIVE_KEY", "no key"), grpc.StatusCode.FAILED_PRECONDITION, "NO_CREDENTIAL",
     "NO_ACTIVE_KEY"),
    (E.Unavailable("AUDIT_UNAVAILABLE", "audit down"), grpc.StatusCode.UNAVAILABLE, "ALL_CANDIDATES_FAILED",
     "VAULT_UNAVAILABLE:AUDIT_UNAVAILABLE"),
], ids=["no-key", "vault-down"])
async def test_a_vault_refusal_is_a_configuration_problem_and_a_vault_outage_is_not(
    fresh_database: str, pki: Path, vault_error: E.IgwError, code: grpc.StatusCode, reason: str, cause: str,
) -> None:
    status = E.to_status(vault_error, "keyvault.igw")
    async with _router(fresh_database, pki) as (router, _svc):
        router.backends.vault.refuse = grpc.aio.AioRpcError(  # type: ignore[attr-defined]
            status.code, grpc.aio.Metadata(), grpc.aio.Metadata(*status.trailing_metadata), status.details)
        with pytest.raises(E.IgwError) as caught:
            await router.generate(AGENT, _request(f"v-{uuid.uuid4().hex}"), 10.0)
        await router.drain(5)
    err = caught.value
    assert (err.code, err.reason) == (code, reason)
    assert err.metadata["attempt_1_outcome"] == "NO_CREDENTIAL" and err.metadata["attempt_1_cause"] == cause
    check_invariants(fresh_database)

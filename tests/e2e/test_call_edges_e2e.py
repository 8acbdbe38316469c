"""Call edges end to end (the gateway's own processes: router, vault, ledger, fake providers).

- 200 calls, unary and streamed, with deadlines from 1 to 10 ms: within seconds nothing is held,
  nothing was captured, and every spend entry carries the usage the fake provider reported.
- Every lease the vault issued for those calls ends in the audit log (used, or returned unused
  with the reason); a call refused for budget returns its lease as BUDGET_EXCEEDED.
- A team without a budget is refused with NO_BUDGET before any provider request.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import grpc
import httpx
import pytest

from igw.keyvault.v1 import keyvault_pb2, keyvault_pb2_grpc
from igw.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from igw.router.v1 import router_pb2, router_pb2_grpc
from igw_dev import pki as pki_mod
from services.common.errors import error_info_from_rpc_error
from services.common.tls import secure_channel
from tests.e2e.conftest import Gateway, mtls_channel

PROMPT = "tell me about the edges of a call"


def _req(model: str, rid: str) -> router_pb2.GenerateRequest:
    m = router_pb2.Message(role=router_pb2.ROLE_USER)
    m.parts.add(text=PROMPT)
    return router_pb2.GenerateRequest(model=model, messages=[m], max_output_tokens=1024, request_id=rid)


def _requests_seen(gw: Gateway) -> int:
    total = 0
    for root in gw.endpoints["fakes"].values():
        total += int(httpx.get(f"{root}/_fake/stats", timeout=10).json().get("requests", 0))
    return total


def _new_team(gw: Gateway, prefix: str, limit_nanos: int | None) -> str:
    team = f"{prefix}{uuid.uuid4().hex[:6]}"
    pki_mod.issue_to_dir(gw.pki, "agent", team, "a1")
    if limit_nanos is not None:
        ledger_pb2_grpc.LedgerAdminServiceStub(gw.channel("ledger")).SetBudget(
            ledger_pb2.SetBudgetRequest(team=team, window=ledger_pb2.BUDGET_WINDOW_TOTAL, limit_nanos=limit_nanos),
            timeout=10)
    return team


def _lease_audit(gw: Gateway, team: str) -> list[keyvault_pb2.AuditEvent]:
    admin = keyvault_pb2_grpc.KeyVaultAdminServiceStub(gw.channel("keyvault"))
    events: list[keyvault_pb2.AuditEvent] = []
    token = ""
    while True:
        page = admin.ListAuditEvents(
            keyvault_pb2.ListAuditEventsRequest(team=team, page_size=1000, page_token=token), timeout=10)
        events.extend(page.events)
        token = page.next_page_token
        if not token:
            return events


def _unended_leases(events: list[keyvault_pb2.AuditEvent]) -> set[str]:
    issued = {e.lease_id_hmac for e in events if e.action == keyvault_pb2.AUDIT_ACTION_ISSUE_CREDENTIAL
              and e.outcome == keyvault_pb2.AUDIT_OUTCOME_ALLOWED}
    ended = [e.lease_id_hmac for e in events if e.action in (
        keyvault_pb2.AUDIT_ACTION_LEASE_USED, keyvault_pb2.AUDIT_ACTION_LEASE_RETURNED)]
    assert len(ended) == len(set(ended)), "a lease ended twice"
    assert set(ended) <= issued, "an end without its issue"
    return issued - set(ended)


async def _burst(gw: Gateway, team: str, n: int) -> dict[str, list[str]]:
    """n calls, alternately unary ("fast") and streamed ("smart"), deadlines 1..10 ms."""
    pki = gw.pki
    rids: dict[str, list[str]] = {"fast": [], "smart": []}
    async with secure_channel(gw.addr("router"), pki / f"agent-{team}-a1.pem", pki / f"agent-{team}-a1-key.pem",
                              pki / "ca.pem") as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        await stub.ListModels(router_pb2.ListModelsRequest(), timeout=10)  # connected before the clock starts

        async def one(i: int) -> None:
            deadline = (1 + i % 10) / 1000
            model = "fast" if i % 2 == 0 else "smart"
            rid = f"edge-{uuid.uuid4().hex}"
            rids[model].append(rid)
            try:
                if model == "fast":
                    await stub.Generate(_req(model, rid), timeout=deadline)
                else:
                    async for _ in stub.GenerateStream(_req(model, rid), timeout=deadline):
                        pass
            except grpc.aio.AioRpcError as err:
                assert err.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED), err

        # One after another, as an agent loop makes them (a burst of hundreds at once mostly dies
        # in the router's queue before reaching the ledger, which tests less).
        for i in range(n):
            await one(i)
    return rids


def _slices_held(gateway: Gateway, team: str) -> int:
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(gateway.ledger_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT coalesce(sum(amount_nanos), 0) FROM holds WHERE team = %s AND state = 'OPEN'"
                           " AND slice_calls > 0", (team,)).fetchone()
    return int(row[0]) if row else 0


def test_200_calls_with_deadlines_of_1_to_10_ms_are_billed_for_what_the_provider_did(gateway: Gateway) -> None:
    team = _new_team(gateway, "edges", 10**12)
    ledger = ledger_pb2_grpc.LedgerServiceStub(gateway.channel("ledger"))
    admin = ledger_pb2_grpc.LedgerAdminServiceStub(gateway.channel("ledger"))
    with mtls_channel(gateway.addr("router"), gateway.pki, f"agent-{team}-a1") as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        # What the fake providers report for this prompt, unary and streamed (not estimated).
        ref_fast = stub.Generate(_req("fast", f"ref-{uuid.uuid4().hex}"), timeout=15)
        ref_smart = [m for m in stub.GenerateStream(_req("smart", f"ref-{uuid.uuid4().hex}"), timeout=15)][-1].final
    assert not ref_fast.usage.estimated and not ref_smart.usage.estimated
    reported = {"fast": ref_fast.usage, "smart": ref_smart.usage}
    time.sleep(0.5)  # the reference settles
    (before,) = ledger.GetBudget(ledger_pb2.GetBudgetRequest(team=team), timeout=10).budgets

    seen = _requests_seen(gateway)
    rids = asyncio.run(_burst(gateway, team, 200))
    upstream = _requests_seen(gateway) - seen

    # No call's own hold is left: what is still held is the router's open budget slices (the
    # default; they go back when retired), each a hold with slice_calls > 0.
    deadline = time.monotonic() + 10
    while True:
        (budget,) = ledger.GetBudget(ledger_pb2.GetBudgetRequest(team=team), timeout=10).budgets
        calls_held = budget.held_nanos - _slices_held(gateway, team)
        if calls_held == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    took = 10 - (deadline - time.monotonic())
    assert calls_held == 0, f"call holds still held after {took:.1f}s"
    entries = admin.ListSpendEntries(ledger_pb2.ListSpendEntriesRequest(team=team, page_size=1000),
                                     timeout=10).entries
    mine = {rid: model for model, ids in rids.items() for rid in ids}
    burst = [e for e in entries if e.request_id in mine]
    # Nothing captured; each entry is what the provider reported for its call (a stream cut before
    # its end counts the provider's input and the text it had sent, never the upper bounds).
    assert not [e for e in entries if ledger_pb2.SPEND_FLAG_UNSETTLED_CAPTURE in e.flags]
    for e in burst:
        usage = reported[mine[e.request_id]]
        assert e.usage.input_tokens == usage.input_tokens, e
        if e.outcome == ledger_pb2.CALL_OUTCOME_SUCCESS:
            assert e.usage.output_tokens == usage.output_tokens, e
        else:
            assert e.usage.output_tokens <= usage.output_tokens, e
    assert budget.spent_nanos - before.spent_nanos == sum(e.cost_nanos for e in burst)
    # The vault's audit shows how every lease of the team ended (the router returns them in the
    # background: give it the same few seconds).
    deadline = time.monotonic() + 10
    while _unended_leases(events := _lease_audit(gateway, team)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _unended_leases(events) == set()
    issued = [e for e in events if e.action == keyvault_pb2.AUDIT_ACTION_ISSUE_CREDENTIAL and e.request_id in mine]
    assert issued, "no call got as far as the vault and the ledger: nothing was tested"
    print(f"edges: {len({e.request_id for e in issued})} of 200 calls got a lease and a hold "
          f"({len(issued)} leases), {upstream} provider requests, "
          f"{len(burst)} billed, held back to 0 in {took:.1f}s, "
          f"{sum(1 for e in events if e.action == keyvault_pb2.AUDIT_ACTION_LEASE_RETURNED)} leases returned")


def test_a_call_refused_for_budget_returns_its_lease_with_the_reason(gateway: Gateway) -> None:
    team = _new_team(gateway, "broke", 10)
    rid = f"broke-{uuid.uuid4().hex}"
    seen = _requests_seen(gateway)
    with mtls_channel(gateway.addr("router"), gateway.pki, f"agent-{team}-a1") as ch:
        with pytest.raises(grpc.RpcError) as exc:
            router_pb2_grpc.RouterServiceStub(ch).Generate(_req("fast", rid), timeout=15)
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _requests_seen(gateway) == seen
    deadline = time.monotonic() + 10
    while True:
        events = [e for e in _lease_audit(gateway, team) if e.request_id == rid]
        if len(events) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    got = [(e.action, e.outcome, e.reason) for e in events]
    assert got == [
        (keyvault_pb2.AUDIT_ACTION_ISSUE_CREDENTIAL, keyvault_pb2.AUDIT_OUTCOME_ALLOWED, ""),
        (keyvault_pb2.AUDIT_ACTION_LEASE_RETURNED, keyvault_pb2.AUDIT_OUTCOME_ALLOWED, "BUDGET_EXCEEDED"),
    ][:: -1]  # newest first
    assert events[0].lease_id_hmac == events[1].lease_id_hmac


def test_a_team_without_a_budget_is_refused_with_no_budget(gateway: Gateway) -> None:
    team = _new_team(gateway, "nobudget", None)
    seen = _requests_seen(gateway)
    with mtls_channel(gateway.addr("router"), gateway.pki, f"agent-{team}-a1") as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        for call in (stub.Generate, lambda r, timeout: list(stub.GenerateStream(r, timeout=timeout))):
            with pytest.raises(grpc.RpcError) as exc:
                call(_req("fast", f"nb-{uuid.uuid4().hex}"), timeout=15)
            assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            info = error_info_from_rpc_error(exc.value)
            assert info is not None and info.reason == "NO_BUDGET"
            assert info.metadata["team"] == team
    assert _requests_seen(gateway) == seen
    spent: Any = ledger_pb2_grpc.LedgerAdminServiceStub(gateway.channel("ledger")).ListSpendEntries(
        ledger_pb2.ListSpendEntriesRequest(team=team), timeout=10)
    assert list(spent.entries) == []

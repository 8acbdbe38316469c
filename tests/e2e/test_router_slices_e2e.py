"""Budget slices end to end: a router process with ``budget_slices`` on for one team, the real
ledger and vault processes, the fake providers. The team's calls take no Reserve each, every
call still gets exactly one spend entry at its exact cost, and a router that shuts down returns
what is left of its slices."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from igw.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from igw.router.v1 import router_pb2, router_pb2_grpc
from igw_dev import pki as pki_mod
from igw_dev.procs import ServiceProcess, start_service, tls_env
from tests.e2e.conftest import Gateway, mtls_channel

TEAM = "slicers"
PROMPT = "slices of the budget, please"


def _config(fakes: dict[str, str]) -> str:
    return f"""
providers:
  fake-openai: {{type: openai, base_url: "{fakes['fake-openai']}/v1", local: true}}
  fake-anthropic: {{type: anthropic, base_url: "{fakes['fake-anthropic']}", local: true}}
  fake-gemini: {{type: gemini, base_url: "{fakes['fake-gemini']}", local: true}}
deployments:
  oa: {{provider: fake-openai, model: fake-small, price: fake-small}}
  an: {{provider: fake-anthropic, model: fake-large, price: fake-large}}
  ge: {{provider: fake-gemini, model: fake-small, price: fake-small}}
models:
  openai: {{candidates: [oa]}}
  anthropic: {{candidates: [an]}}
  gemini: {{candidates: [ge]}}
timeouts: {{connect_ms: 500, first_byte_ms: 1500, idle_ms: 1000, total_ms: 5000}}
budget_slices: {{enabled: true, calls: 16, draw_window_ms: 60000, teams: [{TEAM}], busy_calls: 1, busy_in_flight: 1}}
"""


def _req(model: str, rid: str) -> router_pb2.GenerateRequest:
    m = router_pb2.Message(role=router_pb2.ROLE_USER)
    m.parts.add(text=PROMPT)
    return router_pb2.GenerateRequest(model=model, messages=[m], max_output_tokens=64, request_id=rid)


def _metric(url: str, name: str, labels: str = "") -> float:
    total = 0.0
    for line in httpx.get(url, timeout=10).text.splitlines():
        if line.startswith(name) and labels in line and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def sliced(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceProcess, Path]]:
    tmp = tmp_path_factory.mktemp("slices")
    pki_mod.issue_to_dir(gateway.pki, "agent", TEAM, "a1")
    admin = ledger_pb2_grpc.LedgerAdminServiceStub(gateway.channel("ledger"))
    admin.SetBudget(ledger_pb2.SetBudgetRequest(team=TEAM, window=ledger_pb2.BUDGET_WINDOW_TOTAL,
                                                limit_nanos=10**13), timeout=10)
    fakes = {k: str(v) for k, v in gateway.endpoints["fakes"].items()}  # type: ignore[union-attr]
    config = tmp / "router.yaml"
    config.write_text(_config(fakes))
    env = {**tls_env(gateway.pki, "router"), "IGW_ROUTER_CONFIG": str(config),
           "IGW_LEDGER_ADDR": gateway.addr("ledger"), "IGW_KEYVAULT_ADDR": gateway.addr("keyvault"),
           "IGW_LOG_LEVEL": "DEBUG"}
    router = start_service("router", env, tmp)
    try:
        yield router, tmp
    finally:
        router.terminate()


def _budget(gateway: Gateway) -> Any:
    stub = ledger_pb2_grpc.LedgerServiceStub(gateway.channel("ledger"))
    (b,) = stub.GetBudget(ledger_pb2.GetBudgetRequest(team=TEAM), timeout=10).budgets
    return b


def test_sliced_calls_settle_once_each_without_a_reserve_and_shutdown_returns_the_slices(
    gateway: Gateway, sliced: tuple[ServiceProcess, Path],
) -> None:
    router, _tmp = sliced
    ledger_metrics = str(gateway.endpoints["metrics"]["ledger"])  # type: ignore[index]
    reserves_before = _metric(ledger_metrics, "igw_ledger_reserves_total", 'outcome="ok"')
    slices_before = _metric(ledger_metrics, "igw_ledger_reserves_total", 'outcome="slice_ok"')
    stub = router_pb2_grpc.RouterServiceStub(mtls_channel(router.address, gateway.pki, f"agent-{TEAM}-a1"))
    costs: dict[str, int] = {}
    for i in range(36):
        model = ("openai", "anthropic", "gemini")[i % 3]
        rid = f"sl-{i}-{uuid.uuid4().hex[:8]}"
        if i % 4 == 3:
            final = [m for m in stub.GenerateStream(_req(model, rid), timeout=15) if m.HasField("final")]
            costs[rid] = final[0].final.cost_nanos
        else:
            costs[rid] = stub.Generate(_req(model, rid), timeout=15).cost_nanos
    assert all(c > 0 for c in costs.values())
    # No Reserve per call: one slice per price key (16 calls each) instead.
    assert _metric(ledger_metrics, "igw_ledger_reserves_total", 'outcome="ok"') == reserves_before
    acquired = _metric(ledger_metrics, "igw_ledger_reserves_total", 'outcome="slice_ok"') - slices_before
    assert 2 <= acquired <= 6
    ops = ledger_pb2_grpc.LedgerAdminServiceStub(gateway.channel("ledger"))
    deadline = time.monotonic() + 15
    while True:
        entries = [e for e in ops.ListSpendEntries(ledger_pb2.ListSpendEntriesRequest(team=TEAM, page_size=1000),
                                                   timeout=10).entries]
        if len(entries) >= len(costs) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert sorted(e.request_id for e in entries) == sorted(costs)
    assert {e.request_id: e.cost_nanos for e in entries} == costs
    b = _budget(gateway)
    assert b.spent_nanos == sum(costs.values()) and b.held_nanos > 0  # the slices are still leased
    # The provider keys the leases carried and the prompt never reach the router's log or metrics.
    secrets = json.loads((gateway.state_dir / "demo-secrets.json").read_text()).values()
    exposed = router.log_text() + httpx.get(f"http://127.0.0.1:{router.metrics_port}/metrics", timeout=10).text
    assert secrets and "igw_router_slice_draws_total" in exposed and router.log_text()
    assert not [k for k in secrets if k in exposed]
    assert PROMPT not in exposed
    # A graceful shutdown hands back what is left of every slice.
    assert router.terminate() == 0
    b = _budget(gateway)
    assert (b.spent_nanos, b.held_nanos) == (sum(costs.values()), 0)

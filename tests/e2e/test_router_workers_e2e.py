"""Several router worker processes on one port (IGW_ROUTER_WORKERS=2): the real ledger, vault and
fake providers; agents on separate connections are served by both workers; every call gets
exactly one spend entry; a SIGTERM to the supervisor drains both and returns every slice."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import psutil

from igw.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from igw.router.v1 import router_pb2_grpc
from igw_dev import pki as pki_mod
from igw_dev.procs import start_service, tls_env
from tests.e2e.conftest import Gateway, mtls_channel
from tests.e2e.test_router_slices_e2e import _config, _metric, _req

TEAM = "workers"


def test_two_router_workers_share_one_port_and_settle_every_call_once(gateway: Gateway, tmp_path: Path) -> None:
    pki_mod.issue_to_dir(gateway.pki, "agent", TEAM, "a1")
    admin = ledger_pb2_grpc.LedgerAdminServiceStub(gateway.channel("ledger"))
    admin.SetBudget(ledger_pb2.SetBudgetRequest(team=TEAM, window=ledger_pb2.BUDGET_WINDOW_TOTAL,
                                                limit_nanos=10**13), timeout=10)
    fakes = {k: str(v) for k, v in gateway.endpoints["fakes"].items()}  # type: ignore[union-attr]
    config = tmp_path / "router.yaml"
    # The defaults: no budget_slices section (slices on for every team).
    config.write_text(_config(fakes).split("budget_slices:")[0])
    env = {**tls_env(gateway.pki, "router"), "IGW_ROUTER_CONFIG": str(config),
           "IGW_LEDGER_ADDR": gateway.addr("ledger"), "IGW_KEYVAULT_ADDR": gateway.addr("keyvault"),
           "IGW_ROUTER_WORKERS": "2"}
    router = start_service("router", env, tmp_path)
    try:
        info = json.loads((tmp_path / "router.ready.json").read_text())
        workers = info["workers"]
        assert len(workers) == 2 and len({w["pid"] for w in workers}) == 2
        assert {p.pid for p in psutil.Process(router.proc.pid).children()} == {w["pid"] for w in workers}
        costs: dict[str, int] = {}
        for c in range(24):  # a new connection each: the kernel spreads them over the workers
            channel = mtls_channel(router.address, gateway.pki, f"agent-{TEAM}-a1")
            stub = router_pb2_grpc.RouterServiceStub(channel)
            for i in range(2):
                rid = f"w-{c}-{i}-{uuid.uuid4().hex[:8]}"
                costs[rid] = stub.Generate(_req("openai", rid), timeout=15).cost_nanos
            channel.close()
        served = [_metric(f"http://127.0.0.1:{w['metrics_port']}/metrics", "igw_router_calls_total")
                  for w in workers]
        assert sum(served) == len(costs) and all(n > 0 for n in served)
        assert router.terminate() == 0
        assert all(not psutil.pid_exists(w["pid"]) or psutil.Process(w["pid"]).status() == psutil.STATUS_ZOMBIE
                   for w in workers)
    finally:
        router.terminate()
    ops = ledger_pb2_grpc.LedgerAdminServiceStub(gateway.channel("ledger"))
    deadline = time.monotonic() + 15
    while True:
        entries = ops.ListSpendEntries(ledger_pb2.ListSpendEntriesRequest(team=TEAM, page_size=1000),
                                       timeout=10).entries
        if len(entries) >= len(costs) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert {e.request_id: e.cost_nanos for e in entries} == costs
    stub = ledger_pb2_grpc.LedgerServiceStub(gateway.channel("ledger"))
    (b,) = stub.GetBudget(ledger_pb2.GetBudgetRequest(team=TEAM), timeout=10).budgets
    assert (b.spent_nanos, b.held_nanos) == (sum(costs.values()), 0)  # both workers returned their slices

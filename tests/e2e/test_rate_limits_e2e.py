"""Rate limits end to end: two router processes, each on its own ledger process (two ledger
replicas on one database), the real vault and fake providers. 2x a team's RPM limit within one
minute: exactly the limit succeeds, every other call is RESOURCE_EXHAUSTED / RATE_LIMITED with a
google.rpc.RetryInfo, with per-call holds and with budget slices. Then a run cap under several
agents of a team, checked in SQL."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
import pytest

from igw.client import ClientConfig, IgwClient, RateLimited, user
from igw.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from igw.router.v1 import router_pb2, router_pb2_grpc
from igw_dev import pki as pki_mod
from igw_dev.procs import ServiceProcess, start_service, tls_env
from services.common.errors import error_info_from_rpc_error, retry_delay_from_rpc_error
from tests.e2e.conftest import Gateway, mtls_channel

PER_CALL = "rl-calls"
SLICED = "rl-slices"
RUNS = "rl-runs"
RPM = 12


def _config(fakes: dict[str, str]) -> str:
    return f"""
providers:
  fake-openai: {{type: openai, base_url: "{fakes['fake-openai']}/v1", local: true}}
deployments:
  oa: {{provider: fake-openai, model: fake-small, price: fake-small}}
models:
  openai: {{candidates: [oa]}}
timeouts: {{connect_ms: 500, first_byte_ms: 3000, idle_ms: 3000, total_ms: 10000}}
budget_slices: {{enabled: true, calls: 4, draw_window_ms: 30000, teams: [{SLICED}], busy_calls: 1, busy_in_flight: 1}}
"""


@dataclass
class Pair:
    routers: list[ServiceProcess]
    ledgers: list[ServiceProcess]
    dsn: str
    pki: Path


@pytest.fixture(scope="module")
def pair(gateway: Gateway, pg: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    tmp = tmp_path_factory.mktemp("ratelimits")
    name = f"ledger_rl_{uuid.uuid4().hex[:8]}"
    pg.create_database(name)  # type: ignore[attr-defined]
    for team in (PER_CALL, SLICED, RUNS):
        for agent in ("a1", "a2", "a3"):
            pki_mod.issue_to_dir(gateway.pki, "agent", team, agent)
    fakes = {k: str(v) for k, v in gateway.endpoints["fakes"].items()}  # type: ignore[union-attr]
    config = tmp / "router.yaml"
    config.write_text(_config(fakes))
    procs: list[ServiceProcess] = []
    try:
        ledgers = []
        for i in range(2):
            env = {**tls_env(gateway.pki, "ledger"), "IGW_DATABASE_URL": pg.url(name)}  # type: ignore[attr-defined]
            ledgers.append(start_service("ledger", env, tmp / f"ledger{i}", timeout=60))
            procs.append(ledgers[-1])
        routers = []
        for i in range(2):
            env = {**tls_env(gateway.pki, "router"), "IGW_ROUTER_CONFIG": str(config),
                   "IGW_LEDGER_ADDR": ledgers[i].address, "IGW_KEYVAULT_ADDR": gateway.addr("keyvault")}
            routers.append(start_service("router", env, tmp / f"router{i}", timeout=60))
            procs.append(routers[-1])
        yield Pair(routers, ledgers, pg.libpq_dsn(name), gateway.pki)  # type: ignore[attr-defined]
    finally:
        for p in procs:
            p.terminate()


def _admin(pair: Pair, i: int = 0) -> ledger_pb2_grpc.LedgerAdminServiceStub:
    return ledger_pb2_grpc.LedgerAdminServiceStub(mtls_channel(pair.ledgers[i].address, pair.pki, "operator-admin"))


def _req(rid: str, **kw: object) -> router_pb2.GenerateRequest:
    m = router_pb2.Message(role=router_pb2.ROLE_USER)
    m.parts.add(text="count to three")
    return router_pb2.GenerateRequest(model="openai", messages=[m], max_output_tokens=32, request_id=rid,
                                      **kw)  # type: ignore[arg-type]


def _burst(pair: Pair, team: str, n: int) -> tuple[int, list[grpc.RpcError]]:
    """``n`` calls at once, alternating routers and agents; (successes, refusals)."""
    stubs = [router_pb2_grpc.RouterServiceStub(mtls_channel(r.address, pair.pki, f"agent-{team}-a{1 + i % 3}"))
             for i, r in enumerate(pair.routers * 3)]

    def one(i: int) -> grpc.RpcError | None:
        try:
            stubs[i % len(stubs)].Generate(_req(f"{team}-{i}-{uuid.uuid4().hex[:6]}"), timeout=20)
            return None
        except grpc.RpcError as err:
            return err

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(n)))
    refused = [r for r in results if r is not None]
    return n - len(refused), refused


def _entries(dsn: str, team: str, want: int) -> int:
    """Spend entries of the team, waiting (settles are asynchronous) until ``want`` or 20 s."""
    deadline = time.monotonic() + 20
    while True:
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT count(*) FROM spend_entries WHERE team = %s", (team,)).fetchone()
        n = int(row[0]) if row else 0
        if n >= want or time.monotonic() > deadline:
            return n
        time.sleep(0.2)


def _check_refusals(refused: list[grpc.RpcError]) -> None:
    for err in refused:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (err.code(), err.details())
        info = error_info_from_rpc_error(err)
        assert info is not None and info.reason == "RATE_LIMITED", info
        delay = retry_delay_from_rpc_error(err)
        assert delay is not None and 0 < delay <= 60


def _budget(pair: Pair, team: str) -> None:
    _admin(pair).SetBudget(ledger_pb2.SetBudgetRequest(team=team, window=ledger_pb2.BUDGET_WINDOW_TOTAL,
                                                       limit_nanos=10**13), timeout=10)


def test_twice_the_rpm_limit_over_two_routers_and_two_ledgers_admits_exactly_the_limit(pair: Pair) -> None:
    _budget(pair, PER_CALL)
    _admin(pair, 1).SetRateLimit(ledger_pb2.SetRateLimitRequest(team=PER_CALL, requests_per_minute=RPM), timeout=10)
    ok, refused = _burst(pair, PER_CALL, 2 * RPM)
    assert ok == RPM and len(refused) == RPM
    _check_refusals(refused)
    # The typed client raises RateLimited, with when to retry.
    cfg = ClientConfig(addresses=[pair.routers[0].address], cert=str(pair.pki / f"agent-{PER_CALL}-a1.pem"),
                       key=str(pair.pki / f"agent-{PER_CALL}-a1-key.pem"), ca=str(pair.pki / "ca.pem"))
    with IgwClient(cfg) as client, pytest.raises(RateLimited) as err:
        client.generate("openai", [user("one more")], max_output_tokens=32)
    assert err.value.retry_after_seconds is not None and 0 < err.value.retry_after_seconds <= 60
    limits = _admin(pair).GetRateLimits(ledger_pb2.GetRateLimitsRequest(team=PER_CALL), timeout=10).limits
    assert [(r.requests_per_minute, r.requests_used) for r in limits] == [(RPM, RPM)]
    assert _entries(pair.dsn, PER_CALL, RPM) == RPM


def test_twice_the_rpm_limit_with_budget_slices_admits_exactly_the_limit(pair: Pair) -> None:
    admin = _admin(pair)
    admin.SetBudget(ledger_pb2.SetBudgetRequest(team=SLICED, window=ledger_pb2.BUDGET_WINDOW_TOTAL,
                                                limit_nanos=10**13), timeout=10)
    admin.SetRateLimit(ledger_pb2.SetRateLimitRequest(team=SLICED, requests_per_minute=RPM), timeout=10)
    ok, refused = _burst(pair, SLICED, 2 * RPM)
    assert ok == RPM and len(refused) == RPM
    _check_refusals(refused)
    with psycopg.connect(pair.dsn) as conn:
        slices = conn.execute("SELECT count(*) FROM holds WHERE team = %s AND slice_calls > 0", (SLICED,)).fetchone()
    assert slices is not None and slices[0] >= 1  # the calls really were drawn from slices
    assert _entries(pair.dsn, SLICED, RPM) == RPM


def test_a_run_cap_holds_under_concurrent_agents_of_the_team(pair: Pair) -> None:
    _budget(pair, RUNS)
    probe = router_pb2_grpc.RouterServiceStub(mtls_channel(pair.routers[0].address, pair.pki, f"agent-{RUNS}-a1"))
    probe.Generate(_req(f"probe-{uuid.uuid4().hex[:6]}"), timeout=20)
    _entries(pair.dsn, RUNS, 1)
    with psycopg.connect(pair.dsn) as conn:
        row = conn.execute("SELECT max(held_nanos) FROM spend_entries WHERE team = %s", (RUNS,)).fetchone()
    assert row is not None
    unit = int(row[0])
    cap = unit * 5 + unit // 3
    stubs = [router_pb2_grpc.RouterServiceStub(mtls_channel(r.address, pair.pki, f"agent-{RUNS}-a{1 + i % 3}"))
             for i, r in enumerate(pair.routers * 3)]

    def one(i: int) -> grpc.RpcError | None:
        try:
            stubs[i % len(stubs)].Generate(_req(f"run-{i}-{uuid.uuid4().hex[:6]}", run_id="job-42",
                                                run_cap_nanos=cap), timeout=20)
            return None
        except grpc.RpcError as err:
            return err

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(24)))
    refused = [r for r in results if r is not None]
    _entries(pair.dsn, RUNS, 1 + 24 - len(refused))
    assert refused and all(error_info_from_rpc_error(r).reason == "BUDGET_EXCEEDED" for r in refused)  # type: ignore[union-attr]
    with psycopg.connect(pair.dsn) as conn:
        spent, n, limit = conn.execute(
            "SELECT coalesce(sum(e.cost_nanos), 0), count(*), (SELECT limit_nanos FROM budgets"
            " WHERE team = %s AND run = 'job-42') FROM spend_entries e WHERE e.team = %s AND e.run_id = 'job-42'",
            (RUNS, RUNS),
        ).fetchone()  # type: ignore[misc]
    assert limit == cap and 1 <= n <= 24 - len(refused) and spent <= cap
    totals = _admin(pair).ListSpend(ledger_pb2.ListSpendRequest(team=RUNS, group_by=[ledger_pb2.SPEND_GROUP_BY_RUN]),
                                    timeout=10).totals
    assert {(t.run, t.request_count) for t in totals if t.run} == {("job-42", n)}


def test_the_cli_sets_and_reads_limits_and_lists_and_deletes_budgets_and_spend_by_run(gateway: Gateway) -> None:
    from tests.e2e.test_operator_surface import igw, igw_json

    team = f"cli-{uuid.uuid4().hex[:6]}"
    out = igw(gateway, "limits", "set", "--team", team, "--rpm", "30", "--tpm", "90000")
    assert out.stdout.strip() == f"rate limits set: {team} rpm 30 tpm 90000"
    igw(gateway, "limits", "set", "--team", team, "--agent", "bot", "--rpm", "5")
    igw(gateway, "limits", "set", "--team", team, "--tpm", "80000")  # --rpm not given: kept
    got = igw_json(gateway, "limits", "get", "--team", team)
    assert [(r.get("agent", ""), int(r["requests_per_minute"]), int(r.get("tokens_per_minute", 0)))
            for r in got["limits"]] == [("", 30, 80000), ("bot", 5, 0)]  # type: ignore[index]
    none = igw(gateway, "limits", "set", "--team", team, check=False)
    assert none.returncode == 2 and "--rpm and/or --tpm" in none.stderr
    table = igw(gateway, "limits", "get", "--team", team).stdout
    assert "(team)" in table and "bot" in table
    igw(gateway, "budgets", "set", "--team", team, "--window", "daily", "--limit", "3.00")
    igw(gateway, "budgets", "set", "--team", team, "--run", "nightly", "--limit", "1.50")
    listed = igw(gateway, "budgets", "list", "--team", team, "--runs").stdout
    assert "nightly" in listed and "$1.50" in listed
    assert "nightly" not in igw(gateway, "budgets", "list", "--team", team).stdout
    igw(gateway, "budgets", "delete", "--team", team, "--run", "nightly")
    assert "nightly" not in igw(gateway, "budgets", "list", "--team", team, "--runs").stdout
    bad = igw(gateway, "budgets", "delete", "--team", team, "--run", "nightly", check=False)
    assert bad.returncode != 0 and "BUDGET_NOT_FOUND" in bad.stderr
    # A call of a run through the gateway's router, then `igw spend --by run`.
    pki_mod.issue_to_dir(gateway.pki, "agent", team, "a1")
    stub = router_pb2_grpc.RouterServiceStub(mtls_channel(gateway.addr("router"), gateway.pki, f"agent-{team}-a1"))
    req = _req(f"cli-run-{uuid.uuid4().hex[:6]}", run_id="batch-7")
    req.model = "fast"
    stub.Generate(req, timeout=20)
    deadline = time.monotonic() + 20
    while True:
        spend = igw(gateway, "spend", "--by", "run", "--team", team).stdout
        if "batch-7" in spend or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert "batch-7" in spend and team in spend
    igw(gateway, "limits", "set", "--team", team, "--rpm", "0", "--tpm", "0")
    assert igw(gateway, "limits", "set", "--team", team, "--agent", "bot", "--rpm", "0").stdout.startswith(
        "rate limits cleared")
    assert "no rate limits" in igw(gateway, "limits", "get", "--team", team).stdout

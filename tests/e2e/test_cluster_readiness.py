"""Readiness that tells the truth, liveness kept apart (the names Kubernetes gRPC probes use).

A ledger or vault whose Postgres goes away turns ``readiness`` (and ``""`` and its service
names) NOT_SERVING within seconds while ``liveness`` stays SERVING, and SERVING again when the
database is back. A router with no ready ledger or vault replica does the same.
"""

from __future__ import annotations

import base64
import secrets
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from igw_dev.pg import EmbeddedPostgres
from igw_dev.procs import ServiceProcess, start_service, tls_env
from tests.e2e.conftest import mtls_channel

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

CONFIG = """version: 1
providers:
  p: {type: openai, base_url: "http://127.0.0.1:9/v1", local: true}
deployments:
  d: {provider: p, model: m, price: fake-small}
models:
  fast: {candidates: [d]}
"""


def _status(proc: ServiceProcess, name: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{proc.probe_port}") as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=name), timeout=3).status


def _wait(proc: ServiceProcess, name: str, want: int, within: float) -> float:
    t0 = time.monotonic()
    while True:
        try:
            if _status(proc, name) == want:
                return time.monotonic() - t0
        except grpc.RpcError:
            pass
        assert time.monotonic() - t0 < within, f"{proc.name}: {name!r} not {want} within {within}s"
        time.sleep(0.1)


def _ready_metric(proc: ServiceProcess) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return next(line for line in text.splitlines() if line.startswith("igw_ready "))


def test_readiness_follows_the_database_and_the_router_follows_its_replicas(tmp_path: Path, pki: Path) -> None:
    # Outside pytest's tmp tree: a concurrent pytest run resets /tmp/pytest-of-<user> to 0700, which
    # would stop Postgres (another OS user) from finding its data directory when it restarts.
    pg_root = Path(tempfile.mkdtemp(prefix="igw-readiness-pg-"))
    pg = EmbeddedPostgres(pg_root / "pg", fast=True)
    pg.start()
    procs: list[ServiceProcess] = []
    try:
        pg.create_database("ledger")
        pg.create_database("vault")
        state = tmp_path / "svc"
        ledger = start_service("ledger", {**tls_env(pki, "ledger"), "IGW_DATABASE_URL": pg.url("ledger"),
                                          "IGW_LEDGER_DB_TIMEOUT_SECONDS": "1"}, state)
        procs.append(ledger)
        vault = start_service("keyvault", {
            **tls_env(pki, "keyvault"), "IGW_DATABASE_URL": pg.url("vault"), "IGW_VAULT_MASTER_KEY_FILE": "",
            "IGW_VAULT_MASTER_KEY": base64.b64encode(secrets.token_bytes(32)).decode()}, state)
        procs.append(vault)
        (tmp_path / "router.yaml").write_text(CONFIG)
        router = start_service("router", {**tls_env(pki, "router"), "IGW_ROUTER_CONFIG": str(tmp_path / "router.yaml"),
                                          "IGW_LEDGER_ADDR": ledger.address, "IGW_KEYVAULT_ADDR": vault.address}, state)
        procs.append(router)
        names = {
            "ledger": ("readiness", "", "igw.ledger.v1.LedgerService", "igw.ledger.v1.LedgerAdminService"),
            "keyvault": ("readiness", "", "igw.keyvault.v1.KeyVaultService"),
            "router": ("readiness", "", "igw.router.v1.RouterService", "igw.router.v1.RouterAdminService"),
        }
        for proc in procs:
            for n in (*names[proc.name], "liveness"):
                _wait(proc, n, SERVING, 20)
            assert _ready_metric(proc) == "igw_ready 1.0"
        # The mTLS port answers the same names.
        with mtls_channel(ledger.address, pki, "operator-admin") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for n in ("liveness", "readiness"):
                assert stub.Check(health_pb2.HealthCheckRequest(service=n), timeout=5).status == SERVING

        pg.stop()
        took = {p.name: _wait(p, "readiness", NOT_SERVING, 6) for p in (ledger, vault)}
        assert max(took.values()) < 5, took
        for proc in (ledger, vault):
            for n in names[proc.name]:
                assert _status(proc, n) == NOT_SERVING
            assert _status(proc, "liveness") == SERVING  # up, just not ready: no restart wanted
            assert _ready_metric(proc) == "igw_ready 0.0"
        # No ready ledger or vault replica: the router is not ready either (within its health checks).
        _wait(router, "readiness", NOT_SERVING, 6)
        assert _status(router, "igw.router.v1.RouterService") == NOT_SERVING
        assert _status(router, "liveness") == SERVING

        pg.start()
        for proc in (ledger, vault, router):
            for n in names[proc.name]:
                _wait(proc, n, SERVING, 15)
        for proc in procs:
            assert proc.proc.poll() is None  # nothing restarted
        assert "database unreachable" in ledger.log_text()
        assert '"msg": "readiness changed"' in ledger.log_text()
    finally:
        for p in reversed(procs):
            p.terminate()
        pg.stop()
        shutil.rmtree(pg_root, ignore_errors=True)

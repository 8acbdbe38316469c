"""The ledger survives a Postgres restart without restarting itself: calls during the outage
fail fast with UNAVAILABLE, calls after it succeed, and nothing is counted twice."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import grpc
import pytest

from igw.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from igw_dev.pg import EmbeddedPostgres
from igw_dev.procs import start_service, tls_env
from services.common.errors import error_info_from_rpc_error
from tests.e2e.conftest import mtls_channel


def _reserve(stub: ledger_pb2_grpc.LedgerServiceStub, rid: str) -> ledger_pb2.ReserveResponse:
    return stub.Reserve(ledger_pb2.ReserveRequest(
        request_id=rid, attempt=1, team="restart", agent="a", model="fake-small",
        prompt_tokens_upper_bound=100, max_output_tokens=100), timeout=10)


def test_a_postgres_restart_fails_calls_fast_then_recovers_without_double_counting(
    tmp_path: Path, pki: Path
) -> None:
    pg = EmbeddedPostgres(tmp_path / "pg", fast=True)
    pg.start()
    ledger = None
    try:
        pg.create_database("ledger")
        env = {**tls_env(pki, "ledger"), "IGW_DATABASE_URL": pg.url("ledger"), "IGW_LEDGER_DB_TIMEOUT_SECONDS": "1"}
        ledger = start_service("ledger", env, tmp_path / "svc")
        with mtls_channel(ledger.address, pki, "router") as ch, \
                mtls_channel(ledger.address, pki, "operator-admin") as op:
            stub = ledger_pb2_grpc.LedgerServiceStub(ch)
            admin = ledger_pb2_grpc.LedgerAdminServiceStub(op)
            admin.SetBudget(ledger_pb2.SetBudgetRequest(
                team="restart", window=ledger_pb2.BUDGET_WINDOW_TOTAL, limit_nanos=10**12), timeout=10)
            before_id = "before-" + uuid.uuid4().hex
            before = _reserve(stub, before_id)

            pg.stop()
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as exc:
                _reserve(stub, "during-" + uuid.uuid4().hex)
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_info_from_rpc_error(exc.value).reason == "DATABASE_UNAVAILABLE"
            assert time.monotonic() - t0 < 5

            pg.start()
            deadline = time.monotonic() + 20
            while True:
                try:
                    after = _reserve(stub, "after-" + uuid.uuid4().hex)
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline, "ledger did not recover after Postgres came back"
                    time.sleep(0.2)
            assert after.reservation_id
            # The hold placed before the outage settles exactly once, however often the router retries.
            settle = ledger_pb2.SettleRequest(
                request_id=before_id, reservation_id=before.reservation_id,
                usage=ledger_pb2.TokenUsage(input_tokens=10, output_tokens=10), provider="p", provider_model="m")
            first = stub.Settle(settle, timeout=10)
            again = stub.Settle(settle, timeout=10)
            assert again.replayed and again.entry.cost_nanos == first.entry.cost_nanos
            entries = admin.ListSpendEntries(ledger_pb2.ListSpendEntriesRequest(team="restart"), timeout=10).entries
            assert [e.request_id for e in entries] == [settle.request_id]
            assert ledger.proc.poll() is None  # never restarted
    finally:
        if ledger is not None:
            ledger.terminate()
        pg.stop()

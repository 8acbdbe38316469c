"""Two ledger processes on one database, over mTLS with the router certificate: 200 Reserves
released together against a budget that fits exactly N, and exactly N succeed."""

from __future__ import annotations

import asyncio
import concurrent.futures
from pathlib import Path

import grpc

from igw.ledger.v1 import ledger_pb2 as pb
from igw.ledger.v1 import ledger_pb2_grpc
from igw_dev.procs import start_service, tls_env
from services.common import errors as E
from services.common.tls import secure_channel

HOLD = 500_000  # fake-small, 1000 in + 1000 out


async def test_two_ledger_processes_place_exactly_n_holds(fresh_database: str, pki: Path, tmp_path: Path) -> None:
    n_fit = 53
    env = {**tls_env(pki, "ledger"), "IGW_DATABASE_URL": fresh_database, "IGW_LOG_FORMAT": "json",
           "IGW_LEDGER_POOL_SIZE": "10"}
    # Both start (and migrate) at the same time: the advisory lock makes that safe.
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        futures = [ex.submit(start_service, "ledger", env, tmp_path / f"l{i}", timeout=60) for i in range(2)]
        procs = [f.result() for f in futures]
    channels = []
    try:
        channels = [
            secure_channel(p.address, pki / "router.pem", pki / "router-key.pem", pki / "ca.pem") for p in procs
        ]
        admin = secure_channel(procs[0].address, pki / "operator-admin.pem", pki / "operator-admin-key.pem",
                               pki / "ca.pem")
        await ledger_pb2_grpc.LedgerAdminServiceStub(admin).SetBudget(
            pb.SetBudgetRequest(team="e2e", window=pb.BUDGET_WINDOW_DAILY, limit_nanos=n_fit * HOLD + HOLD - 1)
        )
        await admin.close()
        stubs = [ledger_pb2_grpc.LedgerServiceStub(c) for c in channels]
        gate = asyncio.Event()

        async def one(i: int) -> bool:
            await gate.wait()
            try:
                await stubs[i % 2].Reserve(
                    pb.ReserveRequest(request_id=f"e2e-{i}", attempt=0, team="e2e", agent="a", model="fake-small",
                                      prompt_tokens_upper_bound=1000, max_output_tokens=1000),
                    timeout=30,
                )
                return True
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
                info = E.error_info_from_rpc_error(err)
                assert info is not None and info.reason == "BUDGET_EXCEEDED"
                return False

        tasks = [asyncio.create_task(one(i)) for i in range(200)]
        await asyncio.sleep(0.1)
        gate.set()
        results = await asyncio.gather(*tasks)
        assert sum(results) == n_fit
        status = await stubs[1].GetBudget(pb.GetBudgetRequest(team="e2e"))
        assert status.budgets[0].held_nanos == n_fit * HOLD
    finally:
        for c in channels:
            await c.close()
        for p in procs:
            assert p.terminate() == 0, p.log_text()[-3000:]

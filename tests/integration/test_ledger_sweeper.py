"""The sweeper runs inside the ledger service: a hold nobody settles is captured on its own."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from google.protobuf import duration_pb2

from igw.ledger.v1 import ledger_pb2 as pb
from igw.ledger.v1 import ledger_pb2_grpc
from services.common.tls import secure_channel
from services.ledger.config import Settings
from services.ledger.server import build
from tests.integration.ledger_support import check_invariants, sql


async def test_the_ledger_service_captures_expired_holds_in_the_background(fresh_database: str, pki: Path) -> None:
    settings = Settings.from_env({
        "IGW_TLS_CERT": str(pki / "ledger.pem"),
        "IGW_TLS_KEY": str(pki / "ledger-key.pem"),
        "IGW_TLS_CA": str(pki / "ca.pem"),
        "IGW_DATABASE_URL": fresh_database,
        "IGW_LEDGER_SWEEP_INTERVAL_SECONDS": "0.05",
        "IGW_GRACE_SECONDS": "1",
        "IGW_LEDGER_ALLOW_UNBUDGETED": "true",  # team "t" has no budget
    })
    runtime = await build(settings)
    await runtime.start()
    try:
        channel = secure_channel(f"127.0.0.1:{runtime.port}", pki / "router.pem", pki / "router-key.pem",
                                 pki / "ca.pem")
        async with channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            hold = await stub.Reserve(pb.ReserveRequest(
                request_id="crashed-router", attempt=0, team="t", agent="a", model="fake-small",
                prompt_tokens_upper_bound=1000, max_output_tokens=1000,
                hold_ttl=duration_pb2.Duration(nanos=200_000_000)))
            kept = await stub.Reserve(pb.ReserveRequest(
                request_id="still-running", attempt=0, team="t", agent="a", model="fake-small",
                prompt_tokens_upper_bound=1000, max_output_tokens=1000))
            deadline = time.monotonic() + 15
            rows: list[tuple[object, ...]] = []
            while time.monotonic() < deadline:
                rows = sql(fresh_database, "SELECT request_id, reservation_id::text, cost_nanos, flags,"
                                           " input_tokens, output_tokens FROM spend_entries")
                if rows:
                    break
                await asyncio.sleep(0.05)
            # No call to the ledger asked for it: the service's own sweeper captured the hold, at
            # its amount and with no token counts (nobody knows what was used).
            assert rows == [("crashed-router", hold.reservation_id, hold.held_nanos, 2, 0, 0)]
            states = sql(fresh_database, "SELECT id::text, state FROM holds ORDER BY request_id")
            assert states == [(hold.reservation_id, "CAPTURED"), (kept.reservation_id, "OPEN")]
    finally:
        await runtime.stop()
    check_invariants(fresh_database)

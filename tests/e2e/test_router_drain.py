"""Graceful shutdown of the router: a call in flight at SIGTERM is answered and settled, and
the process exits within its grace period (one deadline for draining and closing)."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import httpx

from igw.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from igw.router.v1 import router_pb2, router_pb2_grpc
from igw_dev.procs import start_service, tls_env
from tests.e2e.conftest import Gateway, mtls_channel

GRACE_S = 6.0


def test_a_call_in_flight_at_sigterm_is_answered_settled_and_the_router_exits_in_time(
    gateway: Gateway, tmp_path: Path,
) -> None:
    fake = str(gateway.endpoints["fakes"]["fake-openai"])  # type: ignore[index]
    cfg = tmp_path / "router.yaml"
    cfg.write_text(f"""
providers:
  fake-openai: {{type: openai, base_url: "{fake}/v1", local: true}}
deployments:
  slow: {{provider: fake-openai, model: fake-drain, price: fake-small}}
models:
  drain: {{candidates: [slow]}}
""")
    env = {**tls_env(gateway.pki, "router"), "IGW_ROUTER_CONFIG": str(cfg), "IGW_GRACE_SECONDS": str(GRACE_S),
           "IGW_LEDGER_ADDR": gateway.addr("ledger"), "IGW_KEYVAULT_ADDR": gateway.addr("keyvault")}
    rule = {"match_model": "fake-drain", "mode": "ok", "delay_ms": 1500, "times": 100}
    httpx.post(f"{fake}/_fake/faults", json=[rule], timeout=10).raise_for_status()
    router = start_service("router", env, tmp_path)
    rid = f"drain-{uuid.uuid4().hex}"
    outcome: dict[str, Any] = {}
    try:
        with mtls_channel(router.address, gateway.pki, "agent-demo-quickstart") as ch:
            stub = router_pb2_grpc.RouterServiceStub(ch)

            def call() -> None:
                try:
                    outcome["resp"] = stub.Generate(
                        router_pb2.GenerateRequest(model="drain", max_output_tokens=16, request_id=rid, messages=[
                            router_pb2.Message(role=router_pb2.ROLE_USER, parts=[router_pb2.ContentPart(text="hi")])]),
                        timeout=15)
                except grpc.RpcError as err:
                    outcome["err"] = err

            caller = threading.Thread(target=call)
            caller.start()
            time.sleep(0.8)  # the call is waiting on the slow provider
            t0 = time.monotonic()
            code = router.terminate(timeout=GRACE_S + 10)
            stopped_in = time.monotonic() - t0
            caller.join(5)
        assert "err" not in outcome, outcome.get("err")
        assert outcome["resp"].request_id == rid and outcome["resp"].text
        assert code == 0, router.log_text()[-3000:]
        assert stopped_in < GRACE_S + 2.5, f"took {stopped_in:.1f} s for a {GRACE_S} s grace"
        # Its settle was sent before the process exited: one entry, settled (not a captured hold).
        with gateway.channel("ledger") as lch:
            entries = ledger_pb2_grpc.LedgerAdminServiceStub(lch).ListSpendEntries(
                ledger_pb2.ListSpendEntriesRequest(page_size=1000), timeout=10).entries
        mine = [e for e in entries if e.request_id == rid]
        assert len(mine) == 1 and ledger_pb2.SPEND_FLAG_UNSETTLED_CAPTURE not in mine[0].flags, mine
    finally:
        router.terminate()
        httpx.delete(f"{fake}/_fake/faults", timeout=10)

"""The floor under every igw hop: CPU per gRPC round trip in Python, over mTLS.

A grpc.aio server answering ``grpc.health.v1.Health/Check`` (no work at all) runs in its own
process with a service certificate; a grpc.aio client in this process calls it open-loop at a
fixed rate over a warm mTLS channel, like the router calls the ledger and the vault. Reports the
CPU each side spends per round trip (process CPU time over the calls), and the same once more
without TLS, so the TLS share is visible. A third series goes through the SPIFFE tunnel (TLS done
by Python's ``ssl``, the server's URI SAN checked per connection; ``igw.client._spiffe``), which the
router uses for a ledger or vault whose certificate does not state its identity as a DNS name.
``mtls_one_in_flight`` is the latency of one round trip at a time over mTLS: what a lone caller
waits per hop.

    python -m bench.rpc_floor [--rate 150] [--calls 3000] [--pki DIR]

An igw call makes three such round trips on its critical path (agent -> router, router ->
ledger ``Reserve`` and router -> vault ``IssueCredential``, the last two concurrently) and one
batched settle after it; budget slices take ``Reserve`` off most calls.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from igw_dev.pki import init_dev_pki
from services.common.tls import SERVER_OPTIONS, secure_channel, server_credentials


def _cpu_s(pid: int | None = None) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


async def _serve(pki: Path) -> None:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    tls_port = server.add_secure_port(
        "127.0.0.1:0", server_credentials(pki / "ledger.pem", pki / "ledger-key.pem", pki / "ca.pem"))
    plain_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(json.dumps({"tls": tls_port, "plain": plain_port}), flush=True)
    await server.wait_for_termination()


async def _load(channel: grpc.aio.Channel, rate: float, calls: int, server_pid: int) -> dict[str, Any]:
    stub = health_pb2_grpc.HealthStub(channel)
    req = health_pb2.HealthCheckRequest()
    for _ in range(50):  # warm: connection, TLS session, HTTP/2 windows
        await stub.Check(req, timeout=5)
    c0, s0, t0 = _cpu_s(), _cpu_s(server_pid), time.perf_counter()
    tasks = []
    for i in range(calls):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(stub.Check(req, timeout=10)))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    wall = time.perf_counter() - t0
    errors = sum(1 for r in results if isinstance(r, BaseException))
    return {
        "calls": calls, "errors": errors, "achieved_rps": round(calls / wall, 1),
        "client_cpu_ms_per_call": round((_cpu_s() - c0) * 1000 / calls, 3),
        "server_cpu_ms_per_call": round((_cpu_s(server_pid) - s0) * 1000 / calls, 3),
    }


async def _one_in_flight(channel: grpc.aio.Channel, calls: int = 600, gap_s: float = 0.005) -> dict[str, Any]:
    """Latency of one round trip at a time (``gap_s`` apart, so each starts on idle threads): the
    wait a lone caller pays per hop. Median and p90 of all but the first 100 (warm-up)."""
    stub = health_pb2_grpc.HealthStub(channel)
    req = health_pb2.HealthCheckRequest()
    lat = []
    for _ in range(calls):
        t = time.perf_counter()
        await stub.Check(req, timeout=5)
        lat.append((time.perf_counter() - t) * 1000)
        await asyncio.sleep(gap_s)
    kept = sorted(lat[100:])
    return {"calls": len(kept), "p50_ms": round(kept[len(kept) // 2], 3), "p90_ms": round(kept[int(len(kept) * 0.9)], 3)}


def measure(rate: float = 150.0, calls: int = 3000, pki: Path | None = None) -> dict[str, Any]:
    """Runs the server process and both loads; returns the figures (ms of CPU per round trip)."""
    with tempfile.TemporaryDirectory() as tmp:
        if pki is None:
            pki = Path(tmp)
            init_dev_pki(pki)
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.rpc_floor", "--serve", "--pki", str(pki)],
            stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parents[1])
        try:
            assert proc.stdout is not None
            ports = json.loads(proc.stdout.readline())

            async def both() -> dict[str, Any]:
                tls = secure_channel(f"127.0.0.1:{ports['tls']}", pki / "router.pem", pki / "router-key.pem",
                                     pki / "ca.pem")
                async with tls:
                    with_tls = await _load(tls, rate, calls, proc.pid)
                    one = await _one_in_flight(tls)
                tunnel = secure_channel(f"127.0.0.1:{ports['tls']}", pki / "router.pem", pki / "router-key.pem",
                                        pki / "ca.pem", expected_id="spiffe://igw.local/ledger")
                async with tunnel:
                    spiffe = await _load(tunnel, rate, calls, proc.pid)
                async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['plain']}") as plain:
                    without = await _load(plain, rate, calls, proc.pid)
                return {"rate": rate, "mtls": with_tls, "mtls_one_in_flight": one, "mtls_spiffe_tunnel": spiffe, "plaintext": without,
                        "grpcio": grpc.__version__}

            return asyncio.run(both())
        finally:
            proc.terminate()
            proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rpc_floor", description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=150.0, help="round trips per second (open loop)")
    p.add_argument("--calls", type=int, default=3000)
    p.add_argument("--pki", type=Path, default=None, help="a PKI dir with ca, ledger and router certs")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        asyncio.run(_serve(args.pki))
        return 0
    print(json.dumps(measure(args.rate, args.calls, args.pki), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

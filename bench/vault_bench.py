"""KeyVault benchmark: IssueCredential calls per second with durable audit, and p50/p99.

Starts its own embedded Postgres (fsync on unless --fast-pg; or uses --database-url), a
dev PKI and one keyvault process, stores three keys of one provider, then calls
IssueCredential through gRPC with the router certificate at each concurrency for
``--seconds``. Every successful call is a lease whose audit record was committed first.

Prints one JSON document: calls/s, p50/p99 in ms per concurrency, and the audit batch
size the group commit reached (from the vault's own /metrics).

    .venv/bin/python bench/vault_bench.py [--seconds 10] [--concurrency 1 32]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from igw.keyvault.v1 import keyvault_pb2 as pb
from igw.keyvault.v1 import keyvault_pb2_grpc
from igw_dev import pki as pki_mod
from igw_dev.procs import ServiceProcess, start_service, tls_env
from services.common.tls import secure_channel


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 3)


def _metric_sum(proc: ServiceProcess, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def _scenario(stub, seconds: float, concurrency: int) -> dict[str, object]:  # type: ignore[no-untyped-def]
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            req = pb.IssueCredentialRequest(provider="openai", team="bench", model="gpt-4o-mini",
                                            request_id=uuid.uuid4().hex)
            t0 = time.perf_counter()
            try:
                await stub.IssueCredential(req, timeout=10)
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "calls": len(latencies),
        "errors": errors,
        "calls_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": _pct(latencies, 0.50),
        "p99_ms": _pct(latencies, 0.99),
    }


async def _run(args: argparse.Namespace, url: str, pki_dir: Path, state: Path) -> dict[str, object]:
    env = {**tls_env(pki_dir, "keyvault"), "IGW_DATABASE_URL": url, "IGW_LOG_LEVEL": "WARNING",
           "IGW_VAULT_MASTER_KEY": base64.b64encode(os.urandom(32)).decode()}
    proc = start_service("keyvault", env, state / "keyvault", timeout=60)
    try:
        admin = secure_channel(proc.address, pki_dir / "operator-admin.pem", pki_dir / "operator-admin-key.pem",
                               pki_dir / "ca.pem")
        admin_stub = keyvault_pb2_grpc.KeyVaultAdminServiceStub(admin)
        for i in range(3):
            await admin_stub.CreateProviderKey(pb.CreateProviderKeyRequest(
                request_id=uuid.uuid4().hex, name=f"openai-bench-{i}", provider="openai",
                secret=f"sk-bench-{uuid.uuid4().hex}", base_url="https://api.openai.com/v1", all_teams=True))
        channel = secure_channel(proc.address, pki_dir / "router.pem", pki_dir / "router-key.pem",
                                 pki_dir / "ca.pem")
        stub = keyvault_pb2_grpc.KeyVaultServiceStub(channel)
        await _scenario(stub, 1.0, max(args.concurrency))  # warm-up
        results = []
        for c in args.concurrency:
            batches0 = _metric_sum(proc, "igw_keyvault_audit_batch_size_count")
            records0 = _metric_sum(proc, "igw_keyvault_audit_batch_size_sum")
            res = await _scenario(stub, args.seconds, c)
            batches = _metric_sum(proc, "igw_keyvault_audit_batch_size_count") - batches0
            records = _metric_sum(proc, "igw_keyvault_audit_batch_size_sum") - records0
            res["audit_batches"] = int(batches)
            res["mean_audit_batch"] = round(records / batches, 2) if batches else 0.0
            results.append(res)
        verdict = await admin_stub.VerifyAuditLog(pb.VerifyAuditLogRequest(), timeout=120)
        await channel.close()
        await admin.close()
        return {
            "benchmark": "keyvault.IssueCredential",
            "durable_audit": True,
            "postgres_fsync": not args.fast_pg,
            "seconds": args.seconds,
            "cpus": os.cpu_count(),
            "results": results,
            "audit_chain_ok": verdict.ok,
            "audit_records": verdict.records_checked,
        }
    finally:
        proc.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--database-url", default="", help="a SQLAlchemy URL of an empty database")
    parser.add_argument("--fast-pg", action="store_true", help="embedded Postgres without fsync (upper bound)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="igw-vault-bench-") as tmp:
        state = Path(tmp)
        pki_mod.init_dev_pki(state / "pki")
        pg = None
        url = args.database_url
        if not url:
            from igw_dev.pg import EmbeddedPostgres

            pg = EmbeddedPostgres(state / "pg", port=54331, fast=args.fast_pg)
            pg.start()
            pg.create_database("vault_bench")
            url = pg.url("vault_bench")
        try:
            result = asyncio.run(_run(args, url, state / "pki", state))
        finally:
            if pg is not None:
                pg.stop()
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()

"""Ledger benchmark: Reserve+Settle pairs per second and latency through gRPC (router cert).

Starts its own embedded Postgres (or uses --database-url), a dev PKI and one ledger
process, then for each scenario runs ``--concurrency`` callers for ``--seconds``:

- ``many_teams``: each pair picks one of 1,000 teams at random (little row contention);
- ``hot_team``: every pair hits the same team's budget row (the hot-row case).

Prints one JSON document: pairs/s and p50/p99 of the pair and of each call, in ms.

    .venv/bin/python bench/ledger_bench.py [--seconds 10] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from igw.ledger.v1 import ledger_pb2 as pb
from igw.ledger.v1 import ledger_pb2_grpc
from igw_dev import pki as pki_mod
from igw_dev.procs import start_service, tls_env
from services.common.tls import secure_channel


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 3)


async def _scenario(stub, teams: list[str], seconds: float, concurrency: int) -> dict[str, object]:  # type: ignore[no-untyped-def]
    pairs: list[float] = []
    reserves: list[float] = []
    settles: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal errors
        rng = random.Random()
        while time.perf_counter() < deadline:
            rid = uuid.uuid4().hex
            team = rng.choice(teams)
            t0 = time.perf_counter()
            try:
                res = await stub.Reserve(pb.ReserveRequest(
                    request_id=rid, attempt=0, team=team, agent="bench", model="fake-small",
                    prompt_tokens_upper_bound=2000, max_output_tokens=1000), timeout=10)
                t1 = time.perf_counter()
                await stub.Settle(pb.SettleRequest(
                    request_id=rid, reservation_id=res.reservation_id,
                    usage=pb.TokenUsage(input_tokens=1500, output_tokens=400),
                    provider="fake", provider_model="fake-small-v1"), timeout=10)
            except Exception:
                errors += 1
                continue
            t2 = time.perf_counter()
            pairs.append(t2 - t0)
            reserves.append(t1 - t0)
            settles.append(t2 - t1)

    start = time.perf_counter()
    await asyncio.gather(*[caller() for _ in range(concurrency)])
    elapsed = time.perf_counter() - start
    return {
        "pairs": len(pairs),
        "errors": errors,
        "pairs_per_s": round(len(pairs) / elapsed, 1),
        "pair_p50_ms": _pct(pairs, 0.5),
        "pair_p99_ms": _pct(pairs, 0.99),
        "reserve_p50_ms": _pct(reserves, 0.5),
        "reserve_p99_ms": _pct(reserves, 0.99),
        "settle_p50_ms": _pct(settles, 0.5),
        "settle_p99_ms": _pct(settles, 0.99),
        "pair_mean_ms": round(statistics.fmean(pairs) * 1000, 3) if pairs else 0.0,
    }


async def _run(args: argparse.Namespace, url: str, pki_dir: Path, state: Path) -> dict[str, object]:
    env = {**tls_env(pki_dir, "ledger"), "IGW_DATABASE_URL": url, "IGW_LOG_LEVEL": "WARNING",
           "IGW_LEDGER_POOL_SIZE": str(args.pool_size)}
    proc = start_service("ledger", env, state / "ledger", timeout=60)
    try:
        admin = secure_channel(proc.address, pki_dir / "operator-admin.pem", pki_dir / "operator-admin-key.pem",
                               pki_dir / "ca.pem")
        admin_stub = ledger_pb2_grpc.LedgerAdminServiceStub(admin)
        teams = [f"team-{i}" for i in range(1000)]
        for team in [*teams, "hot"]:
            await admin_stub.SetBudget(pb.SetBudgetRequest(
                team=team, window=pb.BUDGET_WINDOW_MONTHLY, limit_nanos=10**15, soft_limit_nanos=0))
        await admin.close()
        channel = secure_channel(proc.address, pki_dir / "router.pem", pki_dir / "router-key.pem",
                                 pki_dir / "ca.pem")
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        await _scenario(stub, teams, 1.0, args.concurrency)  # warm-up
        out = {
            "concurrency": args.concurrency,
            "seconds": args.seconds,
            "many_teams": await _scenario(stub, teams, args.seconds, args.concurrency),
            "hot_team": await _scenario(stub, ["hot"], args.seconds, args.concurrency),
        }
        await channel.close()
        return out
    finally:
        proc.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--pool-size", type=int, default=20)
    parser.add_argument("--database-url", default="", help="a SQLAlchemy URL of an empty database")
    parser.add_argument("--fast-pg", action="store_true", help="embedded Postgres without fsync (upper bound)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="igw-ledger-bench-") as tmp:
        state = Path(tmp)
        pki_mod.init_dev_pki(state / "pki")
        pg = None
        url = args.database_url
        if not url:
            from igw_dev.pg import EmbeddedPostgres

            pg = EmbeddedPostgres(state / "pg", port=54329, fast=args.fast_pg)
            pg.start()
            pg.create_database("ledger_bench")
            url = pg.url("ledger_bench")
        try:
            result = asyncio.run(_run(args, url, state / "pki", state))
        finally:
            if pg is not None:
                pg.stop()
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()

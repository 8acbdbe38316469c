"""The agents' client: what checking the router's identity costs the agent, per call.

Starts ``igw up --demo`` (its own state dir, free ports; the dev PKI gives the router's certificate
its identity's DNS name), then makes ``generate("fast", ...)`` calls (one at a time, or
``--threads`` at a time) through the blocking client with ``identity_check="uri"`` (the SPIFFE
tunnel, in Python) and ``"auto"`` (gRPC's own TLS), alternating blocks of calls so that machine
noise falls on both alike. Reports per mode the latency (median and p90, after a warm-up block),
the calls per second and the client process's CPU per call (``time.process_time`` over the calls:
the tunnel's thread included).

    python -m bench.client_bench [--calls 600] [--block 50] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import procstats
from igw.client import IgwClient

MODES = ("uri", "auto")


def _block(client: IgwClient, n: int, threads: int = 1) -> tuple[list[float], float, float]:
    """``n`` calls, ``threads`` at a time: their latencies (ms), the CPU this process spent on them
    and the wall time (s)."""
    def one(_: int) -> float:
        t0 = time.perf_counter()
        client.generate("fast", "bench")
        return (time.perf_counter() - t0) * 1000

    cpu0, wall0 = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        lat = list(pool.map(one, range(n)))
    return lat, time.process_time() - cpu0, time.perf_counter() - wall0


def measure(endpoints: dict[str, Any], calls: int, block: int, threads: int = 1) -> dict[str, Any]:
    kw = {"addresses": [endpoints["router"]], "cert": endpoints["agent_cert"], "key": endpoints["agent_key"],
          "ca": endpoints["ca"], "timeout": 30}
    clients = {m: IgwClient(**kw, identity_check=m) for m in MODES}
    lat: dict[str, list[float]] = {m: [] for m in MODES}
    cpu, wall = dict.fromkeys(MODES, 0.0), dict.fromkeys(MODES, 0.0)
    try:
        for m in MODES:  # warm-up: channels, connections, the router's caches
            _block(clients[m], block, threads)
        for _ in range(max(calls // block, 1)):
            for m in MODES:
                samples, spent, took = _block(clients[m], block, threads)
                lat[m] += samples
                cpu[m] += spent
                wall[m] += took
        modes = {m: clients[m]._links[0].mode for m in MODES}
    finally:
        for c in clients.values():
            c.close()
    out: dict[str, Any] = {}
    for m in MODES:
        q = statistics.quantiles(lat[m], n=10)
        out[m] = {"channel": modes[m], "calls": len(lat[m]), "p50_ms": round(statistics.median(lat[m]), 3),
                  "p90_ms": round(q[8], 3), "client_cpu_ms_per_call": round(cpu[m] * 1000 / len(lat[m]), 3),
                  "calls_per_s": round(len(lat[m]) / wall[m], 1)}
    out["ratio_auto_to_uri"] = {
        "p50": round(out["auto"]["p50_ms"] / out["uri"]["p50_ms"], 3),
        "client_cpu": round(out["auto"]["client_cpu_ms_per_call"] / out["uri"]["client_cpu_ms_per_call"], 3),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=600, help="measured calls per mode")
    ap.add_argument("--block", type=int, default=50, help="calls per block; the modes alternate by block")
    ap.add_argument("--threads", type=int, default=1, help="calls in flight (threads sharing one client)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="igw-client-bench-") as tmp:
        state = Path(tmp)
        log = state / "up.log"
        with open(log, "ab") as out:
            up = subprocess.Popen([sys.executable, "-m", "services.cli.main", "up", "--state-dir", str(state / "igw"),
                                   "--ports", "auto", "--demo"], stdout=out, stderr=subprocess.STDOUT)
        try:
            endpoints = procstats.wait_for_endpoints(up, state / "igw" / "endpoints.json", log, "igw up")
            result = {"threads": args.threads, **measure(endpoints, args.calls, args.block, args.threads)}
        finally:
            procstats.stop_process(up)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

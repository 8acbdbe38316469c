"""`python -m bench run --quick --no-litellm` end to end with tiny durations: the harness works,
every call answers, and the ledger holds exactly one spend entry per successful call. The rate and
hot ladders run igw at its defaults (adaptive budget slices) and with per-call holds (the bench's
per-call teams) side by side, and a team of each kind is driven to its limit."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ("ceiling", "c1", "rate", "hot", "limit", "stream", "fallback")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bench_quick_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "run", "--quick", "--no-litellm", "--no-profile", "--no-markdown",
         "--teams", "5", "--step-seconds", "0.5", "--c1-n", "20", "--rates", "20", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=170,
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, f"bench failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert elapsed < 60, f"quick bench took {elapsed:.0f} s"
    results = json.loads(out.read_text())
    assert results["quick"] is True
    assert results["rig"]["litellm"] is None
    for name in SCENARIOS:
        sc = results["scenarios"][name]
        assert "error" not in sc, f"{name}: {sc['error']}"

    from bench.report import errors_total, headline

    assert not {k: v for k, v in errors_total(results).items() if v}
    c1 = results["scenarios"]["c1"]["d0"]
    assert c1["pooled_ms"]["igw"]["n"] == 20 and c1["pooled_ms"]["direct"]["n"] == 20
    assert c1["pooled_ms"]["igw-hot-percall"]["n"] == 20 and c1["errors"]["igw-hot-percall"] == 0
    assert results["scenarios"]["rate"]["max_sustained_rps"]["igw"] == 20
    # The defaults draw from budget slices; per-call holds measured in the same ladders.
    assert "per_call_teams:" in results["rig"]["routing_config"]
    for name, sliced, plain in (("rate", "igw", "igw-percall"), ("hot", "igw-hot", "igw-hot-percall")):
        sc = results["scenarios"][name]
        assert sc["max_sustained_rps"] == {plain: 20, sliced: 20}, sc["max_sustained_rps"]
        for step in sc["steps"]:
            for system in (plain, sliced):
                res = step["results"][system]
                assert res["ok"] > 0 and not sum(res["errors"].values()), (system, res["errors"])
            # A busy key draws from slices (its first calls in a window take per-call holds); the
            # sanity step already proved a busy key draws.
            res = step["results"][sliced]
            assert res["slices"]["draws"] <= res["ok"] + res["warmup"]["ok"], res["slices"]
            assert res["slices"]["events"].get("failed", 0) == 0, res["slices"]
            assert step["results"][plain]["slices"]["draws"] == 0  # per-call holds: no slice
    limit = results["scenarios"]["limit"]
    assert limit["ok"], limit
    assert limit["igw"]["served"] >= limit["igw-percall"]["served"] > 0 and limit["igw"]["refused"] > 0
    assert not limit["igw"]["overspent"] and limit["igw"]["held_nanos"] == 0
    # The defaults drew slices far from the limit, and those were open when the limit came near.
    assert limit["slice_draws_busy"] > 0, limit
    assert results["scenarios"]["stream"]["ttft_ms"]["igw"]["n"] == 20
    served = results["scenarios"]["fallback"]["c1_served_by"][0]
    assert set(served) <= {"bench-flaky", "bench-backup"} and sum(p["n"] for p in served.values()) == 20
    spend = results["spend_check"]
    for name in ("c1", "rate", "hot", "stream", "fallback"):
        check = spend[name]
        assert check["successes"] > 0
        assert check["entries"] == check["successes"], check
        assert check["lost"] == 0 and check["duplicated"] == 0 and check["unexpected"] == 0, check
        assert check["wrong_team"] == 0 and check["ok"], check
    for name, system in (("rate", "igw-percall"), ("hot", "igw-hot-percall")):
        check = spend[name]["systems"][system]
        assert check["successes"] > 0 and check["entries"] == check["successes"], check
        assert check["ok"], check
    assert headline(results)["bar"]["spend_exact"] is True

    # `report` rewrites the summary and the plot from the saved JSON without measuring again.
    from bench import __main__ as bench_main
    from bench import report

    md, png = tmp_path / "BENCHMARKS.md", tmp_path / "latency.png"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "MARKDOWN", md)
        mp.setattr(report, "PLOT", png)
        mp.setattr(report.plot, "__defaults__", (png,))
        assert bench_main.main(["report", str(out)]) == 0
    text = md.read_text()
    assert out.name in text and "## Headline" in text
    assert "igw with per-call holds (configured)" in text and "driven to its limit" in text
    assert png.stat().st_size > 1000


def test_the_rpc_floor_measures_cpu_per_round_trip_on_both_sides() -> None:
    """`python -m bench.rpc_floor`: a do-nothing gRPC round trip over mTLS and plaintext."""
    from bench.rpc_floor import measure

    res = measure(rate=200, calls=200)
    for mode in ("mtls", "mtls_spiffe_tunnel", "plaintext"):
        r = res[mode]
        assert r["calls"] == 200 and r["errors"] == 0
        assert r["client_cpu_ms_per_call"] > 0 and r["server_cpu_ms_per_call"] > 0
        assert r["achieved_rps"] > 100

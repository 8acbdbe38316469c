"""The ``edge`` scenario's report (the runs are ``scen_edge`` in bench/scenarios.py): igw's
OpenAI-compatible HTTPS edge next to its gRPC path and LiteLLM.

Both the edge and LiteLLM are HTTP/JSON with the same request body, so this is the comparison
a user makes first. The edge runs the same call as gRPC (mTLS with one agent certificate per
team, a vault lease, a ledger hold and an exact settle); its request ids go in the
``x-igw-request-id`` header so the spend check holds it to one entry per answered call.

Two parts, all against the same fakes:

* ``c1``: one call in flight, interleaved rounds: direct, igw (gRPC), igw-edge, LiteLLM
  (fake d0: pure overhead);
* ``rate``: the open-loop ladder (fake d20) for igw, igw-edge and LiteLLM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

EDGE_MD = Path(__file__).resolve().parent / "edge.md"


def _f(x: Any, nd: int = 2) -> str:
    return "" if x is None else f"{x:.{nd}f}"


def markdown(results: dict[str, Any], json_path: str) -> str:
    """The edge section of BENCHMARKS.md (kept across runs in bench/edge.md)."""
    e = results["scenarios"]["edge"]
    c1, rate = e["c1"], e["rate"]
    pooled = c1["pooled_ms"]
    h = ["## The HTTPS edge next to gRPC and LiteLLM", "",
         f"Run `{results['run_id']}` ({'quick' if results.get('quick') else 'full'}), "
         f"{results['started']}, raw data `{json_path}`; command: `{results.get('command', '')}`. "
         "Same rig as above; `igw-edge` is `POST /v1/chat/completions` on the router's HTTPS edge (mTLS, one agent "
         "certificate per team, JSON body identical to LiteLLM's), running the same call as gRPC (lease, hold, "
         "settle). Machine load during the run: see *other tenants*.", "",
         f"### One call in flight, fake delay 0 ms ({results['options']['c1_rounds']} round(s), "
         f"{results['options']['c1_n']} calls each)", "",
         "| system | p50 ms | p90 | p99 | added p50 | added p99 | router CPU ms/call | LiteLLM CPU ms/call |",
         "|---|---|---|---|---|---|---|---|"]
    for s, p in pooled.items():
        a = c1["added_ms"].get(s, {})
        procs = c1["procs"].get(s, {})
        router_cpu = procs.get("router", {}).get("cpu_ms_per_call") if s.startswith("igw") else None
        litellm_cpu = procs.get("litellm", {}).get("cpu_ms_per_call") if s == "litellm" else None
        h.append(f"| {s} | {_f(p.get('p50'))} | {_f(p.get('p90'))} | {_f(p.get('p99'))} | {_f(a.get('p50'))} | "
                 f"{_f(a.get('p99'))} | {_f(router_cpu)} | {_f(litellm_cpu)} |")
    base, edge, lite = (pooled.get(k, {}).get("p50") for k in ("igw", "igw-edge", "litellm"))
    if base and edge:
        h.append("")
        h.append(f"Median ratios (p50): edge / gRPC **{edge / base:.2f}x**"
                 + (f", LiteLLM / edge **{lite / edge:.2f}x**, LiteLLM / gRPC **{lite / base:.2f}x**" if lite else "")
                 + ".")
    h += ["", "### Open-loop ladder (fake delay 20 ms)", "",
          "| rate/s | system | achieved/s | p50 ms | p99 ms | added p99 | pass | router CPU ms/call | other tenants (cores) |",
          "|---|---|---|---|---|---|---|---|---|"]
    for step in rate["steps"]:
        for s, r in step["results"].items():
            lat = r.get("latency_ms", {})
            cpu = r.get("procs", {}).get("litellm" if s == "litellm" else "router", {}).get("cpu_ms_per_call")
            verdict = "" if s == "direct" else ("✅" if r.get("pass") else "❌ " + str(r.get("why", "")))
            h.append(f"| {step['rate']} | {s} | {_f(r.get('achieved_rps'), 0)} | {_f(lat.get('p50'))} | "
                     f"{_f(lat.get('p99'))} | {_f(r.get('added_ms', {}).get('p99'))} | {verdict} | "
                     f"{_f(cpu) if s != 'direct' else ''} | {_f(r.get('other_tenants_cores'))} |")
    mx = rate["max_sustained_rps"]
    h += ["", "A failing step is retried once (shared machine); the row shows the first attempt unless the retry "
          "passed (`ok on retry`).", "", "Max sustained (zero errors, ≥ 95 % achieved, added p99 < 50 ms): "
          + ", ".join(f"{s} {v:.0f}/s" for s, v in mx.items()) + ".", ""]
    spend = results.get("spend_check", {}).get("edge")
    if spend:
        h.append(f"Spend check: {spend['successes']} calls answered OK, {spend['entries']} spend entries, "
                 f"{spend['lost']} lost, {spend['duplicated']} duplicated"
                 + (" (per system: " + ", ".join(f"{s} {v['successes']}/{v['entries']}"
                                                  for s, v in spend.get("systems", {}).items()) + ")"
                    if spend.get("systems") else "") + ".")
        h.append("")
    return "\n".join(h)


def write_markdown(results: dict[str, Any], json_path: Path) -> Path:
    """Writes bench/edge.md from a run that had the edge scenario."""
    rel = json_path.resolve().relative_to(Path(__file__).resolve().parents[1])
    EDGE_MD.write_text(markdown(results, str(rel)))
    return EDGE_MD

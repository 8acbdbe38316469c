"""Results: raw JSON in bench/results/, a summary in BENCHMARKS.md, a plot in bench/results/latency.png."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bench import baseline as baseline_mod

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MARKDOWN = ROOT / "BENCHMARKS.md"
LEDGER_SCALE = Path(__file__).resolve().parent / "ledger_scale.md"
ANALYSIS = ROOT / "bench" / "analysis.md"
PLOT = RESULTS / "latency.png"
EDGE = ROOT / "bench" / "edge.md"  # the HTTPS edge next to gRPC and LiteLLM (bench/edge_bench.py)

# igw's added p50 at one call in flight: at most this share of LiteLLM's.
BAR_P50_SHARE = 0.5
BAR_RATIO = 5.0

# How the report names systems whose key alone would not say what they are.
LABELS = {
    "igw": "igw (the defaults: adaptive budget slices)",
    "igw-hot": "igw-hot (the defaults)",
    "igw-percall": "igw with per-call holds (configured)",
    "igw-hot-percall": "igw-hot with per-call holds (configured)",
}
PERCALL_NAME = LABELS["igw-percall"]


def label(system: str) -> str:
    return LABELS.get(system, system)


def write_json(results: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=False, default=str))
    os.replace(tmp, path)
    return path


def _g(d: Any, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _f(x: Any, nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, (int, float)):
        return f"{x:.{nd}f}"
    return str(x)


def errors_total(results: dict[str, Any]) -> dict[str, int]:
    """Errors of the scenarios that must have none (c1, stream, fallback at c=1 and the passing ladder steps)."""
    out: dict[str, int] = {}
    sc = results.get("scenarios", {})
    for name in ("c1",):
        for fake, entry in (sc.get(name) or {}).items():
            if isinstance(entry, dict) and "errors" in entry:
                for system, n in entry["errors"].items():
                    out[f"c1.{fake}.{system}"] = n
    for name in ("stream", "fallback"):
        for system, n in (_g(sc, name, "errors") or {}).items():
            out[f"{name}.{system}"] = n
    for name in ("rate", "hot"):
        for step in _g(sc, name, "steps") or []:
            for system, res in step["results"].items():
                if system == "direct" or res.get("pass"):
                    out[f"{name}.{step['rate']}.{system}"] = sum(res["errors"].values())
    return out


def healthy(results: dict[str, Any]) -> bool:
    """No scenario crashed, no error where none is allowed, spend entries == successes."""
    sc = results.get("scenarios", {})
    if any(isinstance(v, dict) and "error" in v for v in sc.values()):
        return False
    if any(errors_total(results).values()):
        return False
    return all(v.get("ok") for v in (results.get("spend_check") or {}).values())


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The numbers the issue asks for."""
    sc = results.get("scenarios", {})
    c1 = _g(sc, "c1", "d0") or {}
    h: dict[str, Any] = {
        "direct_c1_ms": c1.get("pooled_ms", {}).get("direct"),
        "igw_c1_ms": c1.get("pooled_ms", {}).get("igw"),
        "litellm_c1_ms": c1.get("pooled_ms", {}).get("litellm"),
        "igw_added_c1_ms": _g(c1, "added_ms", "igw"),
        "igw_percall_added_c1_ms": _g(c1, "added_ms", "igw-hot-percall"),
        "litellm_added_c1_ms": _g(c1, "added_ms", "litellm"),
        "igw_max_rps": _g(sc, "rate", "max_sustained_rps", "igw"),
        "litellm_max_rps": _g(sc, "rate", "max_sustained_rps", "litellm"),
        "igw_hot_max_rps": _g(sc, "hot", "max_sustained_rps", "igw-hot"),
        # The same ladders with per-call holds (teams listed in budget_slices.per_call_teams).
        "igw_percall_max_rps": _g(sc, "rate", "max_sustained_rps", "igw-percall"),
        "igw_hot_percall_max_rps": _g(sc, "hot", "max_sustained_rps", "igw-hot-percall"),
        "fake_ceiling_rps": _g(sc, "ceiling", "ceiling_rps"),
        "igw_added_ttft_ms": _g(sc, "stream", "added_ttft_ms", "igw"),
        "litellm_added_ttft_ms": _g(sc, "stream", "added_ttft_ms", "litellm"),
        "igw_fallback_added_c1_ms": _g(sc, "fallback", "c1_added_vs_direct_ms", "igw-fallback"),
    }
    # LiteLLM again at its own default worker count (one per logical CPU), when that differs.
    h["litellm_default_workers"] = _g(sc, "rate-litellm-default", "workers")
    h["litellm_default_max_rps"] = _g(sc, "rate-litellm-default", "max_sustained_rps", "litellm")
    if h["igw_max_rps"] and h["litellm_max_rps"]:
        h["ratio"] = round(h["igw_max_rps"] / h["litellm_max_rps"], 2)
    if h["igw_max_rps"] and h["litellm_default_max_rps"]:
        h["ratio_default"] = round(h["igw_max_rps"] / h["litellm_default_max_rps"], 2)
    # The bar holds against LiteLLM's best configuration measured in the run.
    ratios = [r for r in (h.get("ratio"), h.get("ratio_default")) if r is not None]
    h["ratio_vs_best"] = min(ratios) if ratios else None
    # igw with per-call holds (configured), against the same LiteLLM numbers.
    if h["igw_percall_max_rps"] and h["litellm_max_rps"]:
        h["ratio_percall"] = round(h["igw_percall_max_rps"] / h["litellm_max_rps"], 2)
    if h["igw_percall_max_rps"] and h["litellm_default_max_rps"]:
        h["ratio_percall_default"] = round(h["igw_percall_max_rps"] / h["litellm_default_max_rps"], 2)
    ratios = [r for r in (h.get("ratio_percall"), h.get("ratio_percall_default")) if r is not None]
    h["ratio_percall_vs_best"] = min(ratios) if ratios else None
    h["cpu_ms_per_call"] = cpu_side_by_side(results)
    added = h["igw_added_c1_ms"] or {}
    lit_added = h["litellm_added_c1_ms"] or {}
    # The hot team against the same LiteLLM numbers (LiteLLM has no budgets to contend on).
    lit_best = max([v for v in (h["litellm_max_rps"], h["litellm_default_max_rps"]) if v] or [0])
    h["ratio_hot_vs_best"] = round(h["igw_hot_max_rps"] / lit_best, 2) if h["igw_hot_max_rps"] and lit_best else None
    h["limit"] = _g(sc, "limit")
    h["bar"] = {
        "added_p50_le_half_litellm": (
            added.get("p50") is not None and lit_added.get("p50") is not None
            and added["p50"] <= BAR_P50_SHARE * lit_added["p50"]
        ),
        "sustained_ge_3x_litellm": h["ratio_vs_best"] is not None and h["ratio_vs_best"] >= BAR_RATIO,
        "hot_sustained_ge_bar": h["ratio_hot_vs_best"] is not None and h["ratio_hot_vs_best"] >= BAR_RATIO,
        "limit_exact": _g(sc, "limit", "ok"),
        "percall_sustained_ge_bar": (
            h["ratio_percall_vs_best"] is not None and h["ratio_percall_vs_best"] >= BAR_RATIO
        ),
        "spend_exact": all(v.get("ok") for v in (results.get("spend_check") or {}).values()) or None,
    }
    ceiling = h["fake_ceiling_rps"]
    h["near_fake_ceiling"] = {
        k: bool(ceiling and v and v >= 0.9 * ceiling)
        for k, v in (
            ("igw", h["igw_max_rps"]),
            ("igw-percall", h["igw_percall_max_rps"]),
            ("litellm", h["litellm_max_rps"]),
        )
    }
    return h


CPU_PROCS = ("router", "ledger", "keyvault", "postgres")


def _cpu(res: dict[str, Any]) -> dict[str, Any]:
    per = {p: _g(res, "procs", p, "cpu_ms_per_call") for p in CPU_PROCS}
    known = [v for v in per.values() if v is not None]
    calls = (res.get("ok") or 0) + (_g(res, "warmup", "ok") or 0)
    return {**per, "total": round(sum(known), 3) if known else None, "calls": calls, "slices": res.get("slices")}


def cpu_side_by_side(results: dict[str, Any]) -> dict[str, Any]:
    """igw's CPU ms per call by process, the defaults vs per-call holds, at the highest ladder step
    both passed (rate: many teams; hot: one team)."""
    out: dict[str, Any] = {}
    for name, a, b in (("rate", "igw", "igw-percall"), ("hot", "igw-hot", "igw-hot-percall")):
        both = [
            st
            for st in _g(results, "scenarios", name, "steps") or []
            if _g(st, "results", a, "pass") and _g(st, "results", b, "pass")
        ]
        if both:
            st = both[-1]
            out[name] = {"rate": st["rate"], a: _cpu(st["results"][a]), b: _cpu(st["results"][b])}
    return out


def summary_text(results: dict[str, Any]) -> str:
    h = headline(results)
    lines = [
        f"run {results.get('run_id')} ({'quick' if results.get('quick') else 'full'}), {results.get('elapsed_s')} s"
    ]
    for who in ("igw", "igw_percall", "litellm"):
        a = h.get(f"{who}_added_c1_ms")
        if a:
            lines.append(f"  {who:10s} added at c=1: p50 {a['p50']:.2f} ms  p99 {a['p99']:.2f} ms")
    for who in ("igw", "igw_percall", "litellm", "igw_hot", "igw_hot_percall"):
        v = h.get(f"{who}_max_rps")
        if v is not None:
            lines.append(f"  {who:14s} max sustained (added p99 < 50 ms, no errors): {v:.0f} calls/s")
    if h.get("ratio") is not None:
        lines.append(f"  igw / litellm sustained: {h['ratio']:.2f}x")
    if h.get("ratio_percall") is not None:
        lines.append(f"  {PERCALL_NAME} / litellm sustained: {h['ratio_percall']:.2f}x")
    if h.get("litellm_default_max_rps") is not None:
        lines.append(
            f"  litellm with its default {h['litellm_default_workers']} workers: {h['litellm_default_max_rps']:.0f}"
            f" calls/s; igw / that: {h.get('ratio_default', float('nan')):.2f}x"
            f"; {PERCALL_NAME} / that: {h.get('ratio_percall_default', float('nan')):.2f}x"
        )
    for name, c in (h.get("cpu_ms_per_call") or {}).items():
        lines.append(
            f"  CPU ms/call router+ledger+vault+postgres, {name} at {c['rate']}/s: "
            + ", ".join(f"{label(s)} {_f(v['total'])}" for s, v in c.items() if s != "rate")
        )
    lines.append(f"  bar: {h['bar']}")
    sc = results.get("spend_check") or {}
    lines.append(
        "  spend: "
        + ", ".join(
            f"{k} {v['entries']}/{v['successes']} lost {v['lost']} dup {v['duplicated']}" for k, v in sc.items()
        )
    )
    bad = {k: v for k, v in errors_total(results).items() if v}
    if bad:
        lines.append(f"  ERRORS: {bad}")
    for name, v in results.get("scenarios", {}).items():
        if isinstance(v, dict) and "error" in v:
            lines.append(f"  SCENARIO FAILED {name}: {v['error']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plot


def plot(results: dict[str, Any], path: Path = PLOT) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sc = results.get("scenarios", {})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    bars: list[tuple[str, dict[str, float]]] = []
    for fake in ("d0", "d20"):
        for who in ("igw", "igw-hot-percall", "litellm"):
            a = _g(sc, "c1", fake, "added_ms", who)
            if a:
                bars.append((f"{who} c=1\nfake {fake[1:]} ms", a))
    for who in ("igw", "litellm"):
        a = _g(sc, "stream", "added_ttft_ms", who)
        if a:
            bars.append((f"{who}\nTTFT", a))
    a = _g(sc, "fallback", "c1_added_vs_direct_ms", "igw-fallback")
    if a:
        bars.append(("igw 20% 429\nfallback", a))
    if bars:
        xs = range(len(bars))
        ax1.bar([x - 0.2 for x in xs], [b[1].get("p50", 0) for b in bars], 0.4, label="added p50")
        ax1.bar([x + 0.2 for x in xs], [b[1].get("p99", 0) for b in bars], 0.4, label="added p99")
        ax1.set_xticks(list(xs))
        ax1.set_xticklabels([b[0] for b in bars], fontsize=7)
        ax1.set_ylabel("ms over a direct call to the fake")
        ax1.set_title("Added latency, one call in flight")
        ax1.legend(fontsize=8)
    for name in ("rate", "hot"):
        curves: dict[str, list[tuple[float, float]]] = {}
        for step in _g(sc, name, "steps") or []:
            for system, res in step["results"].items():
                if name == "hot" and system == "direct":
                    continue
                p99 = _g(res, "latency_ms", "p99")
                if p99 is not None and res.get("achieved_rps"):
                    curves.setdefault(system, []).append((res["achieved_rps"], p99))
        for system, pts in curves.items():
            pts.sort()
            ax2.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                label=label(system),
                ls="--" if system.endswith("-percall") else "-",
            )
    ax2.set_yscale("log")
    ax2.set_xlabel("achieved calls/s (open loop, fake delay 20 ms)")
    ax2.set_ylabel("p99 latency, ms (from scheduled send)")
    ax2.set_title("Throughput vs p99")
    ax2.axhline(20 + 50, color="grey", ls=":", lw=1)
    ax2.legend(fontsize=8)
    fig.suptitle(
        f"igw benchmark {results.get('run_id')} ({results.get('machine', {}).get('cpu_model', '')})", fontsize=9
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- markdown


def _pct_row(name: str, p: dict[str, Any] | None) -> str:
    p = p or {}
    return f"| {name} | {_f(p.get('p50'))} | {_f(p.get('p90'))} | {_f(p.get('p99'))} | {_f(p.get('p99.9'))} | {p.get('n', '-')} |"


def _slice_counts(v: dict[str, Any]) -> str:
    sl = v.get("slices")
    if not isinstance(sl, dict):
        return f"{v.get('calls', '-')}; -"
    ev = sl.get("events") or {}
    return f"{v.get('calls', '-')}; {sl.get('draws', 0)}, {ev.get('acquired', 0)} / {ev.get('released', 0)}"


def _slices_cfg(results: dict[str, Any]) -> str:
    """The run's budget_slices settings, from the routing config it wrote."""
    import yaml

    try:
        cfg = yaml.safe_load(_g(results, "rig", "routing_config") or "") or {}
    except yaml.YAMLError:
        cfg = {}
    bs = cfg.get("budget_slices") if isinstance(cfg, dict) else None
    if not isinstance(bs, dict):
        return "not in this run's config"
    return (
        f"slices at their defaults otherwise; {len(bs.get('per_call_teams') or [])} per-call teams"
    )


def _bar_verdicts(h: dict[str, Any]) -> list[str]:
    """The 5x-LiteLLM bar, stated for both igw configurations against LiteLLM's best measured one."""
    best = [v for v in (h.get("litellm_max_rps"), h.get("litellm_default_max_rps")) if v is not None]
    if not best:
        return [f"{BAR_RATIO:g}x LiteLLM bar: LiteLLM was not measured in this run."]
    lit = max(best)
    out = [
        f"{BAR_RATIO:g}x LiteLLM bar, judged against LiteLLM's best configuration measured "
        f"({_f(lit, 0)} calls/s sustained):",
        "",
    ]
    for name, rps, ratio, ok in (
        (
            "igw, many teams (the defaults: adaptive budget slices)",
            h.get("igw_max_rps"),
            h.get("ratio_vs_best"),
            h["bar"]["sustained_ge_3x_litellm"],
        ),
        (
            "igw, one hot team (the defaults)",
            h.get("igw_hot_max_rps"),
            h.get("ratio_hot_vs_best"),
            h["bar"]["hot_sustained_ge_bar"],
        ),
        (
            PERCALL_NAME,
            h.get("igw_percall_max_rps"),
            h.get("ratio_percall_vs_best"),
            h["bar"]["percall_sustained_ge_bar"],
        ),
    ):
        if rps is None:
            out.append(f"- **{name}**: not measured in this run")
        else:
            out.append(
                f"- **{name}**: {_f(rps, 0)} calls/s, {_f(ratio)}x LiteLLM's best: "
                f"{'✅ meets' if ok else '❌ misses'} the {BAR_RATIO:g}x bar"
            )
    return out


def markdown(results: dict[str, Any], json_path: Path) -> str:
    sc = results.get("scenarios", {})
    h = headline(results)
    m = results.get("machine", {})
    rel = json_path.relative_to(ROOT) if json_path.is_relative_to(ROOT) else json_path
    L: list[str] = []
    L += [
        "# igw benchmarks",
        "",
        "Generated by `python -m bench run` (`make bench`); quick CI variant `make bench-quick`. "
        "Every number below comes from one run on one machine; the raw data is in "
        f"[`{rel}`]({rel}) and the plot in [`bench/results/latency.png`](bench/results/latency.png).",
        "",
        "## How it is measured",
        "",
        "- **Rig**: everything on loopback on this machine: the bench's own fake OpenAI-compatible providers "
        "(`igw_dev.fakes`, aiohttp + uvloop; `d0` no delay, `d20` 20 ms, `flaky` 429 on 20 % of calls, `backup`), "
        "the whole gateway from `python -m services.cli.main up --ports auto --config <bench routing config>` "
        "(embedded Postgres with fsync on, ledger, keyvault, router, all mTLS), the LiteLLM proxy against the same "
        "fakes, and one load-generator process (`bench/loadgen.py`, grpc.aio / aiohttp on uvloop).",
        "- **igw path, at the defaults** (`igw`, `igw-hot`): every call is the full path: agent mTLS, a budget "
        "hold and a `KeyVault.IssueCredential` lease, provider call, `Ledger.Settle` (batched), the lease's end "
        "(`EndLeaseBatch`, batched). The hold is drawn from an adaptive budget slice (`Ledger.AcquireSlice`, the "
        "default: a quarter of what is free at most, none near the limit, where calls take per-call holds). "
        "Bench teams have a TOTAL budget of 10^15 nano-dollars, so budget enforcement is on. Access logs are left "
        "at their defaults (on)." + (f" Router worker processes: {results['options'].get('router_workers', 1)}."
                                      if results.get("options", {}).get("router_workers", 1) > 1 else ""),
        "- **igw with per-call holds (configured)** (`igw-percall`, `igw-hot-percall`): the same jobs through a "
        "second set of teams (`pc-t000`..., `pc-hot`, same budgets, their agent certs issued the same way) listed "
        "in the routing config's `budget_slices.per_call_teams` (" + _slices_cfg(results) + "): a "
        "`Ledger.Reserve` per call. Both run in the same ladders, interleaved per step.",
        "- **A team driven to its limit** (`limit`): one team at the defaults and one with per-call holds, each "
        "driven to its limit (N = 120; 20 with --quick): 0.6 N calls far from any limit with several in flight "
        "(100 calls/s against the 20 ms fake, so the defaults draw slices); then, slices still open, the limit is "
        "set to the spend so far plus 0.4 N calls' spend and half a call more, and the team is called 0.6 N "
        "times, one at a time, 10 calls/s (each settle lands before the next call): the defaults must never "
        "overspend and must serve as many calls near the limit as per-call holds (refused no earlier).",
        "- **Added latency** = gateway percentile - direct-to-fake percentile, same load generator, interleaved "
        "rounds (direct, igw, LiteLLM, rotating order), samples pooled over rounds. The direct call is HTTP/1.1 "
        "keep-alive (aiohttp); igw is gRPC over mTLS; LiteLLM is HTTP/1.1.",
        (
            "- **Quiet neighbours**: while one system is measured, the other's processes are suspended (SIGSTOP, "
            "resumed right after; for the direct floor, both are), so idle timers and background loops of one "
            "gateway do not tax the other on two shared cores. `--no-pause` turns this off."
            if results.get("options", {}).get("pause_others")
            else "- **Neighbours running**: both gateways stay up while either is measured (`--no-pause`)."
        ),
        "- **Open loop**: calls are sent on a fixed timetable whatever the answers, and latency is counted from "
        "the *scheduled* send time (no coordinated omission). Each ladder step runs direct, igw, "
        f"{PERCALL_NAME} and LiteLLM back to back at the same rate. A step passes with zero errors, achieved ≥ 95 % of offered and added "
        "p99 < 50 ms; a failing step is retried once (shared, noisy machine) and a system stops at its "
        "first confirmed failure. *Max sustained* = the highest passing rate.",
        "- **LiteLLM's workers**: the main ladders run LiteLLM with `--litellm-workers` (1 by default); the "
        "`rate-litellm-default` scenario restarts it at its own default (one worker per logical CPU) for a "
        f"ladder of its own, and the {BAR_RATIO:g}x bar is judged against the better of the two.",
        "- **Spend check**: every igw request id is set by the bench; after the run, `LedgerAdminService."
        "ListSpendEntries` must hold exactly one entry per call that answered OK, none lost, none duplicated, "
        "each charged to the calling agent's team (checked per system too: the defaults and per-call holds).",
        "- **CPU per call**: psutil user+system seconds of each process (Postgres: postmaster and backends) over "
        "a run, divided by the calls it served. `other tenants` is the machine's busy CPU not used by the "
        "processes under test (this machine is shared).",
        "",
    ]
    base = (results.get("rig") or {}).get("baseline")
    if base:
        L[-1:-1] = [
            f"- **Baseline** (`base`, `base-hot`; `--baseline`): {base.get('commit') or base.get('root')} from its own "
            "checkout and virtualenv, with its own Postgres, PKI and default settings, through the many-teams and "
            "hot-team ladders and at one call in flight, interleaved with the systems above (bench/baseline.py); "
            "its spend entries are not checked.",
        ]
    L += [
        "## Machine",
        "",
        f"- {m.get('cpu_model', '?')}, {m.get('usable_cpus', '?')} usable CPUs, {m.get('memory_gb', '?')} GB, "
        f"kernel {m.get('kernel', '?')}, Python {m.get('python', '?')}, grpcio {m.get('grpcio', '?')}, "
        f"governor {m.get('cpu_governor', '?')}",
        f"- git {m.get('git', '?')}, load average at start {m.get('loadavg_at_start')}",
        f"- run `{results.get('run_id')}` started {results.get('started')}, took {results.get('elapsed_s')} s",
        f"- command: `{results.get('command') or 'python -m bench run'}`",
        "",
    ]
    lit = _g(results, "rig", "litellm")
    if lit:
        L += [
            f"- LiteLLM {lit['version']}, {lit['workers']} worker(s), config sha256 `{lit['config_sha256'][:16]}`: "
            f"`{lit['command'].split('/')[-1]}`; env {lit['env']}",
            "",
        ]
    L += ["## Headline", ""]
    L += [*_bar_verdicts(h), ""]
    L += ["| | igw | LiteLLM | bar |", "|---|---|---|---|"]
    ia, la = h.get("igw_added_c1_ms") or {}, h.get("litellm_added_c1_ms") or {}
    L.append(
        f"| added p50 at one call in flight (ms) | {_f(ia.get('p50'))} | {_f(la.get('p50'))} | igw ≤ "
        f"{BAR_P50_SHARE:g} x LiteLLM {'✅' if h['bar']['added_p50_le_half_litellm'] else '❌'} |"
    )
    L.append(f"| added p99 at one call in flight (ms) | {_f(ia.get('p99'))} | {_f(la.get('p99'))} | |")
    sa = h.get("igw_percall_added_c1_ms")
    if sa:
        L.append(f"| same, **{PERCALL_NAME}**, one team (p50 / p99, ms) | {_f(sa.get('p50'))} / {_f(sa.get('p99'))} "
                 "| | |")
    L.append(
        f"| max sustained calls/s (added p99 < 50 ms, no errors; fake 20 ms, {results['options']['teams']} teams) "
        f"| {_f(h.get('igw_max_rps'), 0)} | {_f(h.get('litellm_max_rps'), 0)} "
        f"({_g(results, 'options', 'litellm_workers')} worker) | ratio {_f(h.get('ratio'))} |"
    )
    if h.get("litellm_default_max_rps") is not None:
        L.append(
            f"| same, LiteLLM at its default {h['litellm_default_workers']} workers (one per CPU) "
            f"| {_f(h.get('igw_max_rps'), 0)} | {_f(h.get('litellm_default_max_rps'), 0)} "
            f"| ratio {_f(h.get('ratio_default'))} |"
        )
    L.append(
        f"| igw / LiteLLM's best configuration measured | | | {_f(h.get('ratio_vs_best'))} ≥ {BAR_RATIO} "
        f"{'✅' if h['bar']['sustained_ge_3x_litellm'] else '❌'} |"
    )
    if h.get("igw_percall_max_rps") is not None:
        L.append(
            f"| max sustained calls/s, **{PERCALL_NAME}** (same job, the per-call teams) "
            f"| {_f(h.get('igw_percall_max_rps'), 0)} | {_f(h.get('litellm_max_rps'), 0)} "
            f"({_g(results, 'options', 'litellm_workers')} worker) | ratio {_f(h.get('ratio_percall'))} |"
        )
        if h.get("litellm_default_max_rps") is not None:
            L.append(
                f"| same, LiteLLM at its default {h['litellm_default_workers']} workers (one per CPU) "
                f"| {_f(h.get('igw_percall_max_rps'), 0)} | {_f(h.get('litellm_default_max_rps'), 0)} "
                f"| ratio {_f(h.get('ratio_percall_default'))} |"
            )
        L.append(
            f"| {PERCALL_NAME} / LiteLLM's best configuration measured | | | "
            f"{_f(h.get('ratio_percall_vs_best'))} ≥ {BAR_RATIO} "
            f"{'✅' if h['bar']['percall_sustained_ge_bar'] else '❌'} |"
        )
    L.append(
        f"| max sustained calls/s, one hot team (the defaults) | {_f(h.get('igw_hot_max_rps'), 0)} | "
        f"{_f(max([v for v in (h.get('litellm_max_rps'), h.get('litellm_default_max_rps')) if v] or [0]), 0)} "
        f"(best) | {_f(h.get('ratio_hot_vs_best'))} ≥ {BAR_RATIO} {'✅' if h['bar']['hot_sustained_ge_bar'] else '❌'} |"
    )
    if h.get("igw_hot_percall_max_rps") is not None:
        L.append(
            f"| max sustained calls/s, one hot team, {PERCALL_NAME} | {_f(h.get('igw_hot_percall_max_rps'), 0)} | | |"
        )
    for name, c in (h.get("cpu_ms_per_call") or {}).items():
        a, b = [s for s in c if s != "rate"]
        L.append(
            f"| CPU ms per call, router + ledger + vault + Postgres, {'many teams' if name == 'rate' else 'one hot team'}"
            f" at {c['rate']}/s: igw / {PERCALL_NAME} | {_f(c[a]['total'])} / {_f(c[b]['total'])} | | |"
        )
    it, lt = h.get("igw_added_ttft_ms") or {}, h.get("litellm_added_ttft_ms") or {}
    L.append(
        f"| added time to first token p50 / p99 (ms) | {_f(it.get('p50'))} / {_f(it.get('p99'))} | "
        f"{_f(lt.get('p50'))} / {_f(lt.get('p99'))} | |"
    )
    fb = h.get("igw_fallback_added_c1_ms") or {}
    L.append(f"| added p50 / p99 with the primary 429-ing 20 % (ms) | {_f(fb.get('p50'))} / {_f(fb.get('p99'))} | | |")
    lim = h.get("limit") or {}
    if lim.get("igw"):
        d, p = lim["igw"], lim["igw-percall"]
        L.append(
            f"| a team driven to its limit (busy far from it: {lim.get('slice_draws_busy', '-')} slice draws at "
            f"the defaults; then {d.get('near_calls', '-')} calls' spend + half a call left, one call at a time): "
            f"served / refused, the defaults vs per-call holds; overspent | {d['served']} / {d['refused']} vs "
            f"{p['served']} / {p['refused']}; {'yes' if d['overspent'] or p['overspent'] else 'no'} | | "
            f"{'✅' if lim.get('ok') else '❌'} |"
        )
    sc_ok = h["bar"]["spend_exact"]
    L.append(
        f"| spend entries == successes (no loss, no duplicate) | {'✅' if sc_ok else '❌' if sc_ok is False else '-'} | | |"
    )
    L.append(
        f"| fake's own ceiling (calls/s, as our load generator sees it) | {_f(h.get('fake_ceiling_rps'), 0)} | | "
        f"{'⚠ igw near it' if h['near_fake_ceiling'].get('igw') else ''} |"
    )
    L.append("")
    # c=1 detail
    for fake in ("d0", "d20"):
        e = _g(sc, "c1", fake)
        if not e:
            continue
        L += [
            f"### One call in flight, fake delay {fake[1:]} ms ({results['options']['c1_rounds']} interleaved rounds)",
            "",
            "| system | p50 | p90 | p99 | p99.9 | n |",
            "|---|---|---|---|---|---|",
        ]
        for s, p in e["pooled_ms"].items():
            L.append(_pct_row(s, p))
        for s, a in e.get("added_ms", {}).items():
            L.append(
                f"| **{s} added** | {_f(a.get('p50'))} | {_f(a.get('p90'))} | {_f(a.get('p99'))} | {_f(a.get('p99.9'))} | |"
            )
        L.append(
            "\nPer-round p50 (ms): "
            + "; ".join(f"{s} {', '.join(_f(x) for x in v)}" for s, v in e.get("round_p50s_ms", {}).items())
        )
        L.append("")
    # ladders
    for name, title in (
        ("rate", "Open-loop ladder, many teams (fake delay 20 ms)"),
        ("hot", "Open-loop ladder, one hot team (fake delay 20 ms)"),
        ("rate-litellm-default", "Open-loop ladder, LiteLLM at its default worker count (fake delay 20 ms)"),
    ):
        steps = _g(sc, name, "steps")
        if not steps:
            continue
        L += [
            f"### {title}",
            "",
            "| rate/s | system | achieved/s | p50 | p99 | p99.9 | added p99 | errors | pass | CPU ms/call (router / ledger / vault / postgres) | other tenants (cores) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for step in steps:
            for s, r in step["results"].items():
                lat = r.get("latency_ms", {})
                pr = r.get("procs", {})
                cpu = " / ".join(_f(_g(pr, p, "cpu_ms_per_call")) for p in ("router", "ledger", "keyvault", "postgres"))
                if s == "litellm":
                    cpu = f"litellm {_f(_g(pr, 'litellm', 'cpu_ms_per_call'))}"
                elif s == "direct":
                    cpu = f"fake {_f(_g(pr, 'fake-d20', 'cpu_ms_per_call'))}"
                L.append(
                    f"| {step['rate']} | {label(s)} | {_f(r.get('achieved_rps'), 0)} | {_f(lat.get('p50'))} | "
                    f"{_f(lat.get('p99'))} | {_f(lat.get('p99.9'))} | {_f(_g(r, 'added_ms', 'p99'))} | "
                    f"{sum(r.get('errors', {}).values())} | {'' if s == 'direct' else ('✅' if r.get('pass') else '❌ ' + str(r.get('why', '')))} | "
                    f"{cpu} | {_f(r.get('other_tenants_cores'))} |"
                )
        L.append(f"\nStopped: {_g(sc, name, 'stopped')}\n")
        mx = _g(sc, name, "max_sustained_rps") or {}
        if mx:
            L.append("Max sustained: " + "; ".join(f"{label(s)} {_f(v, 0)}/s" for s, v in mx.items()) + "\n")
    side = h.get("cpu_ms_per_call") or {}
    if side:
        L += [
            f"### CPU per call: igw (the defaults: adaptive slices) vs {PERCALL_NAME}",
            "",
            "At the highest ladder step both passed; psutil user+system ms per call served. The last column "
            "is the router's budget-slice counters over the same run (router-wide): calls served, holds drawn "
            "from a slice, and slices acquired / released (a slice retired by its draw window is released in "
            "the background, possibly while a later run is measured).",
            "",
            "| ladder | rate/s | system | router | ledger | vault | postgres | total | calls; slice draws, acquired / released |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, c in side.items():
            for s, v in c.items():
                if s == "rate":
                    continue
                L.append(
                    f"| {'many teams' if name == 'rate' else 'one hot team'} | {c['rate']} | {label(s)} | "
                    + " | ".join(_f(v[p]) for p in (*CPU_PROCS, "total"))
                    + f" | {_slice_counts(v)} |"
                )
        L.append("")
    L += baseline_mod.markdown(results)
    st = sc.get("stream")
    if st and "ttft_ms" in st:
        L += [
            "### Streaming: time to first token at one call in flight (fake delay 0)",
            "",
            "| system | p50 | p90 | p99 | p99.9 | n |",
            "|---|---|---|---|---|---|",
        ]
        for s, p in st["ttft_ms"].items():
            L.append(_pct_row(s, p))
        for s, a in st.get("added_ttft_ms", {}).items():
            L.append(
                f"| **{s} added** | {_f(a.get('p50'))} | {_f(a.get('p90'))} | {_f(a.get('p99'))} | {_f(a.get('p99.9'))} | |"
            )
        ol = st.get("open_loop", {})
        if ol:
            L.append(
                f"\nOpen loop at {ol['rate']}/s: "
                + "; ".join(
                    f"{s} TTFT p50 {_f(_g(r, 'ttft_ms', 'p50'))} p99 {_f(_g(r, 'ttft_ms', 'p99'))} ms, errors {sum(r['errors'].values())}"
                    for s, r in ol["results"].items()
                )
            )
        L.append("")
    fb = sc.get("fallback")
    if fb and "c1_pooled_ms" in fb:
        L += [
            "### Fallback: primary answers 429 to 20 % of calls (fake delay 0)",
            "",
            "| system | p50 | p90 | p99 | p99.9 | n |",
            "|---|---|---|---|---|---|",
        ]
        for s, p in fb["c1_pooled_ms"].items():
            L.append(_pct_row(s, p))
        served = fb.get("c1_served_by") or []
        if served:
            L.append(
                "\nServed by (first round, latency ms): "
                + "; ".join(
                    f"{prov}: n {p.get('n')} p50 {_f(p.get('p50'))} p99 {_f(p.get('p99'))}"
                    for prov, p in served[0].items()
                )
            )
        for item in fb.get("open_loop", []):
            r = item["igw-fallback"]
            served_txt = ", ".join(f"{k}: {v.get('n')}" for k, v in (r.get("by_provider") or {}).items())
            L.append(
                f"\nOpen loop {item['rate']}/s: igw-fallback p50 {_f(_g(r, 'latency_ms', 'p50'))} p99 "
                f"{_f(_g(r, 'latency_ms', 'p99'))} (added p99 {_f(_g(r, 'added_ms', 'p99'))}), errors "
                f"{sum(r['errors'].values())}, served by {served_txt}"
            )
        L.append("")
    spend = results.get("spend_check")
    if spend:
        L += [
            "### Spend entries",
            "",
            "| scenario | calls answered OK | spend entries | lost | duplicated | unexpected |",
            "|---|---|---|---|---|---|",
        ]
        for k, v in spend.items():
            L.append(
                f"| {k} | {v['successes']} | {v['entries']} | {v['lost']} | {v['duplicated']} | {v['unexpected']} |"
            )
            for s, sv in (v.get("systems") or {}).items():
                L.append(
                    f"| {k}: {label(s)} | {sv['successes']} | {sv['entries']} | {sv['lost']} | {sv['duplicated']} "
                    f"| {sv['unexpected']} |"
                )
        L.append("")
    rss = results.get("rss_end")
    if rss:
        L += ["### Memory (RSS at the end of the run, MB)", "", "| process | RSS MB | processes |", "|---|---|---|"]
        for k, v in rss.items():
            L.append(f"| {k} | {_f(v.get('rss_mb'), 1)} | {v.get('procs')} |")
        L.append("")
    prof = results.get("profile")
    if prof and prof.get("services"):
        L += [f"### Profile (py-spy, {prof['duration_s']} s at {prof['rate']:.0f} calls/s, non-idle samples)", ""]
        for svc, p in prof["services"].items():
            if "error" in p:
                L.append(f"- {svc}: {p['error'][:200]}")
                continue
            L += [f"**{svc}** ({p['total_samples']} samples), top self time:", "", "| function | % |", "|---|---|"]
            for row in p["self"][:10]:
                L.append(f"| `{row['function'][:110]}` | {row['pct']} |")
            L.append("")
    if results.get("notes"):
        L += ["### Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    if PLOT.exists():
        L += ["## Plot", "", "![added latency and throughput vs p99](bench/results/latency.png)", ""]
    if EDGE.exists():
        # Written from the last run with the `edge` scenario: kept across runs.
        L += ["<!-- edge:start -->", EDGE.read_text().rstrip(), "<!-- edge:end -->", ""]
    if ANALYSIS.exists():
        # Hand-written: what changed between runs and what holds the bar back (kept across runs).
        L += [ANALYSIS.read_text().rstrip(), ""]
    if LEDGER_SCALE.exists():
        # Written by `python -m bench ledger-scale` (a separate, much longer run): kept across runs.
        L += ["<!-- ledger-scale:start -->", LEDGER_SCALE.read_text().rstrip(), "<!-- ledger-scale:end -->", ""]
    return "\n".join(L)


def write_markdown(results: dict[str, Any], json_path: Path) -> Path:
    try:
        plot(results)
    except Exception as err:
        results.setdefault("notes", []).append(f"plot failed: {err!r}")
    MARKDOWN.write_text(markdown(results, json_path))
    return MARKDOWN

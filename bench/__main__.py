"""``python -m bench run [--quick] [--scenarios ...] [--litellm/--no-litellm]``: the igw benchmark.

``python -m bench ledger-scale [--steps N ...]``: the spend ledger at 10^7+ entries (bench/ledger_scale.py).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from bench import report
from bench.scenarios import ALL_SCENARIOS, Options, run


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description="igw overhead and throughput benchmark")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="start everything on loopback, measure, write results and BENCHMARKS.md")
    r.add_argument("--quick", action="store_true", help="CI smoke: < 60 s, small rates, no LiteLLM by default")
    r.add_argument(
        "--scenarios",
        nargs="+",
        choices=ALL_SCENARIOS,
        default=None,
        help=f"subset to run (default: all: {' '.join(ALL_SCENARIOS)})",
    )
    r.add_argument("--litellm", dest="litellm", action="store_true", default=None, help="run LiteLLM side by side")
    r.add_argument("--no-litellm", dest="litellm", action="store_false")
    r.add_argument("--litellm-workers", type=int, default=1, help="LiteLLM proxy workers (default 1)")
    r.add_argument(
        "--profile",
        dest="profile",
        action="store_true",
        default=None,
        help="py-spy the services under load at the end (default for full runs)",
    )
    r.add_argument("--no-profile", dest="profile", action="store_false")
    r.add_argument(
        "--no-pause",
        dest="pause_others",
        action="store_false",
        help="keep the other system running while one is measured (default: suspend it)",
    )
    r.add_argument("--rates", type=int, nargs="+", default=None, help="open-loop ladder (calls/s)")
    r.add_argument("--teams", type=int, default=None, help="teams in the many-teams scenario (default 100)")
    r.add_argument("--step-seconds", type=float, default=None, help="seconds per open-loop step")
    r.add_argument("--c1-n", type=int, default=None, help="calls per one-at-a-time series")
    r.add_argument("--router-workers", type=int, default=1,
                   help="router worker processes on one port (igw up --router-workers; default 1)")
    r.add_argument("--baseline", default=None, type=Path,
                   help="another checkout (e.g. a git worktree of an older commit) to run next to this one, "
                        "as the systems base and base-hot (bench/baseline.py)")
    r.add_argument("--baseline-python", default="",
                   help="the python of the baseline's own virtualenv (default: this one)")
    r.add_argument("--out", default=None, help="results JSON (default bench/results/<timestamp>.json)")
    r.add_argument(
        "--markdown",
        dest="markdown",
        action="store_true",
        default=None,
        help="rewrite BENCHMARKS.md and the plot (default for full runs)",
    )
    r.add_argument("--no-markdown", dest="markdown", action="store_false", help="JSON only (default for --quick)")
    r.add_argument("--keep-state", action="store_true", help="keep the temporary state dir (logs, profiles)")
    w = sub.add_parser("report", help="rewrite BENCHMARKS.md and the plot from a saved results JSON (no measuring)")
    w.add_argument("results", help="a results JSON written by `run`, e.g. bench/results/<timestamp>.json")
    return p.parse_args(argv)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the rig's cleanup (resume, stop, remove)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    rest = sys.argv[1:] if argv is None else argv
    if rest and rest[0] == "ledger-scale":
        from bench import ledger_scale

        return ledger_scale.main(rest[1:])
    args = _parse(argv)
    if args.cmd == "report":
        path = Path(args.results)
        saved = json.loads(path.read_text())
        print(f"summary: {report.write_markdown(saved, path)}", file=sys.stderr)
        print(report.summary_text(saved))
        return 0
    quick = bool(args.quick)
    scenarios = (
        tuple(args.scenarios)
        if args.scenarios
        else (("ceiling", "c1", "rate", "hot", "limit", "stream", "fallback") if quick else ALL_SCENARIOS)
    )
    litellm = (not quick) if args.litellm is None else bool(args.litellm)
    profile = (not quick) if args.profile is None else bool(args.profile)
    opts = Options(
        quick=quick,
        scenarios=scenarios,
        litellm=litellm,
        litellm_workers=args.litellm_workers,
        pause_others=args.pause_others,
        profile=profile,
        teams=args.teams or (10 if quick else 100),
        keep_state=args.keep_state,
        rates=tuple(args.rates or ()),
        step_override=args.step_seconds,
        c1_n_override=args.c1_n,
        router_workers=args.router_workers,
        baseline_dir=args.baseline.resolve() if args.baseline else None,
        baseline_python=args.baseline_python,
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    results = run(opts)
    results["command"] = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    out = (
        Path(args.out)
        if args.out
        else report.RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}{'-quick' if quick else ''}.json"
    )
    path = report.write_json(results, out)
    print(f"raw results: {path}", file=sys.stderr)
    if isinstance(results["scenarios"].get("edge"), dict) and "c1" in results["scenarios"]["edge"]:
        from bench import edge_bench

        print(f"edge summary: {edge_bench.write_markdown(results, path)}", file=sys.stderr)
    if (not quick) if args.markdown is None else args.markdown:
        md = report.write_markdown(results, path)
        print(f"summary: {md}", file=sys.stderr)
    print(report.summary_text(results))
    return 0 if report.healthy(results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""`igw metrics plot`: drive a scripted mix of calls through a running gateway, scrape every
service's /metrics once a second, and render what the metrics say as one PNG.

Grafana does not run everywhere; this picture (docs/metrics.png in the README) is made from
the same counters and histograms the dashboard in deploy/grafana plots.
"""

from __future__ import annotations

import argparse
import re
import threading
import time
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path

import grpc

from igw.router.v1 import router_pb2, router_pb2_grpc
from services.cli.parsing import SubParsers
from services.cli.session import Session

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Series:
    """One /metrics page as {(name, labels): value}."""
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback URLs from the endpoints file
        text = resp.read().decode()
    out: Series = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            out[(m.group(1), tuple(sorted(_LABEL.findall(m.group(2) or ""))))] = float(m.group(3))
    return out


def total(series: Series, name: str, by: str | None = None, **match: str) -> dict[str, float]:
    """Sum of samples named ``name`` matching ``match``, grouped by label ``by``."""
    acc: dict[str, float] = defaultdict(float)
    for (n, labels), v in series.items():
        if n != name:
            continue
        lab = dict(labels)
        if all(lab.get(k) == val for k, val in match.items()):
            acc[lab.get(by, "") if by else ""] += v
    return acc


def _traffic(session: Session, seconds: float, stop: threading.Event) -> None:
    ch = session.channel("router", role="agent")
    stub = router_pb2_grpc.RouterServiceStub(ch)
    mix = ["fast", "fast", "smart", "cheapest", "flaky"]
    i = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end and not stop.is_set():
        alias = mix[i % len(mix)]
        req = router_pb2.GenerateRequest(model=alias, max_output_tokens=64, request_id=f"plot-{uuid.uuid4().hex}")
        req.messages.add(role=router_pb2.ROLE_USER).parts.add(text=f"metrics demo call number {i} " * (1 + i % 7))
        try:
            if i % 4 == 0:
                for _ in stub.GenerateStream(req, timeout=10):
                    pass
            else:
                stub.Generate(req, timeout=10)
        except grpc.RpcError:
            pass
        i += 1
        time.sleep(0.05)


def cmd_metrics_plot(args: argparse.Namespace) -> int:
    """Runs the traffic, samples /metrics, writes the PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    session = Session(args)
    urls = dict(session.endpoints().metrics)
    stop = threading.Event()
    worker = threading.Thread(target=_traffic, args=(session, args.seconds, stop), daemon=True)
    worker.start()
    frames: list[tuple[float, Series]] = []
    t0 = time.monotonic()
    while worker.is_alive():
        merged: Series = {}
        for url in urls.values():
            merged.update(scrape(url))
        frames.append((time.monotonic() - t0, merged))
        time.sleep(1.0)
    stop.set()
    session.close()
    if len(frames) < 3:
        print("error: too few samples; run longer (--seconds)")
        return 1

    ts = [t for t, _ in frames]

    def rate(name: str, by: str, **match: str) -> dict[str, list[float]]:
        keys = sorted({k for _, s in frames for k in total(s, name, by, **match)})
        out: dict[str, list[float]] = {}
        for k in keys:
            vals = [total(s, name, by, **match).get(k, 0.0) for _, s in frames]
            out[k] = [0.0] + [(b - a) / max(t2 - t1, 1e-6) for a, b, t1, t2 in zip(vals, vals[1:], ts, ts[1:])]
        return out

    def cumulative(name: str, by: str, scale: float = 1.0, **match: str) -> dict[str, list[float]]:
        keys = sorted({k for _, s in frames for k in total(s, name, by, **match)})
        return {k: [total(s, name, by, **match).get(k, 0.0) * scale for _, s in frames] for k in keys}

    def mean_latency(name: str, by: str) -> dict[str, list[float]]:
        sums, counts = rate(name + "_sum", by), rate(name + "_count", by)
        return {k: [1000 * s / c if c else 0.0 for s, c in zip(sums[k], counts.get(k, []))] for k in sums}

    panels = [
        ("Agent calls/s by alias and code", rate("igw_router_calls_total", "alias"), "calls/s"),
        ("Upstream latency (mean, ms) by provider", mean_latency("igw_router_upstream_seconds", "provider"), "ms"),
        ("Tokens (cumulative) by provider", cumulative("igw_router_tokens_total", "provider"), "tokens"),
        ("Spend (cumulative, $) by team", cumulative("igw_router_cost_nanodollars_total", "team", 1e-9), "$"),
        ("Fallbacks (cumulative) by reason", cumulative("igw_router_fallbacks_total", "reason"), "count"),
        ("Leases issued/s by provider", rate("igw_keyvault_leases_issued_total", "provider"), "leases/s"),
    ]
    fig, axes = plt.subplots(3, 2, figsize=(13, 10))
    for ax, (title, series, unit) in zip(axes.flat, panels):
        for label, values in series.items():
            ax.plot(ts, values, label=label or "all")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("seconds")
        ax.set_ylabel(unit)
        if series:
            ax.legend(fontsize=7)
    fig.suptitle("igw: what /metrics said during a scripted run (router, keyvault, ledger)")
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    print(out)
    return 0


def register(sub: SubParsers, parent: argparse.ArgumentParser) -> None:
    """Adds `igw metrics plot`."""
    metrics = sub.add_parser("metrics", help="metrics of a running gateway")
    msub = metrics.add_subparsers(dest="metrics_command", required=True, metavar="{plot}")
    plot = msub.add_parser("plot", parents=[parent], help="drive demo traffic and render /metrics as a PNG")
    plot.add_argument("--seconds", type=float, default=20.0, help="how long to drive traffic (default 20)")
    plot.add_argument("--out", default="docs/metrics.png", help="where to write the PNG")
    plot.set_defaults(func=cmd_metrics_plot)

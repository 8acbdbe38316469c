"""The metrics every service's server exports, on the service's own registry.

Per-method RPC counts, latency and calls in flight (:class:`RpcMetrics`, fed by the guard),
the presented certificate's expiry, ``process_*``, ``python_info``,
``igw_build_info{version,commit}`` and ``igw_ready``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from prometheus_client import (
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)

from services.common.pki import describe_cert

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def cert_not_after(path: os.PathLike[str] | str) -> float:
    """The certificate's notAfter as Unix time (0 when the file cannot be read: the alert then fires)."""
    try:
        with open(path, "rb") as fh:
            return describe_cert(fh.read()).not_after.timestamp()
    except (OSError, ValueError):
        return 0.0


@dataclass
class RpcMetrics:
    """Per-method request counts and latency, on the service's own registry."""

    registry: CollectorRegistry
    handled: Counter = field(init=False)
    latency: Histogram = field(init=False)
    in_flight: Gauge = field(init=False)
    cert_expiry: Gauge = field(init=False)

    def __post_init__(self) -> None:
        # For the certificate-expiry alert (deploy/prometheus): read from the file at each scrape, so a
        # rotated certificate shows at once.
        self.cert_expiry = Gauge(
            "igw_tls_cert_expiry_timestamp_seconds", "notAfter of the certificate the service presents (Unix time).",
            ["service"], registry=self.registry,
        )
        self.handled = Counter(
            "igw_grpc_server_handled",
            "gRPC calls handled, by method and status code.",
            ["service", "method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "igw_grpc_server_handling_seconds",
            "Time to handle a gRPC call, by method and status code.",
            ["service", "method", "code"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "igw_grpc_server_in_flight", "gRPC calls being handled now.", ["service"], registry=self.registry
        )


def build_info() -> tuple[str, str]:
    """(version, commit) of this build: the package version, and IGW_BUILD_COMMIT or the git HEAD."""
    try:
        version = metadata.version("igw")
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    commit = os.environ.get("IGW_BUILD_COMMIT", "").strip()
    if not commit:
        git = Path(__file__).resolve().parents[2] / ".git"
        try:
            if git.is_file():  # a worktree: "gitdir: <path>"
                git = Path(git.read_text().split(":", 1)[1].strip())
            head = (git / "HEAD").read_text().strip()
            if head.startswith("ref:"):
                ref = head.split(":", 1)[1].strip()
                ref_file = git / ref
                if not ref_file.exists():
                    common = git / "commondir"
                    base = (git / common.read_text().strip()) if common.exists() else git
                    ref_file = base / ref
                    if not ref_file.exists():
                        packed = (base / "packed-refs").read_text().splitlines()
                        head = next((ln.split()[0] for ln in packed if ln.endswith(" " + ref)), "")
                    else:
                        head = ref_file.read_text().strip()
                else:
                    head = ref_file.read_text().strip()
            commit = head[:12]
        except (OSError, IndexError):
            commit = ""
    return version, commit or "unknown"


def add_standard_metrics(registry: CollectorRegistry, service: str) -> Gauge:
    """``process_*``, ``python_info`` and ``igw_build_info{version,commit}`` on ``registry``;
    returns the ``igw_ready`` gauge."""
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR):
        with contextlib.suppress(ValueError):  # already registered
            registry.register(collector)
    version, commit = build_info()
    info = Gauge("igw_build_info", "The running build (value 1).", ["service", "version", "commit"],
                 registry=registry)
    info.labels(service, version, commit).set(1)
    return Gauge("igw_ready", "1 while the readiness health status is SERVING.", registry=registry)

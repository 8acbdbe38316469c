"""Operator commands on the router: its config and deployments."""

from __future__ import annotations

import argparse

from igw.router.v1 import router_pb2, router_pb2_grpc
from services.cli.admin_common import (
    _enum_name,
)
from services.cli.output import (
    format_duration,
    format_timestamp,
    print_json,
    print_table,
)
from services.cli.session import Session

# --------------------------------------------------------------------------- router admin


def _router_admin(session: Session) -> router_pb2_grpc.RouterAdminServiceStub:
    return router_pb2_grpc.RouterAdminServiceStub(session.channel("router"))  # type: ignore[no-untyped-call]


def cmd_config_show(args: argparse.Namespace) -> int:
    """`igw config show`."""
    session = Session(args)
    cfg = _router_admin(session).GetConfig(router_pb2.GetConfigRequest(), timeout=session.timeout)
    if session.json:
        print_json(cfg)
        return 0
    rows = [
        ("sha256", cfg.sha256),
        ("pinned", cfg.pinned_sha256 or "-"),
        ("source", cfg.source),
        ("loaded", format_timestamp(cfg.load_time)),
        ("providers", ", ".join(cfg.providers)),
        ("deployments", ", ".join(cfg.deployments)),
        ("aliases", ", ".join(cfg.aliases)),
        ("last reload", f"FAILED: {cfg.last_reload_error}" if cfg.last_reload_error else "ok"),
    ]
    print_table(["field", "value"], rows)
    return 0


def cmd_config_reload(args: argparse.Namespace) -> int:
    """`igw config reload` (a bad file is an error; the old config stays)."""
    session = Session(args)
    response = _router_admin(session).ReloadConfig(router_pb2.ReloadConfigRequest(), timeout=session.timeout)
    if session.json:
        print_json(response)
    elif response.changed:
        print(f"config reloaded: {response.previous_sha256[:12]} -> {response.sha256[:12]}")
    else:
        print(f"config unchanged: {response.sha256[:12]}")
    return 0


def cmd_deployments(args: argparse.Namespace) -> int:
    """`igw deployments`: each deployment with its circuit-breaker state."""
    session = Session(args)
    response = _router_admin(session).ListDeployments(router_pb2.ListDeploymentsRequest(), timeout=session.timeout)
    if session.json:
        print_json(response)
        return 0
    rows = [
        (
            d.name,
            d.provider,
            d.provider_model,
            _enum_name(router_pb2.BreakerState, d.breaker_state, "BREAKER_STATE_"),
            str(d.consecutive_failures),
            format_timestamp(d.open_until),
            str(d.in_flight),
            format_duration(d.observed_latency),
        )
        for d in response.deployments
    ]
    print_table(
        ["name", "provider", "model", "breaker", "failures", "open until", "in flight", "latency"],
        rows,
        empty="no deployments",
    )
    return 0

"""The shipped alert rules (deploy/prometheus/igw-rules.yaml, and the PrometheusRule built from it).

1. Every metric a rule reads is exported by the running services: a real scrape of router, keyvault and
   ledger from `igw up` (real processes), and every label a rule groups by is on that metric.
2. Each rule fires on the series that describe its incident and stays quiet on the healthy ones,
   evaluated with tests/e2e/promql_eval.py (promtool is not available here), honouring `for:`.
3. The PrometheusRule in deploy/k8s/base is the same rules, generated (deploy/prometheus/build_rules.py).
"""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import Gateway
from tests.e2e.promql_eval import Evaluator, Series, sample_every, selector_names, series

ROOT = Path(__file__).resolve().parents[2]
RULES = yaml.safe_load((ROOT / "deploy/prometheus/igw-rules.yaml").read_text())["groups"]
ALL = {r["alert"]: r for g in RULES for r in g["rules"]}
T = 7200.0  # evaluation time; series start at 0
STEP = 15.0
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "info": ("_info",), "summary": ("_sum", "_count", "")}


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return float(text[:-1]) * units[text[-1]]


def fires(rule: dict[str, Any], data: list[Series]) -> list[dict[str, str]]:
    """The alerts a rule raises at T: its expression is non-empty at every step of its `for` window."""
    ev = Evaluator(data)
    hold = _duration(rule["for"]) if "for" in rule else 0.0
    t, result = T - hold, ev.query(rule["expr"], T)
    assert isinstance(result, dict)
    while t < T:
        step = ev.query(rule["expr"], t)
        assert isinstance(step, dict)
        if not step:
            return []
        t += STEP
    return [dict(k) for k in result]


def c(name: str, labels: dict[str, str], value: Callable[[float], float]) -> Series:
    return series(name, {"job": "igw", "instance": "10.0.0.1:9101", **labels}, sample_every(0, T, STEP, value))


def at(t0: float, v0: float, v1: float) -> Callable[[float], float]:
    """v0 before t0, v1 from t0 on."""
    return lambda t: v0 if t < t0 else v1


SCENARIOS: dict[str, tuple[list[Series], list[list[Series]], dict[str, str]]] = {
    # alert: (firing series, [quiet series sets], labels the firing alert carries)
    "IgwSoftLimitCrossed": (
        [c("igw_ledger_soft_limit_crossings_total", {"team": "demo"}, at(T - 300, 0, 1))],
        [[c("igw_ledger_soft_limit_crossings_total", {"team": "demo"}, at(1000, 0, 1))]],
        {"team": "demo"}),
    "IgwHardLimitReached": (
        [c("igw_ledger_budget_denials_total", {"team": "demo"}, lambda t: t // 60)],
        [[c("igw_ledger_budget_denials_total", {"team": "demo"}, lambda t: 3.0)]],
        {"team": "demo"}),
    "IgwHoldsCaptured": (
        [c("igw_ledger_holds_captured_total", {}, at(T - 120, 2, 5))],
        [[c("igw_ledger_holds_captured_total", {}, lambda t: 2.0)]],
        {}),
    "IgwSettleBacklogGrowing": (
        [c("igw_router_settles_pending", {}, lambda t: max(0.0, (t - (T - 900)) / 2))],
        [[c("igw_router_settles_pending", {}, lambda t: 80.0)],  # large but not growing
         [c("igw_router_settles_pending", {}, lambda t: max(0.0, (t - (T - 120)) / 2))],  # growing, small, recent
         [c("igw_router_settles_pending", {}, lambda t: (t % 60) / 10)]],
        {"instance": "10.0.0.1:9101"}),
    "IgwBreakerOpen": (
        [c("igw_router_breaker_state", {"deployment": "gpt-4o-mini"}, at(T - 600, 0, 1)),
         c("igw_router_breaker_state", {"deployment": "claude", "instance": "10.0.0.2:9101"}, lambda t: 0.0)],
        [[c("igw_router_breaker_state", {"deployment": "gpt-4o-mini"}, at(T - 60, 0, 1))],  # open for a minute
         [c("igw_router_breaker_state", {"deployment": "gpt-4o-mini"}, lambda t: 2.0)]],  # half-open
        {"deployment": "gpt-4o-mini"}),
    "IgwRouterConfigDigestMismatch": (
        [c("igw_router_config_info", {"sha256": "a" * 64, "instance": "r1"}, lambda t: 1.0),
         c("igw_router_config_info", {"sha256": "b" * 64, "instance": "r2"}, lambda t: 1.0)],
        [[c("igw_router_config_info", {"sha256": "a" * 64, "instance": "r1"}, lambda t: 1.0),
          c("igw_router_config_info", {"sha256": "a" * 64, "instance": "r2"}, lambda t: 1.0)],
         # a rollout: r2 moved to b two minutes ago, its old series went stale
         [c("igw_router_config_info", {"sha256": "b" * 64, "instance": "r1"}, lambda t: 1.0),
          series("igw_router_config_info", {"sha256": "a" * 64, "instance": "r2"}, sample_every(0, T - 600, STEP,
                 lambda t: 1.0)),
          series("igw_router_config_info", {"sha256": "b" * 64, "instance": "r2"}, sample_every(T - 600, T, STEP,
                 lambda t: 1.0))]],
        {}),
    "IgwVaultAuditHeadStalled": (
        [c("igw_keyvault_leases_issued_total", {"provider": "openai"}, lambda t: t // 30),
         c("igw_keyvault_audit_head_sequence", {}, at(T - 1200, 10, 500))],
        [[c("igw_keyvault_leases_issued_total", {"provider": "openai"}, lambda t: t // 30),
          c("igw_keyvault_audit_head_sequence", {}, lambda t: t // 30)],
         [c("igw_keyvault_leases_issued_total", {"provider": "openai"}, lambda t: 7.0),  # idle vault
          c("igw_keyvault_audit_head_sequence", {}, lambda t: 500.0)]],
        {}),
    "IgwVaultAuditVerifyFailed": (
        [c("igw_keyvault_audit_verify_failures_total", {}, at(T - 600, 0, 1)),
         c("igw_keyvault_audit_write_failures_total", {}, lambda t: 0.0),
         c("igw_keyvault_integrity_failures_total", {}, lambda t: 0.0)],
        [[c("igw_keyvault_audit_verify_failures_total", {}, lambda t: 0.0),
          c("igw_keyvault_audit_write_failures_total", {}, lambda t: 0.0),
          c("igw_keyvault_integrity_failures_total", {}, lambda t: 0.0)]],
        {}),
    "IgwReadinessFlapping": (
        [c("igw_ready", {"job": "igw-ledger"}, lambda t: float(int(t // 60) % 2))],
        [[c("igw_ready", {"job": "igw-ledger"}, lambda t: 1.0)],
         [c("igw_ready", {"job": "igw-ledger"}, at(T - 300, 1, 0))]],  # went down once: not flapping
        {"job": "igw-ledger"}),
    "IgwCertificateExpiringSoon": (
        [c("igw_tls_cert_expiry_timestamp_seconds", {"service": "router"}, lambda t: T + 3 * 86400)],
        [[c("igw_tls_cert_expiry_timestamp_seconds", {"service": "router"}, lambda t: T + 30 * 86400)]],
        {"service": "router"}),
}

REQUIRED = set(SCENARIOS)


def test_the_rules_cover_every_incident_and_each_has_a_scenario() -> None:
    assert set(ALL) == REQUIRED
    for rule in ALL.values():
        assert rule["labels"]["severity"] in ("info", "warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


@pytest.mark.parametrize("alert", sorted(REQUIRED))
def test_rule_fires_on_its_incident_and_not_otherwise(alert: str) -> None:
    firing, quiet_sets, expected_labels = SCENARIOS[alert]
    raised = fires(ALL[alert], firing)
    assert raised, f"{alert} did not fire"
    assert any(expected_labels.items() <= labels.items() for labels in raised), raised
    for quiet in quiet_sets:
        assert fires(ALL[alert], quiet) == [], f"{alert} fired on healthy series"
    # Without any series (a fresh deployment), nothing fires either.
    assert fires(ALL[alert], []) == []


SAMPLED: set[str] = set()  # sample names that had at least one sample in a scrape


def scrape(url: str) -> dict[str, tuple[str, set[str]]]:
    """Sample name -> (family type, label names seen)."""
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict[str, tuple[str, set[str]]] = {}
    for fam in text_string_to_metric_families(body):
        for suffix in SUFFIXES.get(fam.type, ("",)):
            out.setdefault(fam.name + suffix, (fam.type, set()))
        for s in fam.samples:
            out.setdefault(s.name, (fam.type, set()))[1].update(s.labels)
            SAMPLED.add(s.name)
    return out


def test_every_metric_the_rules_read_is_exported(gateway: Gateway) -> None:
    exported: dict[str, tuple[str, set[str]]] = {}
    for service in ("router", "keyvault", "ledger"):
        exported.update(scrape(gateway.endpoints["metrics"][service]))  # type: ignore[index]
    # A few always carry samples: the scrape is real and the new gauges are live.
    for live in ("igw_ready", "igw_tls_cert_expiry_timestamp_seconds", "igw_router_settles_pending",
                 "igw_router_config_info", "process_resident_memory_bytes"):
        assert live in SAMPLED, live
    for rule in ALL.values():
        for name in selector_names(rule["expr"]):
            assert name in exported, f"{rule['alert']} reads {name}, which no service exports"
            kind, labels = exported[name]
            if name.endswith("_total"):
                assert kind == "counter", (name, kind)
            for scenario_series in SCENARIOS[rule["alert"]][0]:
                if scenario_series.labels["__name__"] == name and labels:
                    extra = set(scenario_series.labels) - labels - {"__name__", "job", "instance"}
                    assert not extra, f"{rule['alert']}: {name} has no label(s) {extra} in a real scrape"


def test_the_prometheusrule_is_generated_from_the_rules_file() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_rules", ROOT / "deploy/prometheus/build_rules.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    committed = yaml.safe_load((ROOT / "deploy/k8s/base/prometheusrule.yaml").read_text())
    assert committed == mod.prometheus_rule(), "run `make deploy-rules`"


def test_dashboard_queries_parse_and_read_exported_series(gateway: Gateway) -> None:
    import json
    import re

    import promql_parser

    dashboard = json.loads((ROOT / "deploy/grafana/igw-dashboard.json").read_text())
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"job", "instance", "team", "database"} <= variables
    exported: dict[str, tuple[str, set[str]]] = {}
    for service in ("router", "keyvault", "ledger"):
        exported.update(scrape(gateway.endpoints["metrics"][service]))  # type: ignore[index]
    titles = [p["title"] for p in dashboard["panels"]]
    assert any(t.startswith("Process") for t in titles) and any(t.startswith("Postgres") for t in titles)
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for var in re.findall(r"\$(\w+)", expr):
                assert var in variables, (panel["title"], var)
            concrete = re.sub(r"\$\w+", ".*", expr)
            names = selector_names(concrete)  # parses, or raises
            promql_parser.parse(concrete)
            for name in names:
                if name.startswith(("igw_", "process_")):
                    assert name in exported, f"{panel['title']}: {name} is not exported"
                    assert 'job=~".*"' in concrete and 'instance=~".*"' in concrete, panel["title"]
                    labels = exported[name][1]
                    if 'team=~".*"' in concrete and labels:
                        assert "team" in labels, f"{panel['title']}: {name} has no team label"
                else:
                    assert name.startswith("pg_"), name

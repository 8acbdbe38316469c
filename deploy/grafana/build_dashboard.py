"""Writes deploy/grafana/igw-dashboard.json (run: python deploy/grafana/build_dashboard.py).

Variables: job, instance and team narrow every igw panel (the builder adds the label matchers to each
igw_* and process_* selector; team only where the metric carries a team); database narrows the Postgres
panels, which read postgres_exporter's pg_* series (CloudNativePG exports the same names).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

Query = tuple[str, str]  # (PromQL, legend)
PANELS: list[tuple[str, str | list[Query], str, str]] = [
    # (title, PromQL, legend, unit), or (title, [(PromQL, legend), ...], "", unit) for several lines
    ("Calls per second by method and code",
     "sum by (service, method, code) (rate(igw_grpc_server_handled_total[1m]))", "{{method}} {{code}}", "reqps"),
    ("gRPC latency p50 / p99 by method",
     [("histogram_quantile(0.5, sum by (le, method) (rate(igw_grpc_server_handling_seconds_bucket[5m])))",
       "p50 {{method}}"),
      ("histogram_quantile(0.99, sum by (le, method) (rate(igw_grpc_server_handling_seconds_bucket[5m])))",
       "p99 {{method}}")], "", "s"),
    ("Agent calls by model alias and code",
     "sum by (alias, code) (rate(igw_router_calls_total[1m]))", "{{alias}} {{code}}", "reqps"),
    ("Upstream latency p99 by provider and model",
     "histogram_quantile(0.99, sum by (le, provider, model) (rate(igw_router_upstream_seconds_bucket[5m])))",
     "{{provider}} {{model}}", "s"),
    ("Time to first token p50 by provider and model",
     "histogram_quantile(0.5, sum by (le, provider, model) "
     "(rate(igw_router_time_to_first_token_seconds_bucket[5m])))", "{{provider}} {{model}}", "s"),
    ("Tokens per second by provider, model and kind",
     "sum by (provider, model, kind) (rate(igw_router_tokens_total[5m]))", "{{provider}} {{model}} {{kind}}", "short"),
    ("Spend (USD per hour) by team",
     "sum by (team) (rate(igw_router_cost_nanodollars_total[1h])) * 3600 / 1e9", "{{team}}", "currencyUSD"),
    ("Fallbacks by reason", "sum by (reason) (rate(igw_router_fallbacks_total[5m]))", "{{reason}}", "ops"),
    ("Retries by reason", "sum by (reason) (rate(igw_router_retries_total[5m]))", "{{reason}}", "ops"),
    ("Circuit breakers (0 closed, 1 open, 2 half-open)", "max by (deployment) (igw_router_breaker_state)",
     "{{deployment}}", "short"),
    ("Budget denials by team", "sum by (team) (rate(igw_router_budget_denials_total[5m]))", "{{team}}", "ops"),
    ("Remaining budget by team (USD)", "min by (team) (igw_ledger_remaining_budget_nanodollars) / 1e9", "{{team}}",
     "currencyUSD"),
    ("Soft-limit crossings by team", "sum by (team) (increase(igw_ledger_soft_limit_crossings_total[1h]))",
     "{{team}}", "short"),
    ("Leases issued / denied by provider",
     [("sum by (provider) (rate(igw_keyvault_leases_issued_total[5m]))", "issued {{provider}}"),
      ("sum by (provider, reason) (rate(igw_keyvault_leases_denied_total[5m]))", "denied {{provider}} {{reason}}")],
     "", "ops"),
    ("Audit write latency p99",
     "histogram_quantile(0.99, sum by (le) (rate(igw_keyvault_audit_write_seconds_bucket[5m])))", "p99", "s"),
    ("In-flight calls", "sum by (service) (igw_grpc_server_in_flight)", "{{service}}", "short"),
    ("Routing config digest", "max by (sha256) (igw_router_config_info)", "{{sha256}}", "short"),
    ("Settles pending (router)", "sum by (instance) (igw_router_settles_pending)", "{{instance}}", "short"),
    ("Ready (1) per instance", "min by (job, instance) (igw_ready)", "{{job}} {{instance}}", "short"),
    ("Certificate expires in (days)", "min by (service, instance) (igw_tls_cert_expiry_timestamp_seconds - time())"
     " / 86400", "{{service}} {{instance}}", "d"),
    # Process panels (prometheus_client's process collector on every service).
    ("Process RSS", "max by (job, instance) (process_resident_memory_bytes)", "{{job}} {{instance}}", "bytes"),
    ("Process CPU (cores)", "sum by (job, instance) (rate(process_cpu_seconds_total[5m]))", "{{job}} {{instance}}",
     "short"),
    ("Open file descriptors", "max by (job, instance) (process_open_fds)", "{{job}} {{instance}}", "short"),
    ("Uptime", "max by (job, instance) (time() - process_start_time_seconds)", "{{job}} {{instance}}", "s"),
]

# Postgres (postgres_exporter / CloudNativePG metrics), narrowed by the database variable.
PG_PANELS: list[tuple[str, str | list[Query], str, str]] = [
    ("Postgres up", "min(pg_up)", "up", "short"),
    ("Postgres connections by database", 'sum by (datname) (pg_stat_database_numbackends{datname=~"$database"})',
     "{{datname}}", "short"),
    ("Postgres transactions per second",
     [('sum by (datname) (rate(pg_stat_database_xact_commit{datname=~"$database"}[5m]))', "commit {{datname}}"),
      ('sum by (datname) (rate(pg_stat_database_xact_rollback{datname=~"$database"}[5m]))', "rollback {{datname}}")],
     "", "ops"),
    ("Postgres deadlocks and conflicts",
     [('sum by (datname) (increase(pg_stat_database_deadlocks{datname=~"$database"}[5m]))', "deadlocks {{datname}}"),
      ('sum by (datname) (increase(pg_stat_database_conflicts{datname=~"$database"}[5m]))', "conflicts {{datname}}")],
     "", "short"),
    ("Postgres database size", 'max by (datname) (pg_database_size_bytes{datname=~"$database"})', "{{datname}}",
     "bytes"),
    ("Postgres longest transaction", "max(pg_stat_activity_max_tx_duration)", "max", "s"),
]

_SELECTOR = re.compile(r"\b((?:igw|process)_[a-z_]+)(\{[^}]*\})?")
_TEAM_METRICS = ("igw_router_cost_nanodollars", "igw_router_budget_denials", "igw_ledger_remaining_budget_nanodollars",
                 "igw_ledger_soft_limit_crossings", "igw_ledger_spend_nanodollars", "igw_ledger_budget_denials")


def scoped(expr: str) -> str:
    """Adds job/instance (and team) matchers to every igw_* and process_* selector."""

    def add(m: re.Match[str]) -> str:
        name, existing = m.group(1), (m.group(2) or "{}")[1:-1]
        matchers = ['job=~"$job"', 'instance=~"$instance"']
        if name.startswith(_TEAM_METRICS):
            matchers.append('team=~"$team"')
        return name + "{" + ", ".join([*matchers, *([existing] if existing else [])]) + "}"

    return _SELECTOR.sub(add, expr)


def _var(name: str, query: str, label: str) -> dict[str, object]:
    return {
        "name": name, "label": label, "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": query, "refId": name}, "definition": query, "refresh": 2, "multi": True,
        "includeAll": True, "allValue": ".*", "current": {"text": "All", "value": "$__all"}, "sort": 1,
    }


def build() -> dict[str, object]:
    panels = []
    rows = [(t, e, lg, u, True) for t, e, lg, u in PANELS] + [(t, e, lg, u, False) for t, e, lg, u in PG_PANELS]
    for i, (title, expr, legend, unit, igw) in enumerate(rows):
        queries = [(expr, legend)] if isinstance(expr, str) else expr
        if igw:
            queries = [(scoped(q), lg) for q, lg in queries]
        panels.append({
            "id": i + 1,
            "type": "timeseries",
            "title": title,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [
                {"refId": chr(ord("A") + j), "expr": q, "legendFormat": lg} for j, (q, lg) in enumerate(queries)
            ],
        })
    return {
        "title": "igw: inference gateway",
        "uid": "igw-overview",
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus"},
            _var("job", 'label_values(igw_grpc_server_handled_total, job)', "job"),
            _var("instance", 'label_values(igw_grpc_server_handled_total{job=~"$job"}, instance)', "instance"),
            _var("team", "label_values(igw_ledger_spend_nanodollars_total, team)", "team"),
            _var("database", "label_values(pg_database_size_bytes, datname)", "database"),
        ]},
        "panels": panels,
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("igw-dashboard.json")
    out.write_text(json.dumps(build(), indent=2) + "\n")
    print(out)

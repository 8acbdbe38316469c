"""Writes deploy/grafana/igw-dashboard.json (run: python deploy/grafana/build_dashboard.py)."""

from __future__ import annotations

import json
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
]


def build() -> dict[str, object]:
    panels = []
    for i, (title, expr, legend, unit) in enumerate(PANELS):
        queries = [(expr, legend)] if isinstance(expr, str) else expr
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
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus"}]},
        "panels": panels,
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("igw-dashboard.json")
    out.write_text(json.dumps(build(), indent=2) + "\n")
    print(out)

"""What agents and operators touch: the client in a fresh venv, every CLI command (table and
JSON), the README's quick start as written, metrics that add up, and one trace per call."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from igw.router.v1 import router_pb2, router_pb2_grpc
from igw_dev import pki as pki_mod
from tests.e2e.clientvenv import build_client_venv, client_env, installed_distributions, run_client_script
from tests.e2e.conftest import Gateway, mtls_channel, start_gateway, stop_gateway

ROOT = Path(__file__).resolve().parents[2]
CANARY = f"sk-CANARY-{uuid.uuid4()}"


def igw(gw: Gateway, *args: str, env: dict[str, str] | None = None, stdin: str | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "IGW_ENDPOINTS": str(gw.state_dir / "endpoints.json"), **(env or {})}
    out = subprocess.run([sys.executable, "-m", "services.cli.main", *args], capture_output=True, text=True,
                         env=full_env, input=stdin, timeout=60, cwd=ROOT)
    if check:
        assert out.returncode == 0, f"igw {' '.join(args)} -> {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out


def igw_json(gw: Gateway, *args: str, env: dict[str, str] | None = None) -> object:
    return json.loads(igw(gw, *args, "--json", env=env).stdout)


def test_the_client_alone_in_a_fresh_venv_calls_the_gateway(gateway: Gateway, tmp_path: Path) -> None:
    python = build_client_venv(tmp_path)
    assert installed_distributions(python) <= {"igw-client", "grpcio", "protobuf", "pip", "setuptools", "wheel",
                                               "typing-extensions"}
    env = {"IGW_ROUTER_ADDRS": f"127.0.0.1:1,{gateway.addr('router')}",  # the first address is down: HA retry
           "IGW_TLS_CERT": str(gateway.pki / "agent-demo-quickstart.pem"),
           "IGW_TLS_KEY": str(gateway.pki / "agent-demo-quickstart-key.pem"),
           "IGW_TLS_CA": str(gateway.pki / "ca.pem")}
    result = run_client_script(python, env)
    assert result["forbidden_modules"] == []
    assert result["generate"]["text"] == "echo: hello from a fresh venv" and result["generate"]["cost_nanos"] > 0
    assert result["stream"]["kinds"][0] == "start" and result["stream"]["kinds"][-1] == "final"
    assert result["stream"]["text"] == "echo: stream from a fresh venv"
    assert "fast" in result["models"]
    # The shipped example agent runs as documented, from the venv, outside the repo.
    example = subprocess.run([str(python), str(ROOT / "clients/examples/agent.py"), "--model", "fast", "example",
                              "agent"], env=client_env(env), cwd=python.parent, capture_output=True, text=True,
                             timeout=120)
    assert example.returncode == 0, example.stderr
    assert "echo: example agent" in example.stdout
    # A team with no money left: the typed error says what remains.
    team = f"venv{uuid.uuid4().hex[:6]}"
    cert, key = pki_mod.issue_to_dir(gateway.pki, "agent", team, "bot")
    igw(gateway, "budgets", "set", "--team", team, "--window", "daily", "--limit", "0.00000001")
    broke = run_client_script(python, {**env, "IGW_TLS_CERT": str(cert), "IGW_TLS_KEY": str(key)})
    assert broke["budget_exceeded"]["reason"] == "BUDGET_EXCEEDED"
    assert broke["budget_exceeded"]["code"] == "RESOURCE_EXHAUSTED"
    assert broke["budget_exceeded"]["limit_nanos"] == 10
    assert broke["budget_exceeded"]["remaining_nanos"] is not None


def test_metrics_plot_drives_traffic_and_renders_what_metrics_said(gateway: Gateway, tmp_path: Path) -> None:
    out = tmp_path / "metrics.png"
    printed = igw(gateway, "metrics", "plot", "--seconds", "4", "--out", str(out)).stdout
    assert str(out) in printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000


def test_every_cli_command_works_with_tables_and_json(gateway: Gateway, tmp_path: Path) -> None:
    gw = gateway
    outputs: list[str] = []

    def run(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> str:
        out = igw(gw, *args, env=env, stdin=stdin)
        outputs.append(out.stdout + out.stderr)
        return out.stdout

    # Agent side.
    assert "echo: hello cli" in run("chat", "--model", "fast", "hello cli")
    assert "fast" in run("models")
    models = igw_json(gw, "models")
    assert any(m["alias"] == "fast" for m in models["models"])  # type: ignore[index]
    # Keys: create (secret from env), list, rotate (secret from stdin), disable, import-env.
    name = f"cli-{uuid.uuid4().hex[:6]}"
    run("keys", "create", name, "--provider", "openai", "--base-url", "https://api.openai.com/v1", "--all-teams",
        "--label", "owner=platform", "--rotate-every", "90d", "--secret-env", "MY_SECRET", env={"MY_SECRET": CANARY})
    listed = igw_json(gw, "keys", "list", "--provider", "openai")
    mine = [k for k in listed["keys"] if k["name"] == name]  # type: ignore[index]
    assert mine and mine[0]["current_version"] == 1
    assert name in run("keys", "list")
    run("keys", "rotate", name, "--grace", "1h", stdin=CANARY + "-v2\n")
    listed = igw_json(gw, "keys", "list")
    assert next(k for k in listed["keys"] if k["name"] == name)["current_version"] == 2  # type: ignore[index]
    run("keys", "disable", name)
    run("keys", "import-env", env={"ANTHROPIC_API_KEY": CANARY + "-anthropic", "OPENAI_API_KEY": "",
                                   "GEMINI_API_KEY": ""})
    assert "anthropic-env" in run("keys", "list")
    # Budgets.
    team = f"t{uuid.uuid4().hex[:6]}"
    run("budgets", "set", "--team", team, "--window", "monthly", "--limit", "12.50", "--soft", "10")
    got = igw_json(gw, "budgets", "get", "--team", team)
    assert got["budgets"][0]["limit_nanos"] in (12_500_000_000, "12500000000")  # type: ignore[index]
    assert team in run("budgets", "get", "--team", team)
    # Spend, audit, config, deployments, prices.
    assert "demo" in run("spend", "--by", "team,model", "--since", "24h")
    said: Any = igw_json(gw, "chat", "--model", "fast", "json please")
    assert "echo: json please" in said["text"] and said["request_id"]
    by: Any = igw_json(gw, "spend", "--by", "agent,provider,day", "--since", "24h")
    assert any(t.get("agent") == "quickstart" and t.get("provider") and t.get("day") for t in by["totals"])
    long_ago: Any = igw_json(gw, "spend", "--by", "team", "--since", "2020-01-01", "--until", "2020-01-02")
    assert not long_ago.get("totals")
    totals = igw_json(gw, "spend", "--by", "team")
    assert any(t.get("team") == "demo" for t in totals["totals"])  # type: ignore[index]
    assert igw_json(gw, "spend", "entries", "--limit", "3")["entries"]  # type: ignore[index]
    run("spend", "entries", "--limit", "3")
    assert name in run("audit", "list", "--key", name)
    events = igw_json(gw, "audit", "list", "--limit", "5")
    assert events["events"]  # type: ignore[index]
    # How the chat's lease ended is in the log: an auditor lists lease ends by action.
    for _ in range(50):  # the router ends the lease in the background, just after the answer
        used: Any = igw_json(gw, "audit", "list", "--action", "lease-used", "--request-id", said["request_id"])
        if used.get("events"):
            break
        time.sleep(0.1)
    assert [(e["action"], e["reason"]) for e in used["events"]] == [("AUDIT_ACTION_LEASE_USED", "SUCCESS")]
    assert "lease_used" in run("audit", "list", "--action", "lease-used", "--limit", "3")
    head = re.search(r"^head (\d+:[0-9a-f]{64}) ", run("audit", "verify"), re.M)
    assert head, "verify prints the chain head to keep outside the vault"
    assert igw_json(gw, "audit", "verify")["ok"] is True  # type: ignore[index]
    assert "audit log ok" in run("audit", "verify", "--anchor", head.group(1))
    seq = head.group(1).split(":")[0]
    moved = igw(gw, "audit", "verify", "--anchor", f"{seq}:{'0' * 64}", check=False)
    assert moved.returncode == 1 and "ANCHOR_MISMATCH" in moved.stderr
    assert igw(gw, "audit", "verify", "--anchor", "nonsense", check=False).returncode != 0
    sha = igw_json(gw, "config", "show")["sha256"]  # type: ignore[index]
    assert sha in run("config", "show")
    assert igw_json(gw, "config", "reload")["sha256"] == sha  # type: ignore[index]
    run("config", "reload")
    assert "fake-openai-small" in run("deployments")
    assert igw_json(gw, "deployments")["deployments"]  # type: ignore[index]
    run("prices", "set", "cli-model", "--input", "1.25", "--output", "10")
    prices = igw_json(gw, "prices", "list")
    cli = next(p for p in prices["prices"] if p["model"] == "cli-model")  # type: ignore[index]
    assert int(cli["input_per_mtok_nanos"]) == 1_250_000_000 and int(cli["output_per_mtok_nanos"]) == 10_000_000_000
    assert "cli-model" in run("prices", "list")
    # PKI and probe (no gateway needed for pki).
    pki_dir = tmp_path / "pki"
    run("pki", "init", "--dir", str(pki_dir))
    run("pki", "issue", "agent", "teamx", "botx", "--dir", str(pki_dir))
    run("pki", "issue", "operator", "alice", "--dir", str(pki_dir))
    assert (pki_dir / "agent-teamx-botx.pem").exists() and (pki_dir / "operator-alice.pem").exists()
    run("probe", str(gw.endpoints["probes"]["ledger"]))
    # Secrets never echoed.
    assert not any(CANARY in o for o in outputs)


def test_the_cli_says_clearly_when_a_certificate_is_missing_or_expired(gateway: Gateway, tmp_path: Path) -> None:
    missing = igw(gateway, "keys", "list", "--cert", str(tmp_path / "nope.pem"), check=False)
    assert missing.returncode == 2 and "nope.pem" in missing.stderr and "Traceback" not in missing.stderr
    ca = (gateway.pki / "ca.pem").read_bytes()
    ca_key = (gateway.pki / "ca-key.pem").read_bytes()
    cert, key = pki_mod.issue_cert(ca, ca_key, "spiffe://igw.local/operator/old",
                                   not_before=datetime.now(UTC) - timedelta(days=9), valid_for=timedelta(days=1))
    (tmp_path / "old.pem").write_bytes(cert)
    (tmp_path / "old-key.pem").write_bytes(key)
    expired = igw(gateway, "keys", "list", "--cert", str(tmp_path / "old.pem"), "--key",
                  str(tmp_path / "old-key.pem"), check=False)
    assert expired.returncode == 2 and "expired" in expired.stderr and "Traceback" not in expired.stderr


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", quick, re.S):
        for line in block.splitlines():
            line = line.split("  #", 1)[0].strip()
            if line and not line.startswith("make "):
                commands.append(line)
    return commands


def test_the_readme_quick_start_runs_as_written(tmp_path: Path, pg: object) -> None:
    commands = _readme_commands()
    assert len(commands) >= 15
    work = tmp_path / "checkout"
    work.mkdir()
    (work / ".venv").symlink_to(ROOT / ".venv")
    env = {**os.environ, "IGW_DATABASE_URL": ""}
    env.pop("IGW_ENDPOINTS", None)
    log = open(work / "up.log", "wb")
    # `make run` = the venv (already here) + `igw up` with the fixed ports the README uses.
    up = subprocess.Popen([str(ROOT / ".venv/bin/igw"), "up", "--state-dir", ".igw"], cwd=work, env=env,
                          stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while not (work / ".igw" / "endpoints.json").exists():
            assert up.poll() is None and time.monotonic() < deadline, (work / "up.log").read_text()[-3000:]
            time.sleep(0.2)
        for cmd in commands:
            out = subprocess.run(["bash", "-c", cmd], cwd=work, env=env, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, f"README command failed: {cmd}\n{out.stdout}\n{out.stderr}"
            if "flaky" in cmd:
                assert "fell back" in out.stderr
            if "over budget" in cmd:
                assert "refused: over budget" in out.stdout and "BUDGET_EXCEEDED" in out.stderr
    finally:
        up.terminate()
        up.wait(60)
    assert up.returncode == 0


@pytest.fixture(scope="module")
def traced_gateway(tmp_path_factory: pytest.TempPathFactory, pg: object) -> Iterator[tuple[Gateway, Path]]:
    state = tmp_path_factory.mktemp("traced")
    trace_file = state / "spans.jsonl"
    gw = start_gateway(state / "gw", pg, {"IGW_TRACE_FILE": str(trace_file)})
    try:
        yield gw, trace_file
    finally:
        stop_gateway(gw)


def _scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in httpx.get(url, timeout=10).text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$", line)
        if not m:
            continue
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        samples[(m.group(1), labels)] = float(m.group(4))
    return samples


def _sum(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **want: str) -> float:
    return sum(v for (n, labels), v in samples.items()
               if n == name and all((k, v2) in labels for k, v2 in want.items()))


def test_metrics_show_the_calls_tokens_and_cost_and_a_trace_spans_all_three_services(
    traced_gateway: tuple[Gateway, Path],
) -> None:
    gw, trace_file = traced_gateway
    responses = []
    with mtls_channel(gw.addr("router"), gw.pki, "agent-demo-quickstart") as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        for i in range(3):
            rid = f"metrics-{i}-{uuid.uuid4().hex[:6]}"
            req = router_pb2.GenerateRequest(model="fast", max_output_tokens=50, request_id=rid)
            req.messages.add(role=router_pb2.ROLE_USER).parts.add(text=f"count these words please {i}")
            responses.append(stub.Generate(req, timeout=15))
        for _ in range(2):
            req = router_pb2.GenerateRequest(model="flaky", max_output_tokens=50)
            req.messages.add(role=router_pb2.ROLE_USER).parts.add(text="fall back please")
            responses.append(stub.Generate(req, timeout=15))
    time.sleep(1.0)  # settles are after the answer
    router = _scrape(gw.endpoints["metrics"]["router"])
    assert _sum(router, "igw_router_calls_total", alias="fast", code="OK") == 3
    assert _sum(router, "igw_router_calls_total", alias="flaky", code="OK") == 2
    assert _sum(router, "igw_router_fallbacks_total", reason="rate_limited") == 2
    assert _sum(router, "igw_router_tokens_total", kind="input") == sum(r.usage.input_tokens for r in responses)
    assert _sum(router, "igw_router_tokens_total", kind="output") == sum(r.usage.output_tokens for r in responses)
    assert _sum(router, "igw_router_cost_nanodollars_total", team="demo") == sum(r.cost_nanos for r in responses)
    assert _sum(router, "igw_grpc_server_handled_total", method="Generate", code="OK") == 5
    ledger = _scrape(gw.endpoints["metrics"]["ledger"])
    assert _sum(ledger, "igw_ledger_spend_nanodollars_total", team="demo") == sum(r.cost_nanos for r in responses)
    vault = _scrape(gw.endpoints["metrics"]["keyvault"])
    assert _sum(vault, "igw_keyvault_leases_issued_total") >= 7  # 3 + 2 x (429 then fallback)
    # Every metric the Grafana dashboard plots is declared by one of the services.
    families = set()
    for url in gw.endpoints["metrics"].values():
        declared = re.findall(r"^# TYPE (\S+) ", httpx.get(url, timeout=10).text, re.M)
        families |= {re.sub(r"_(total|created)$", "", name) for name in declared}
    dashboard = json.loads((ROOT / "deploy/grafana/igw-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for metric in re.findall(r"\b(igw_[a-z_]+)", " ".join(t["expr"] for t in panel["targets"])):
            family = re.sub(r"_(bucket|total|count|sum)$", "", metric)
            assert family in families, f"dashboard plots {metric}, which no service declares"
    # A streamed call (after the metric sums above, which count the unary calls only).
    stream_rid = f"stream-{uuid.uuid4().hex[:6]}"
    with mtls_channel(gw.addr("router"), gw.pki, "agent-demo-quickstart") as ch:
        req = router_pb2.GenerateRequest(model="fast", max_output_tokens=50, request_id=stream_rid)
        req.messages.add(role=router_pb2.ROLE_USER).parts.add(text="stream these few words back")
        streamed = list(router_pb2_grpc.RouterServiceStub(ch).GenerateStream(req, timeout=15))[-1].final
    # One trace: the router's Generate span and the ledger's and vault's spans share its trace id.
    rid = responses[0].request_id
    deadline = time.monotonic() + 10
    while True:
        spans = [json.loads(line) for line in trace_file.read_text().splitlines() if line.strip()]
        root = [s for s in spans if s["attributes"].get("igw.request_id") == rid]
        if root:
            trace_id = root[0]["trace_id"]
            services = {s["service"] for s in spans if s["trace_id"] == trace_id}
            if services >= {"igw-router", "igw-ledger", "igw-keyvault"}:
                break
        assert time.monotonic() < deadline, f"no complete trace for {rid}"
        time.sleep(0.2)
    attrs = root[0]["attributes"]
    assert attrs["gen_ai.request.model"] == "fast" and attrs["gen_ai.usage.input_tokens"] > 0
    names_in_trace = {s["name"] for s in spans if s["trace_id"] == trace_id}
    assert {"igw.ledger.v1.LedgerService/Reserve", "igw.keyvault.v1.KeyVaultService/IssueCredential"} <= names_in_trace
    # Every upstream attempt is a span of its own: the fallback call shows the 429 and then the success.
    flaky_rid = responses[3].request_id
    flaky_root = next(s for s in spans if s["attributes"].get("igw.request_id") == flaky_rid)
    attempts = sorted((s for s in spans if s["trace_id"] == flaky_root["trace_id"] and s["name"].startswith("chat ")),
                      key=lambda s: s["attributes"]["igw.attempt"])
    assert [a["attributes"].get("error.type") for a in attempts] == ["rate_limited", None]
    assert attempts[1]["attributes"]["gen_ai.usage.output_tokens"] == responses[3].usage.output_tokens
    # A stream's attempt span lasts until the stream's end: it carries the usage of the final event
    # (attributes cannot be set on an ended span) and ends after the connection's first event did.
    deadline = time.monotonic() + 10
    while True:
        spans = [json.loads(line) for line in trace_file.read_text().splitlines() if line.strip()]
        stream_root = [s for s in spans if s["attributes"].get("igw.request_id") == stream_rid]
        stream_attempts = [s for s in spans if stream_root and s["trace_id"] == stream_root[0]["trace_id"]
                           and s["name"].startswith("chat ")]
        if stream_attempts:
            break
        assert time.monotonic() < deadline, "no attempt span for the stream"
        time.sleep(0.2)
    (attempt,) = stream_attempts
    assert attempt["attributes"]["gen_ai.usage.output_tokens"] == streamed.usage.output_tokens > 0
    assert attempt["attributes"]["gen_ai.usage.input_tokens"] == streamed.usage.input_tokens > 0
    assert attempt["status"] != "ERROR" and attempt["end_ns"] <= stream_root[0]["end_ns"]
    # Settles go in batches after the answers: a batch is its own trace, linked to each call's, and the
    # ledger's SettleBatch span is in the batch's trace.
    batches = [s for s in spans if s["name"] == "igw.router.SettleBatch"]
    linked = {t for b in batches for t in b["links"]}
    assert {trace_id, flaky_root["trace_id"]} <= linked
    batch_traces = {b["trace_id"] for b in batches}
    assert any(s["service"] == "igw-ledger" and s["trace_id"] in batch_traces for s in spans)
    # No content in spans, and no provider key anywhere the gateway writes or exports.
    spans_text = trace_file.read_text()
    assert "count these words" not in spans_text
    metrics_all = "".join(httpx.get(u, timeout=10).text for u in gw.endpoints["metrics"].values())
    logs = gw.all_logs()
    assert "count these words" not in logs and "count these words" not in metrics_all
    # JSON log lines carry the call's request id (the router's access log line for this call).
    tagged = [json.loads(line) for line in logs.splitlines() if line.startswith("{") and rid in line]
    assert any(rec.get("request_id") == rid for rec in tagged), "no log line carries the request id"
    secrets = json.loads((gw.state_dir / "demo-secrets.json").read_text()).values()
    metrics_text = "".join(httpx.get(u, timeout=10).text for u in gw.endpoints["metrics"].values())
    import psutil

    cmdlines = " ".join(" ".join(p.info["cmdline"] or ()) for p in psutil.process_iter(["cmdline"]))
    for secret in secrets:
        for where, text in (("spans", spans_text), ("logs", gw.all_logs()), ("metrics", metrics_text),
                            ("process command lines", cmdlines)):
            assert secret not in text, f"a provider key leaked into {where}"

"""``igw up``: the whole gateway on one machine, as separate processes.

The ``igw`` command parses the options (``services/cli/commands_dev.py``) and calls :func:`run_up`;
scripts run it as ``python -m services.cli.main up ...``.

Starts (in order) an embedded Postgres when no ``IGW_DATABASE_URL`` is given (the vault
and the ledger get separate databases), the ledger, the keyvault, the fake providers and
their keys (demo mode), and the router; waits until all are healthy; writes
``<state>/endpoints.json``; prints how to call it; stops everything on Ctrl-C/SIGTERM.

``--replicas N`` starts N ledgers, N keyvaults and N routers (one Postgres): every router
spreads its calls over every ledger and vault replica. ``endpoints.json`` then lists them all
(``routers``, ``ledgers``, ``keyvaults``; ``router``, ``ledger`` and ``keyvault`` stay the first).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from igw.keyvault.v1 import keyvault_pb2, keyvault_pb2_grpc
from igw.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from igw_dev.pki import init_dev_pki
from igw_dev.procs import ServiceProcess, start_service, tls_env

FIXED_PORTS = {
    "ledger": (50053, 50063, 9103),
    "keyvault": (50052, 50062, 9102),
    "router": (50051, 50061, 9101),
}
EDGE_PORT = 50443  # the router's OpenAI/Anthropic-compatible HTTPS edge (fixed ports)
FAKE_PORTS = {"fake-openai": 18081, "fake-anthropic": 18082, "fake-gemini": 18083, "fake-flaky": 18084}
FAKE_KINDS = {"fake-openai": "openai", "fake-anthropic": "anthropic", "fake-gemini": "gemini", "fake-flaky": "openai"}
FAKE_BASE = {"openai": "/v1", "anthropic": "", "gemini": ""}


def demo_config(fake_ports: dict[str, int]) -> str:
    """The demo routing config: the built-in fakes, plus the real providers for `igw keys import-env`."""

    def url(name: str) -> str:
        return f"http://127.0.0.1:{fake_ports[name]}{FAKE_BASE[FAKE_KINDS[name]]}"

    return f"""# igw demo routing config (written by `igw up --demo`). Keep yours in version control.
version: 1
providers:
  fake-openai: {{type: openai, base_url: "{url('fake-openai')}", local: true}}
  fake-anthropic: {{type: anthropic, base_url: "{url('fake-anthropic')}", local: true}}
  fake-gemini: {{type: gemini, base_url: "{url('fake-gemini')}", local: true}}
  fake-flaky: {{type: openai, base_url: "{url('fake-flaky')}", local: true}}
  openai: {{type: openai, base_url: "https://api.openai.com/v1"}}
  anthropic: {{type: anthropic, base_url: "https://api.anthropic.com"}}
  gemini: {{type: gemini, base_url: "https://generativelanguage.googleapis.com"}}
deployments:
  fake-openai-small: {{provider: fake-openai, model: fake-small, price: fake-small, supports_images: true}}
  fake-anthropic-large: {{provider: fake-anthropic, model: fake-large, price: fake-large, context_window: 200000}}
  fake-gemini-small: {{provider: fake-gemini, model: fake-small, price: fake-small}}
  fake-flaky-small: {{provider: fake-flaky, model: fake-small, price: fake-small}}
  gpt-4o-mini: {{provider: openai, model: gpt-4o-mini, price: gpt-4o-mini, supports_images: true}}
  claude-haiku-4-5: {{provider: anthropic, model: claude-haiku-4-5, price: claude-haiku-4-5, context_window: 200000}}
  gemini-2.5-flash: {{provider: gemini, model: gemini-2.5-flash, price: gemini-2.5-flash, context_window: 1000000}}
models:
  fast:
    description: "Demo: the fake OpenAI-style provider, falling back to the fake Gemini"
    strategy: priority
    candidates: [fake-openai-small, fake-gemini-small]
  smart:
    description: "Demo: the fake Anthropic-style provider"
    candidates: [fake-anthropic-large, fake-openai-small]
  cheapest:
    description: "Demo: whichever fake is cheapest"
    strategy: cheapest
    candidates: [fake-anthropic-large, fake-gemini-small]
  flaky:
    description: "Demo: a primary that always answers 429, so every call falls back"
    candidates: [fake-flaky-small, fake-anthropic-large]
  gpt:
    description: "Real OpenAI (after `igw keys import-env`)"
    candidates: [gpt-4o-mini]
  claude:
    description: "Real Anthropic (after `igw keys import-env`)"
    candidates: [claude-haiku-4-5]
  gemini:
    description: "Real Gemini (after `igw keys import-env`)"
    candidates: [gemini-2.5-flash]
retries: {{max_attempts: 3, backoff_initial_ms: 50, backoff_max_ms: 1000, retry_after_cap_ms: 2000}}
timeouts: {{connect_ms: 2000, first_byte_ms: 30000, idle_ms: 30000, total_ms: 120000}}
breaker: {{failure_threshold: 5, cooldown_ms: 10000, probe_timeout_ms: 5000}}
limits: {{max_in_flight: 1024}}
"""


def _master_key(state: Path) -> Path:
    path = state / "vault-master.key"
    if not path.exists():
        path.write_text(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
        path.chmod(0o600)
    return path


def _demo_secrets(state: Path) -> dict[str, str]:
    path = state / "demo-secrets.json"
    if path.exists():
        return dict(json.loads(path.read_text()))
    values = {name: "sk-demo-" + secrets.token_hex(16) for name in FAKE_KINDS}
    path.write_text(json.dumps(values))
    path.chmod(0o600)
    return values


def _start_fake(name: str, port: int, secret: str, state: Path) -> tuple[subprocess.Popen[bytes], int]:
    port_file = state / f"{name}.port"
    port_file.unlink(missing_ok=True)
    args = [sys.executable, "-m", "igw_dev.fakes", "--kind", FAKE_KINDS[name], "--port", str(port),
            "--port-file", str(port_file)]
    if name == "fake-flaky":
        args += ["--fault", json.dumps({"status": 429, "retry_after": 1})]
    log = open(state / f"{name}.log", "ab")
    env = {**os.environ, "IGW_SECRET": "", "IGW_FAKE_API_KEY": secret}  # the key stays out of `ps`
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited: see {state / (name + '.log')}")
        if port_file.exists() and port_file.read_text().strip():
            return proc, int(port_file.read_text().strip())
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{name} did not start")


def _stop_all(stoppers: list[tuple[int, Callable[[], Any]]]) -> None:
    """Stops tier by tier, highest first, the members of a tier at once (each waits for its
    process's graceful drain; one after another they added up to seconds per gateway)."""

    def run(stop: Callable[[], Any]) -> None:
        try:
            stop()
        except Exception as err:
            print(f"while stopping: {err}", file=sys.stderr)

    for tier in sorted({t for t, _ in stoppers}, reverse=True):
        group = [stop for t, stop in stoppers if t == tier]
        threads = [threading.Thread(target=run, args=(stop,), daemon=True) for stop in group]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def _stopper(proc: subprocess.Popen[bytes]) -> Callable[[], object]:
    def stop() -> object:
        proc.terminate()
        return proc.wait(5)

    return stop


def _wait_healthy(proc: ServiceProcess, timeout: float = 60) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{proc.probe_port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc.proc.poll() is not None:
                raise RuntimeError(f"{proc.name} exited:\n{proc.log_text()[-3000:]}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"{proc.name} did not become SERVING:\n{proc.log_text()[-3000:]}")


def _operator_channel(pki: Path, addr: str) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        (pki / "ca.pem").read_bytes(), (pki / "operator-admin-key.pem").read_bytes(),
        (pki / "operator-admin.pem").read_bytes(),
    )
    # The dev PKI's service certificates name 127.0.0.1, the address dialled here.
    return grpc.secure_channel(addr, creds)


def _ensure_demo_keys(ch: grpc.Channel, fake_urls: dict[str, str], demo_secrets: dict[str, str]) -> None:
    stub = keyvault_pb2_grpc.KeyVaultAdminServiceStub(ch)
    existing = {k.name: k for k in stub.ListProviderKeys(keyvault_pb2.ListProviderKeysRequest(page_size=1000),
                                                         timeout=10).keys}
    for name, url in fake_urls.items():
        key_name = f"demo-{name}-{url.rsplit(':', 1)[1].split('/')[0]}"
        if key_name in existing:
            continue
        stub.CreateProviderKey(
            keyvault_pb2.CreateProviderKeyRequest(
                request_id=f"igw-up-{key_name}", name=key_name, provider=name, secret=demo_secrets[name],
                base_url=url, all_teams=True, labels={"demo": "true"},
            ),
            timeout=10,
        )


def _ensure_demo_budget(ch: grpc.Channel) -> None:
    stub = ledger_pb2_grpc.LedgerAdminServiceStub(ch)
    stub.SetBudget(
        ledger_pb2.SetBudgetRequest(team="demo", window=ledger_pb2.BUDGET_WINDOW_DAILY, limit_nanos=5_000_000_000,
                                    soft_limit_nanos=4_000_000_000),
        timeout=10,
    )


def run_up(args: argparse.Namespace) -> int:
    """Brings the gateway up and blocks until Ctrl-C/SIGTERM. Returns the exit code."""
    state = Path(args.state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    auto = getattr(args, "ports", "fixed") == "auto"
    demo = getattr(args, "demo", True)
    pki = state / "pki"
    init_dev_pki(pki)
    # (tier, stop): routers (2) stop first so they can settle into a live ledger, then the ledgers,
    # vaults and fakes (1), then Postgres (0); each tier in parallel.
    stoppers: list[tuple[int, Callable[[], Any]]] = []
    stopping = {"flag": False}

    def _stop(*_: object) -> None:
        stopping["flag"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        base_url = os.environ.get("IGW_DATABASE_URL", "")
        if base_url:
            ledger_url = os.environ.get("IGW_LEDGER_DATABASE_URL", base_url)
            vault_url = os.environ.get("IGW_KEYVAULT_DATABASE_URL", "")
            if not vault_url or vault_url == ledger_url:
                # The vault never shares the ledger's database (DESIGN "Storage").
                print("IGW_DATABASE_URL is the ledger's; set IGW_KEYVAULT_DATABASE_URL to a separate "
                      "database for the keyvault", file=sys.stderr)
                return 2
        else:
            from igw_dev.pg import EmbeddedPostgres

            pg = EmbeddedPostgres(state / "pg", stop_at_exit=False)
            pg.start()
            stoppers.append((0, pg.stop))
            pg.create_database("igw_ledger")
            pg.create_database("igw_keyvault")
            ledger_url, vault_url = pg.url("igw_ledger"), pg.url("igw_keyvault")

        replicas = max(1, int(getattr(args, "replicas", 1) or 1))

        def ports(name: str, i: int = 0) -> dict[str, str]:
            # Fixed ports step by 100 per replica (router 50051, 50151, ...).
            g, p, m = (0, 0, 0) if auto else (port + 100 * i for port in FIXED_PORTS[name])
            return {"IGW_LISTEN": f"127.0.0.1:{g}", "IGW_PROBE_LISTEN": f"127.0.0.1:{p}",
                    "IGW_METRICS_LISTEN": f"127.0.0.1:{m}", "IGW_LOG_FORMAT": "json"}

        def label(name: str, i: int) -> str:
            return name if i == 0 else f"{name}-{i + 1}"

        procs: dict[str, ServiceProcess] = {}
        ledgers: list[ServiceProcess] = []
        vaults: list[ServiceProcess] = []
        for i in range(replicas):
            # Migrations run under an advisory lock, so replicas may start together.
            ledger = start_service(label("ledger", i), {**ports("ledger", i), **tls_env(pki, "ledger"),
                                                        "IGW_DATABASE_URL": ledger_url}, state,
                                   module="services.ledger")
            procs[ledger.name] = ledger
            ledgers.append(ledger)
            stoppers.append((1, ledger.terminate))
            vault = start_service(label("keyvault", i), {**ports("keyvault", i), **tls_env(pki, "keyvault"),
                                                         "IGW_DATABASE_URL": vault_url,
                                                         "IGW_VAULT_MASTER_KEY_FILE": str(_master_key(state))},
                                  state, module="services.keyvault")
            procs[vault.name] = vault
            vaults.append(vault)
            stoppers.append((1, vault.terminate))
        for p in [*ledgers, *vaults]:
            _wait_healthy(p)
        ledger, vault = ledgers[0], vaults[0]

        fake_ports: dict[str, int] = {}
        if demo:
            demo_secrets = _demo_secrets(state)
            for name in FAKE_KINDS:
                proc, port = _start_fake(name, 0 if auto else FAKE_PORTS[name], demo_secrets[name], state)
                fake_ports[name] = port
                stoppers.append((1, _stopper(proc)))
            config_path = Path(args.config) if getattr(args, "config", None) else state / "router.yaml"
            if not getattr(args, "config", None):
                config_path.write_text(demo_config(fake_ports))
            fake_urls = {n: f"http://127.0.0.1:{p}{FAKE_BASE[FAKE_KINDS[n]]}" for n, p in fake_ports.items()}
            with _operator_channel(pki, ledger.address) as ch:
                _ensure_demo_budget(ch)
            with _operator_channel(pki, vault.address) as ch:
                _ensure_demo_keys(ch, fake_urls, demo_secrets)
        else:
            if not getattr(args, "config", None):
                print("igw up --no-demo needs --config PATH (a routing config)", file=sys.stderr)
                return 2
            config_path = Path(args.config)
        routers: list[ServiceProcess] = []
        n_workers = getattr(args, "router_workers", None)
        workers = {"IGW_ROUTER_WORKERS": str(n_workers)} if n_workers else {}
        for i in range(replicas):
            router = start_service(label("router", i), {
                **ports("router", i), **tls_env(pki, "router"), "IGW_ROUTER_CONFIG": str(config_path),
                "IGW_ROUTER_HTTP_LISTEN": f"127.0.0.1:{0 if auto else EDGE_PORT + 100 * i}",
                "IGW_LEDGER_ADDR": ",".join(p.address for p in ledgers),
                "IGW_KEYVAULT_ADDR": ",".join(p.address for p in vaults), **workers}, state, module="services.router")
            procs[router.name] = router
            routers.append(router)
            stoppers.append((2, router.terminate))
        for p in routers:
            _wait_healthy(p)
        router = routers[0]

        endpoints: dict[str, Any] = {
            "router": router.address, "keyvault": vault.address, "ledger": ledger.address,
            "openai_base_url": f"https://127.0.0.1:{router.http_port}/v1",
            "anthropic_base_url": f"https://127.0.0.1:{router.http_port}",
            "routers": [p.address for p in routers], "ledgers": [p.address for p in ledgers],
            "keyvaults": [p.address for p in vaults],
            "probes": {n: f"127.0.0.1:{p.probe_port}" for n, p in procs.items()},
            "metrics": {n: f"http://127.0.0.1:{p.metrics_port}/metrics" for n, p in procs.items()},
            "pids": {n: p.proc.pid for n, p in procs.items()},
            "fakes": {n: f"http://127.0.0.1:{p}" for n, p in fake_ports.items()},
            "ca": str(pki / "ca.pem"), "trust_domain": "igw.local",
            "operator_cert": str(pki / "operator-admin.pem"), "operator_key": str(pki / "operator-admin-key.pem"),
            "agent_cert": str(pki / "agent-demo-quickstart.pem"),
            "agent_key": str(pki / "agent-demo-quickstart-key.pem"),
            "router_config": str(config_path), "state_dir": str(state),
        }
        (state / "endpoints.json").write_text(json.dumps(endpoints, indent=2))
        more = "" if replicas == 1 else (
            f"\n  replicas  routers {', '.join(p.address for p in routers)}"
            f"\n            ledgers {', '.join(p.address for p in ledgers)}"
            f"\n            keyvaults {', '.join(p.address for p in vaults)}")
        print(f"""igw is up.
  router    {router.address}   (probe {endpoints['probes']['router']}, metrics {endpoints['metrics']['router']})
  https     {endpoints['openai_base_url']}   (OpenAI/Anthropic-compatible, same client certificates)
  keyvault  {vault.address}   ledger {ledger.address}{more}
  endpoints {state / 'endpoints.json'}

Try, in another terminal:
  .venv/bin/igw chat --model fast "Hello, gateway"
  .venv/bin/igw chat --model flaky "Show me a fallback"
  .venv/bin/igw spend --by team,model
Ctrl-C stops everything.""", flush=True)
        crashed = False
        reported: set[str] = set()
        kinds = {"ledger": ledgers, "keyvault": vaults, "router": routers}
        while not stopping["flag"]:
            for p in procs.values():
                if p.proc.poll() is not None and p.name not in reported:
                    reported.add(p.name)
                    print(f"{p.name} exited with {p.proc.returncode}", file=sys.stderr, flush=True)
            # One replica down is what replicas are for; the last one of a kind stops everything.
            for kind, members in kinds.items():
                if all(m.proc.poll() is not None for m in members):
                    print(f"no {kind} left; stopping", file=sys.stderr)
                    stopping["flag"] = crashed = True
            time.sleep(0.2)
        return 1 if crashed else 0
    finally:
        _stop_all(stoppers)
        (state / "endpoints.json").unlink(missing_ok=True)


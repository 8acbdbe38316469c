"""The image, end to end: the three services from one image, read-only, non-root, on the host network,
against Postgres on TCP (the embedded one, on the host); migrations as one-off job containers; real
calls through the router with an agent certificate, answered by a fake provider (a real HTTP server on
the host); then a graceful stop of every container (the image's init forwards SIGTERM to Python).

Run by `make image-test` (IGW_IMAGE names the image; CONTAINERS_CONF the podman settings).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from igw.client import IgwClient
from igw.keyvault.v1 import keyvault_pb2, keyvault_pb2_grpc
from igw.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from igw_dev.fakes import FakeProcess
from igw_dev.pg import EmbeddedPostgres
from igw_dev.pki import init_dev_pki

IMAGE = os.environ.get("IGW_IMAGE", "")
UID = 10001
RUN = f"it-{uuid.uuid4().hex[:8]}"


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and out.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])}... failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def secure_run_args(name: str, mounts: list[str]) -> list[str]:
    """What every container gets: a read-only root, non-root, host network, no privileges; only /tmp is
    writable, a small tmpfs (as the emptyDir in deploy/k8s: the router's TLS tunnels put sockets there)."""
    args = ["--name", name, "--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp:rw,size=16m,mode=1777",
            "--network=host", "--user", f"{UID}:{UID}", "--cap-drop=ALL", "--security-opt=no-new-privileges"]
    for m in mounts:
        args += ["-v", m]
    return args


@dataclass
class Stack:
    pg: EmbeddedPostgres
    pki: Path
    ports: dict[str, tuple[int, int, int]]
    fake: FakeProcess
    containers: list[str] = field(default_factory=list)

    def addr(self, service: str) -> str:
        return f"127.0.0.1:{self.ports[service][0]}"

    def channel(self, service: str, cert: str = "operator-admin") -> grpc.Channel:
        creds = grpc.ssl_channel_credentials(
            (self.pki / "ca.pem").read_bytes(), (self.pki / f"{cert}-key.pem").read_bytes(),
            (self.pki / f"{cert}.pem").read_bytes())
        return grpc.secure_channel(self.addr(service), creds, options=(("grpc.ssl_target_name_override", "localhost"),))

    def logs(self, name: str) -> str:
        out = podman("logs", name, check=False)
        return out.stdout + out.stderr


def identity_dir(root: Path, pki: Path, name: str) -> Path:
    """One service's certificate and key, readable by the container's user only (as a Secret volume)."""
    d = root / f"certs-{name}"
    d.mkdir()
    shutil.copy(pki / "ca.pem", d / "ca.crt")
    shutil.copy(pki / f"{name}.pem", d / "tls.crt")
    shutil.copy(pki / f"{name}-key.pem", d / "tls.key")
    for f in (d, *d.iterdir()):
        os.chown(f, UID, UID)
        f.chmod(0o500 if f.is_dir() else 0o400)
    return d


def service_env(name: str, ports: tuple[int, int, int]) -> list[str]:
    g, p, m = ports
    env = {"IGW_LISTEN": f"127.0.0.1:{g}", "IGW_PROBE_LISTEN": f"127.0.0.1:{p}", "IGW_METRICS_LISTEN": f"127.0.0.1:{m}",
           "IGW_TLS_CERT": "/certs/tls.crt", "IGW_TLS_KEY": "/certs/tls.key", "IGW_TLS_CA": "/certs/ca.crt",
           "IGW_GRACE_SECONDS": "2"}
    return [a for k, v in env.items() for a in ("-e", f"{k}={v}")]


def wait_serving(stack: Stack, service: str, name: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{stack.ports[service][1]}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            state = podman("inspect", "--format", "{{.State.Status}}", name, check=False).stdout.strip()
            if state not in ("running", "created", "configured"):
                raise AssertionError(f"{name} is {state}:\n{stack.logs(name)[-4000:]}")
            time.sleep(0.3)
    raise AssertionError(f"{name} not SERVING in {timeout}s:\n{stack.logs(name)[-4000:]}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    assert IMAGE, "IGW_IMAGE is not set: run `make image-test`"
    root = tmp_path_factory.mktemp("image")
    root.chmod(0o755)
    pg_port = free_port()
    pg = EmbeddedPostgres(root / "pg", fast=True, port=pg_port, listen_host="127.0.0.1")
    pg.start()
    pki = root / "pki"
    init_dev_pki(pki)
    fake_key = "sk-image-" + secrets.token_hex(12)
    fake = FakeProcess.start("openai", api_key=fake_key)
    stack = Stack(pg, pki, {s: (free_port(), free_port(), free_port()) for s in ("ledger", "keyvault", "router")}, fake)
    try:
        for db in ("igw_ledger", "igw_keyvault"):
            pg.create_database(db)
        # Migrations: one-off job containers, before any service starts (the services do not migrate).
        for component, db in (("ledger", "igw_ledger"), ("keyvault", "igw_keyvault")):
            name = f"igw-{RUN}-migrate-{component}"
            out = podman("run", "--rm", *secure_run_args(name, []), "-e", f"IGW_DATABASE_URL={pg.tcp_url(db)}",
                         IMAGE, "python", "-m", "services.common.migrate", component, timeout=180)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            assert result["migrated"] is True and result["component"] == component and result["head"], out.stdout
        master = root / "master"
        master.mkdir()
        (master / "key").write_text(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
        for f in (master, master / "key"):
            os.chown(f, UID, UID)
        (master / "key").chmod(0o400)
        certs = {s: identity_dir(root, pki, s) for s in ("ledger", "keyvault", "router")}

        def start(service: str, env: list[str], mounts: list[str]) -> str:
            name = f"igw-{RUN}-{service}"
            podman("run", "-d", *secure_run_args(name, [f"{certs[service]}:/certs:ro", *mounts]),
                   *service_env(service, stack.ports[service]), *env, IMAGE, "python", "-m", f"services.{service}")
            stack.containers.append(name)
            wait_serving(stack, service, name)
            return name

        start("ledger", ["-e", f"IGW_DATABASE_URL={pg.tcp_url('igw_ledger')}", "-e", "IGW_LEDGER_MIGRATE=false"], [])
        start("keyvault", ["-e", f"IGW_DATABASE_URL={pg.tcp_url('igw_keyvault')}", "-e", "IGW_VAULT_MIGRATE=false",
                           "-e", "IGW_VAULT_MASTER_KEY_FILE=/master/key"], [f"{master}:/master:ro"])
        # The operator sets a budget and stores the fake provider's key in the vault.
        with stack.channel("ledger") as ch:
            ledger_pb2_grpc.LedgerAdminServiceStub(ch).SetBudget(ledger_pb2.SetBudgetRequest(
                team="demo", window=ledger_pb2.BUDGET_WINDOW_DAILY, limit_nanos=5_000_000_000,
                soft_limit_nanos=4_000_000_000), timeout=10)
        with stack.channel("keyvault") as ch:
            keyvault_pb2_grpc.KeyVaultAdminServiceStub(ch).CreateProviderKey(keyvault_pb2.CreateProviderKeyRequest(
                request_id=f"{RUN}-key", name="image-fake", provider="fake-openai", secret=fake_key,
                base_url=fake.base_url, all_teams=True), timeout=10)
        config = root / "config"
        config.mkdir()
        (config / "router.yaml").write_text(f"""version: 1
providers:
  fake-openai: {{type: openai, base_url: "{fake.base_url}", local: true}}
deployments:
  fake-openai-small: {{provider: fake-openai, model: fake-small, price: fake-small}}
models:
  fast: {{candidates: [fake-openai-small]}}
""")
        for f in (config, config / "router.yaml"):
            f.chmod(0o755 if f.is_dir() else 0o644)
        start("router", ["-e", "IGW_ROUTER_CONFIG=/config/router.yaml", "-e", f"IGW_LEDGER_ADDR={stack.addr('ledger')}",
                         "-e", f"IGW_KEYVAULT_ADDR={stack.addr('keyvault')}"], [f"{config}:/config:ro"])
        yield stack
    finally:
        for name in reversed(stack.containers):
            podman("rm", "-f", "-t", "0", name, check=False)
        fake.stop()
        pg.stop()


def test_containers_run_read_only_as_non_root(stack: Stack) -> None:
    config = json.loads(podman("image", "inspect", IMAGE).stdout)[0]["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"][0] == "/opt/igw/bin/dumb-init"
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] and labels["org.opencontainers.image.revision"]
    for name in stack.containers:
        info = json.loads(podman("inspect", name).stdout)[0]
        assert info["HostConfig"]["ReadonlyRootfs"] is True
        assert podman("exec", name, "id", "-u").stdout.strip() == str(UID)
        for path in ("/opt/igw/probe", "/etc/probe", "/var/tmp/probe", "/run/probe"):
            denied = podman("exec", name, "sh", "-c", f": > {path}", check=False)
            assert denied.returncode != 0 and "Read-only file system" in denied.stderr, denied.stderr
        assert podman("exec", name, "sh", "-c", ": > /tmp/probe && rm /tmp/probe", check=False).returncode == 0
        # No compiler, no pip in the final image.
        tools = podman("exec", name, "sh", "-c", "command -v gcc cc pip pip3 || true").stdout.strip()
        assert tools == ""
        # PID 1 is the init, Python its child.
        assert "dumb-init" in podman("exec", name, "cat", "/proc/1/cmdline").stdout


def test_an_agent_calls_through_the_router(stack: Stack) -> None:
    pki = stack.pki
    with IgwClient(addresses=[stack.addr("router")], cert=str(pki / "agent-demo-quickstart.pem"),
                   key=str(pki / "agent-demo-quickstart-key.pem"), ca=str(pki / "ca.pem"), timeout=30) as client:
        answer = client.generate("fast", "hello from the image", max_output_tokens=50)
        assert answer.text == "echo: hello from the image"
        assert answer.served_by.deployment == "fake-openai-small"
        assert answer.cost_nanos > 0
        events = list(client.stream("fast", "stream from the image", max_output_tokens=50))
        text = "".join(e.text_delta.text for e in events if e.HasField("text_delta"))
        assert text == "echo: stream from the image"
        final = [e for e in events if e.HasField("final")]
        assert len(final) == 1 and final[0].final.cost_nanos > 0
        spent = {b.window: b.spent_nanos for b in client.get_budget().budgets if not b.agent}
        deadline = time.monotonic() + 10
        while spent.get(ledger_pb2.BUDGET_WINDOW_DAILY, 0) < answer.cost_nanos + final[0].final.cost_nanos:
            assert time.monotonic() < deadline, spent
            time.sleep(0.2)
            spent = {b.window: b.spent_nanos for b in client.get_budget().budgets if not b.agent}
    # The services export metrics on their named port.
    for service in ("router", "keyvault", "ledger"):
        body = urllib.request.urlopen(f"http://127.0.0.1:{stack.ports[service][2]}/metrics", timeout=5).read()
        assert b"igw_" in body and b"process_resident_memory_bytes" in body


def test_containers_stop_gracefully_on_sigterm(stack: Stack) -> None:
    # Router first (it drains), then the vault and the ledger; each must exit 0 well within the timeout.
    for name in reversed(list(stack.containers)):
        t0 = time.monotonic()
        podman("stop", "-t", "20", name)
        took = time.monotonic() - t0
        info = json.loads(podman("inspect", name).stdout)[0]["State"]
        assert info["ExitCode"] == 0, (info, stack.logs(name)[-3000:])
        assert took < 15, f"{name} took {took:.1f}s to stop: SIGTERM did not reach Python"
        assert "Traceback" not in stack.logs(name)

"""Zero trust in both directions, with certificates from a CA igw did not make.

Every certificate here is minted in the test with ``cryptography`` (no ``igw pki``): a foreign
CA, and leaves that carry nothing but their SPIFFE URI SAN (no DNS name, no IP, no subject),
as cert-manager ``uris:`` or SPIRE would issue them. Ledger, keyvault and router run as real
processes over real mTLS; agents call through the typed client.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import os
import secrets
import socket
import ssl
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from igw.client import AsyncIgwClient, ClientConfig, IgwClient, IgwError
from igw_dev.procs import ServiceProcess, start_service

TD = "foreign.example"


# --------------------------------------------------------------------------- a foreign PKI


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".{uuid.uuid4().hex[:6]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # what cert-manager / SPIRE helpers do: never a half-written file


@dataclass
class ForeignCa:
    """A CA that is not igw's, and leaves with a URI SAN only."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str) -> ForeignCa:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Platform Team"),
                             x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def leaf(self, spiffe_id: str) -> tuple[bytes, bytes, int]:
        """(cert PEM, key PEM, serial): an X.509-SVID with its URI SAN and nothing else."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(serial)
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem, serial


IDENTITIES = {
    "ledger": f"spiffe://{TD}/ledger",
    "keyvault": f"spiffe://{TD}/keyvault",
    "router": f"spiffe://{TD}/router",
    "agent": f"spiffe://{TD}/team/blue/agent/rotator",
    "operator": f"spiffe://{TD}/operator/ops",
}


class Material:
    """One directory per identity (cert.pem, key.pem, ca.pem), as a mounted Secret would look."""

    def __init__(self, root: Path, ca: ForeignCa) -> None:
        self.root = root
        self.first_ca = ca
        self.serials: dict[str, int] = {}
        for name in IDENTITIES:
            (root / name).mkdir(parents=True, exist_ok=True)
        self.issue_all(ca)
        self.set_bundle([ca])

    def dir(self, name: str) -> Path:
        return self.root / name

    def issue_all(self, ca: ForeignCa) -> None:
        for name, spiffe_id in IDENTITIES.items():
            cert, key, serial = ca.leaf(spiffe_id)
            # Key first, then certificate: the reader keeps the old pair until both agree.
            _write(self.dir(name) / "key.pem", key)
            _write(self.dir(name) / "cert.pem", cert)
            self.serials[name] = serial

    def set_bundle(self, cas: list[ForeignCa]) -> None:
        for name in IDENTITIES:
            _write(self.dir(name) / "ca.pem", b"".join(c.pem for c in cas))

    def env(self, name: str) -> dict[str, str]:
        d = self.dir(name)
        return {"IGW_TLS_CERT": str(d / "cert.pem"), "IGW_TLS_KEY": str(d / "key.pem"),
                "IGW_TLS_CA": str(d / "ca.pem"), "IGW_TRUST_DOMAIN": TD, "IGW_LOG_FORMAT": "json"}

    def client(self, address: str, **kw: object) -> ClientConfig:
        d = self.dir("agent")
        return ClientConfig([address], d / "cert.pem", d / "key.pem", d / "ca.pem", trust_domain=TD, **kw)  # type: ignore[arg-type]


ROUTER_CONFIG = """version: 1
providers:
  p: {type: openai, base_url: "http://127.0.0.1:9/v1", local: true}
deployments:
  d: {provider: p, model: m, price: fake-small}
models:
  fast: {candidates: [d]}
"""


@dataclass
class Cluster:
    material: Material
    ledger: ServiceProcess
    vault: ServiceProcess
    router: ServiceProcess
    impostor_router: ServiceProcess


def _health(proc: ServiceProcess, name: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{proc.probe_port}") as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status


def _wait_health(proc: ServiceProcess, name: str, want: int, timeout: float = 20) -> float:
    t0 = time.monotonic()
    while True:
        try:
            if _health(proc, name) == want:
                return time.monotonic() - t0
        except grpc.RpcError:
            pass
        assert time.monotonic() - t0 < timeout, f"{proc.name} {name!r} never became {want}:\n{proc.log_text()[-3000:]}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, pg: object) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("foreign")
    material = Material(root / "tls", ForeignCa.create("Platform Issuing CA 1"))
    suffix = uuid.uuid4().hex[:8]
    pg.create_database(f"fl_{suffix}")  # type: ignore[attr-defined]
    pg.create_database(f"fv_{suffix}")  # type: ignore[attr-defined]
    state = root / "state"
    procs: list[ServiceProcess] = []
    try:
        ledger = start_service("ledger", {**material.env("ledger"),
                                          "IGW_DATABASE_URL": pg.url(f"fl_{suffix}")}, state)  # type: ignore[attr-defined]
        procs.append(ledger)
        vault = start_service("keyvault", {
            **material.env("keyvault"), "IGW_DATABASE_URL": pg.url(f"fv_{suffix}"),  # type: ignore[attr-defined]
            "IGW_VAULT_MASTER_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
            "IGW_VAULT_MASTER_KEY_FILE": ""}, state)
        procs.append(vault)
        config = root / "router.yaml"
        config.write_text(ROUTER_CONFIG)
        router = start_service("router", {**material.env("router"), "IGW_ROUTER_CONFIG": str(config),
                                          "IGW_LEDGER_ADDR": ledger.address, "IGW_KEYVAULT_ADDR": vault.address},
                               state)
        procs.append(router)
        # A router told that the vault's address is the ledger: the vault's certificate must not pass.
        impostor = start_service("router-impostor", {
            **material.env("router"), "IGW_ROUTER_CONFIG": str(config),
            "IGW_LEDGER_ADDR": vault.address, "IGW_KEYVAULT_ADDR": vault.address}, state, module="services.router")
        procs.append(impostor)
        yield Cluster(material, ledger, vault, router, impostor)
    finally:
        for p in reversed(procs):
            p.terminate()


def test_uri_san_only_certificates_from_a_foreign_ca_serve_agent_calls(cluster: Cluster) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    for proc in (cluster.ledger, cluster.vault, cluster.router):
        _wait_health(proc, "readiness", serving)
        assert _health(proc, "liveness") == serving
    with IgwClient(cluster.material.client(cluster.router.address, max_attempts=1)) as client:
        models = client.list_models(timeout=10)  # router -> ledger (prices) over the checked tunnel
        assert [m.alias for m in models.models] == ["fast"]
        assert client.get_budget(timeout=10).budgets is not None  # router -> ledger GetBudget
        assert client._links[0].mode == "tunnel"  # the agent, too, checks the URI-only router by its tunnel
    log = cluster.router.log_text()
    assert "server identity refused" not in log
    # URI-only certificates: the router checks both through its tunnel, on every connection.
    assert log.count('"identity_check": "tunnel"') >= 2 and '"identity_check": "native"' not in log


def test_a_keyvault_certificate_posing_as_the_ledger_is_refused(cluster: Cluster) -> None:
    imp = cluster.impostor_router
    # Readiness never turns SERVING: no ledger replica proves spiffe://.../ledger.
    time.sleep(2.5)
    assert _health(imp, "readiness") == health_pb2.HealthCheckResponse.NOT_SERVING
    assert _health(imp, "igw.router.v1.RouterService") == health_pb2.HealthCheckResponse.NOT_SERVING
    assert _health(imp, "liveness") == health_pb2.HealthCheckResponse.SERVING
    with IgwClient(cluster.material.client(imp.address, max_attempts=1)) as client:
        with pytest.raises(IgwError) as exc:
            client.get_budget(timeout=5)
    assert exc.value.code == grpc.StatusCode.UNAVAILABLE
    log = imp.log_text()
    assert "server identity refused" in log
    assert f"server presented spiffe://{TD}/keyvault; expected exactly spiffe://{TD}/ledger" in log


def test_an_agent_refuses_a_ledger_posing_as_the_router(cluster: Cluster) -> None:
    with IgwClient(cluster.material.client(cluster.ledger.address, max_attempts=1)) as client:
        with pytest.raises(IgwError) as exc:
            client.list_models(timeout=5)
    assert exc.value.code == grpc.StatusCode.UNAVAILABLE


def _served_serial(address: str, material: Material, who: str = "operator") -> int:
    """The serial of the certificate a server presents to a brand-new connection."""
    d = material.dir(who)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(d / "ca.pem"))
    ctx.load_cert_chain(str(d / "cert.pem"), str(d / "key.pem"))
    ctx.set_alpn_protocols(["h2"])
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def test_certificates_and_ca_rotate_on_disk_mid_load_without_a_failed_call(cluster: Cluster) -> None:
    m = cluster.material
    _wait_health(cluster.router, "readiness", health_pb2.HealthCheckResponse.SERVING)
    old = {name: m.serials[name] for name in ("ledger", "keyvault", "router")}
    assert _served_serial(cluster.ledger.address, m) == old["ledger"]
    new_ca = ForeignCa.create("Platform Issuing CA 2")
    first_ca = m.first_ca

    async def load(stop: asyncio.Event, results: dict[str, int], errors: list[str]) -> None:
        # max_attempts=1: a call that fails is counted, never retried away.
        async with AsyncIgwClient(m.client(cluster.router.address, max_attempts=1, timeout=10)) as client:
            while not stop.is_set():
                try:
                    await client.get_budget()
                    results["ok"] += 1
                except IgwError as err:
                    errors.append(f"{err.code.name}: {err.message}")

    async def scenario() -> tuple[dict[str, int], list[str]]:
        results, errors = {"ok": 0}, []  # type: ignore[var-annotated]
        stop = asyncio.Event()
        workers = [asyncio.create_task(load(stop, results, errors)) for _ in range(4)]
        await asyncio.sleep(1.5)
        m.set_bundle([first_ca, new_ca])  # 1. trust both CAs
        await asyncio.sleep(2.5)
        m.issue_all(new_ca)  # 2. every leaf re-issued by the new CA (cert-manager renewal)
        await asyncio.sleep(3.0)
        m.set_bundle([new_ca])  # 3. the old CA is gone
        await asyncio.sleep(3.0)
        # A brand-new client (new connections, the new agent certificate) is served too.
        async with AsyncIgwClient(m.client(cluster.router.address, max_attempts=1)) as fresh:
            await fresh.list_models(timeout=10)
        stop.set()
        await asyncio.gather(*workers)
        return results, errors

    results, errors = asyncio.run(scenario())
    assert errors == []
    assert results["ok"] > 50
    # New connections get the new certificates, without any process restarting.
    assert _served_serial(cluster.ledger.address, m) == m.serials["ledger"] != old["ledger"]
    assert _served_serial(cluster.vault.address, m) == m.serials["keyvault"] != old["keyvault"]
    assert _served_serial(cluster.router.address, m) == m.serials["router"] != old["router"]
    for proc in (cluster.ledger, cluster.vault, cluster.router):
        assert proc.proc.poll() is None
        assert "TLS certificate reloaded from disk" in proc.log_text()
    # The router moved its ledger and vault channels to the new certificate.
    assert "TLS files changed: new channels to every replica" in cluster.router.log_text()
    # And the ledger no longer accepts a certificate of the old CA on a new connection.
    stale = m.root / "stale"
    stale.mkdir()
    cert, key, _ = first_ca.leaf(IDENTITIES["router"])
    (stale / "cert.pem").write_bytes(cert)
    (stale / "key.pem").write_bytes(key)
    (stale / "ca.pem").write_bytes(new_ca.pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(stale / "ca.pem"))
    ctx.load_cert_chain(str(stale / "cert.pem"), str(stale / "key.pem"))
    ctx.set_alpn_protocols(["h2"])
    host, port = cluster.ledger.address.rsplit(":", 1)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with socket.create_connection((host, int(port)), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            if not tls.recv(64):
                raise ConnectionError("closed")


def test_the_cli_checks_each_services_spiffe_id(cluster: Cluster) -> None:
    import subprocess
    import sys

    m = cluster.material
    d = m.dir("operator")
    env = {**os.environ, "IGW_TRUST_DOMAIN": TD}
    flags = ["--cert", str(d / "cert.pem"), "--key", str(d / "key.pem"), "--ca", str(d / "ca.pem"), "--json",
             "--timeout", "5"]

    def igw(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "services.cli.main", *args], env=env, capture_output=True,
                              text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])

    ok = igw("config", "show", "--address", cluster.router.address, *flags)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip()
    # The ledger's address, named as the router's: the CLI expects spiffe://<td>/router and refuses it.
    refused = igw("config", "show", "--address", cluster.ledger.address, *flags)
    assert refused.returncode != 0
    assert "UNAVAILABLE" in refused.stderr or "unavailable" in refused.stderr.lower()
    # The ledger checked as the ledger works (prices come from the ledger).
    prices = igw("prices", "list", "--address", cluster.ledger.address, *flags)
    assert prices.returncode == 0, prices.stderr

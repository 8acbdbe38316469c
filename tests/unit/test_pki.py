"""Tests for the dev PKI (igw_dev.pki: SPIFFE X.509-SVIDs) and the runtime's certificate checks."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import DNSName, PolicyBuilder, Store, VerificationError  # type: ignore[attr-defined]

from igw_dev import pki
from igw_dev.pki import issue, spiffe
from services.common import pki as pki_common

NOW = dt.datetime.now(dt.UTC)
IDS = [
    "spiffe://igw.local/router",
    "spiffe://igw.local/keyvault",
    "spiffe://igw.local/ledger",
    "spiffe://igw.local/team/demo/agent/quickstart",
    "spiffe://igw.local/operator/admin",
]
BAD_IDS = [
    "",
    "router",
    "http://igw.local/router",
    "SPIFFE://igw.local/router",
    "spiffe://",
    "spiffe:///router",
    "spiffe://igw.local",
    "spiffe://igw.local/",
    "spiffe://IGW.local/router",
    "spiffe://igw.local/router/",
    "spiffe://igw.local//router",
    "spiffe://igw.local/team/a b/agent/x",
    "spiffe://igw.local/team/../agent/x",
    "spiffe://igw.local/./router",
    "spiffe://igw.local/router?x=1",
    "spiffe://igw.local/router#frag",
    "spiffe://igw.local:8443/router",
    "spiffe://user@igw.local/router",
    "spiffe://igw.local/rout%65r",
    "spiffe://igw.local/" + "a" * 2100,
]


@pytest.fixture(scope="module")
def ca() -> tuple[bytes, bytes]:
    return pki.generate_ca()


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _uris(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------- CA / leaf


def test_generate_ca(ca: tuple[bytes, bytes]) -> None:
    cert = _cert(ca[0])
    key = serialization.load_pem_private_key(ca[1], password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign
    cert.verify_directly_issued_by(cert)
    now = dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=29) < cert.not_valid_after_utc - now <= dt.timedelta(days=30, minutes=1)


@pytest.mark.parametrize("spiffe_id", IDS)
def test_issue_cert_one_uri_san_and_chain(ca: tuple[bytes, bytes], spiffe_id: str) -> None:
    cert_pem, key_pem = pki.issue_cert(ca[0], ca[1], spiffe_id)
    cert, ca_cert = _cert(cert_pem), _cert(ca[0])
    assert _uris(cert) == [spiffe_id]
    cert.verify_directly_issued_by(ca_cert)

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    service = spiffe_id.count("/") == 3  # spiffe://<td>/<service>
    if service:
        # Its identity as a DNS name too (gRPC's native TLS checks that; services/router/pool.py).
        name = spiffe_id.split("/")[3] + "." + spiffe_id.split("/")[2] + ".spiffe.invalid"
        assert san.get_values_for_type(x509.DNSName) == [name, "localhost"]
        assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
        assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    else:  # agents and operators are clients only: their key cannot pose as a service
        assert san.get_values_for_type(x509.DNSName) == []
        assert san.get_values_for_type(x509.IPAddress) == []
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # backdated ~5 minutes, valid 7 days
    now = dt.datetime.now(dt.UTC)
    assert now - dt.timedelta(minutes=6) < cert.not_valid_before_utc <= now - dt.timedelta(minutes=4)
    assert dt.timedelta(days=6, hours=23) < cert.not_valid_after_utc - now <= dt.timedelta(days=7, minutes=1)

    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)

    # Full path validation, as a TLS client and as a TLS server on localhost.
    store = Store([ca_cert])
    client = PolicyBuilder().store(store).build_client_verifier().verify(cert, [])
    assert x509.UniformResourceIdentifier(spiffe_id) in (client.subjects or [])
    server = PolicyBuilder().store(store).build_server_verifier(DNSName("localhost"))
    if service:
        server.verify(cert, [])
    else:
        with pytest.raises(VerificationError):
            server.verify(cert, [])


def test_leaf_from_other_ca_does_not_verify(ca: tuple[bytes, bytes]) -> None:
    other = pki.generate_ca(common_name="other")
    cert_pem, _ = pki.issue_cert(other[0], other[1], IDS[0])
    with pytest.raises(Exception):  # noqa: B017 - InvalidSignature or ValueError
        _cert(cert_pem).verify_directly_issued_by(_cert(ca[0]))


def test_mismatched_ca_key_refused(ca: tuple[bytes, bytes]) -> None:
    other = pki.generate_ca()
    with pytest.raises(ValueError, match="does not match"):
        pki.issue_cert(ca[0], other[1], IDS[0])


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_spiffe_ids_refused(ca: tuple[bytes, bytes], bad: str) -> None:
    with pytest.raises(pki.InvalidSpiffeIdError):
        pki.issue_cert(ca[0], ca[1], bad)
    with pytest.raises(ValueError):  # InvalidSpiffeIdError is a ValueError
        pki.validate_spiffe_id(bad)


def test_parse_spiffe_id() -> None:
    parsed = pki.parse_spiffe_id("spiffe://igw.local/team/demo/agent/quick_start-1.0")
    assert parsed.trust_domain == "igw.local"
    assert parsed.segments == ("team", "demo", "agent", "quick_start-1.0")
    assert str(parsed) == "spiffe://igw.local/team/demo/agent/quick_start-1.0"


def test_test_only_bad_certs(ca: tuple[bytes, bytes]) -> None:
    two, _ = pki.issue_cert(ca[0], ca[1], IDS[0], extra_uri_sans=["spiffe://igw.local/ledger"])
    assert _uris(_cert(two)) == [IDS[0], "spiffe://igw.local/ledger"]
    assert pki.describe_cert(two).spiffe_id is None
    none, _ = pki.issue_cert(ca[0], ca[1], IDS[0], omit_spiffe_id=True)
    assert _uris(_cert(none)) == []
    assert pki.describe_cert(none).spiffe_ids == ()


def test_custom_sans(ca: tuple[bytes, bytes]) -> None:
    cert_pem, _ = pki.issue_cert(
        ca[0], ca[1], IDS[1], dns_names=("keyvault.internal",), ip_addresses=("::1", "10.0.0.7")
    )
    san = _cert(cert_pem).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [pki_common.identity_dns_name(IDS[1]), "keyvault.internal"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["::1", "10.0.0.7"]
    # Without the identity name, when asked (a certificate like cert-manager's with uris only).
    bare, _ = pki.issue_cert(ca[0], ca[1], IDS[1], dns_names=(), identity_name=False)
    assert _cert(bare).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == []


def test_a_service_identity_has_one_dns_name_under_invalid_and_nothing_else_has_one() -> None:
    assert pki_common.identity_dns_name("spiffe://igw.local/ledger") == "ledger.igw.local.spiffe.invalid"
    assert pki_common.identity_dns_name("spiffe://Example.ORG/keyvault") == "keyvault.example.org.spiffe.invalid"
    for not_a_service in ("spiffe://igw.local/team/t/agent/a", "spiffe://igw.local/operator/admin",
                          "spiffe://igw.local/", "spiffe:///ledger", "https://igw.local/ledger", ""):
        assert pki_common.identity_dns_name(not_a_service) is None


def test_leaf_clamped_to_ca_lifetime() -> None:
    short_ca = pki.generate_ca(valid_for=dt.timedelta(days=2))
    cert_pem, _ = pki.issue_cert(short_ca[0], short_ca[1], IDS[0], valid_for=dt.timedelta(days=7))
    assert _cert(cert_pem).not_valid_after_utc == _cert(short_ca[0]).not_valid_after_utc


# --------------------------------------------------------------------------- expiry


def test_describe_and_expired_detection(ca: tuple[bytes, bytes], tmp_path: Path) -> None:
    fresh, _ = pki.issue_cert(ca[0], ca[1], IDS[3])
    info = pki.describe_cert(fresh)
    assert info.spiffe_ids == (IDS[3],) and info.spiffe_id == IDS[3]
    assert not info.expired and not info.not_yet_valid and not info.is_ca
    assert dt.timedelta(days=6) < info.expires_in < dt.timedelta(days=7, minutes=1)
    assert pki.describe_cert(ca[0]).is_ca

    old, _ = pki.issue_cert(
        ca[0],
        ca[1],
        IDS[3],
        not_before=NOW - dt.timedelta(days=10),
        valid_for=dt.timedelta(days=1),
    )
    info = pki.describe_cert(old.decode())
    assert info.expired
    assert info.expires_in < dt.timedelta(0)

    path = tmp_path / "agent.pem"
    path.write_bytes(old)
    with pytest.raises(pki.CertificateExpiredError) as excinfo:
        pki.check_not_expired(path)
    msg = str(excinfo.value)
    expected_at = (NOW - dt.timedelta(days=9)).strftime("%Y-%m-%dT")
    assert msg.startswith(f"certificate {path} expired at {expected_at}")
    assert msg.endswith("Z (run `igw pki issue agent demo quickstart` to renew)")

    ok = tmp_path / "ok.pem"
    ok.write_bytes(fresh)
    pki.check_not_expired(ok)
    # ... but it is expired as seen from the future
    with pytest.raises(pki.CertificateExpiredError):
        pki.check_not_expired(ok, now=NOW + dt.timedelta(days=8))

    future, _ = pki.issue_cert(ca[0], ca[1], IDS[4], not_before=NOW + dt.timedelta(hours=1))
    later = tmp_path / "later.pem"
    later.write_bytes(future)
    with pytest.raises(pki.CertificateNotYetValidError, match="not valid before"):
        pki.check_not_expired(later)

    with pytest.raises(FileNotFoundError):
        pki.check_not_expired(tmp_path / "missing.pem")


def test_renew_hints(ca: tuple[bytes, bytes], tmp_path: Path) -> None:
    for spiffe_id, hint in [
        ("spiffe://igw.local/operator/alice", "`igw pki issue operator alice`"),
        ("spiffe://igw.local/router", "`igw pki issue ...`/`igw pki init`"),
    ]:
        pem, _ = pki.issue_cert(
            ca[0], ca[1], spiffe_id, not_before=NOW - dt.timedelta(days=3), valid_for=dt.timedelta(days=1)
        )
        path = tmp_path / "c.pem"
        path.write_bytes(pem)
        with pytest.raises(pki.CertificateExpiredError, match=rf"\(run {hint.replace('.', '[.]')}"):
            pki.check_not_expired(path)


# --------------------------------------------------------------------------- peer identity


def test_spiffe_ids_from_der_and_pem(ca: tuple[bytes, bytes]) -> None:
    pem, _ = pki.issue_cert(ca[0], ca[1], IDS[3], extra_uri_sans=["https://example.com/x"])
    der = _cert(pem).public_bytes(serialization.Encoding.DER)
    first = pki.spiffe_ids_from_der(der)
    assert first == [IDS[3]]
    first.append("mutated")  # callers get a copy, the cache is unaffected
    assert pki.spiffe_ids_from_der(der) == [IDS[3]]
    assert pki.spiffe_ids_from_pem(pem) == [IDS[3]]
    assert pki.spiffe_ids_from_pem(pem.decode()) == [IDS[3]]
    assert pki.spiffe_ids_from_der(b"not a certificate") == []
    assert pki.spiffe_ids_from_pem(b"junk") == []
    none_pem, _ = pki.issue_cert(ca[0], ca[1], IDS[3], omit_spiffe_id=True)
    assert pki.spiffe_ids_from_pem(none_pem) == []


def test_spiffe_ids_from_der_is_cached(ca: tuple[bytes, bytes]) -> None:
    pem, _ = pki.issue_cert(ca[0], ca[1], IDS[0])
    der = _cert(pem).public_bytes(serialization.Encoding.DER)
    pki.spiffe_ids_from_der(der)
    before = spiffe._spiffe_ids_from_der_cached.cache_info().hits
    for _ in range(100):
        pki.spiffe_ids_from_der(der)
    assert spiffe._spiffe_ids_from_der_cached.cache_info().hits == before + 100
    assert spiffe._spiffe_ids_from_der_cached.cache_info().maxsize == 4096


# --------------------------------------------------------------------------- on-disk PKI

LEAF_IDS = {
    "router": "spiffe://igw.local/router",
    "keyvault": "spiffe://igw.local/keyvault",
    "ledger": "spiffe://igw.local/ledger",
    "operator-admin": "spiffe://igw.local/operator/admin",
    "agent-demo-quickstart": "spiffe://igw.local/team/demo/agent/quickstart",
}


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.pem"))}


def test_init_dev_pki_layout(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    paths = pki.init_dev_pki(d)
    assert paths.ca_created
    assert set(paths.issued) == set(LEAF_IDS)
    assert paths.ca_cert == d / "ca.pem" and paths.ca_key == d / "ca-key.pem"
    assert _mode(paths.ca_key) == 0o600
    ca_cert = _cert(paths.ca_cert.read_bytes())
    assert {p.name for p in d.glob("*.pem")} == {"ca.pem", "ca-key.pem"} | {
        f"{n}{s}.pem" for n in LEAF_IDS for s in ("", "-key")
    }
    for name, leaf in paths.leaves().items():
        assert leaf.cert == d / f"{name}.pem" and leaf.key == d / f"{name}-key.pem"
        assert _mode(leaf.key) == 0o600
        cert = _cert(leaf.cert.read_bytes())
        assert _uris(cert) == [LEAF_IDS[name]]
        cert.verify_directly_issued_by(ca_cert)
        pki.check_not_expired(leaf.cert)
    assert paths.router.cert == d / "router.pem"
    assert paths.agent_demo.cert == d / "agent-demo-quickstart.pem"
    assert paths.operator_admin.key == d / "operator-admin-key.pem"


def test_init_dev_pki_idempotent(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    pki.init_dev_pki(d)
    before = _snapshot(d)
    again = pki.init_dev_pki(d)
    assert not again.ca_created and again.issued == ()
    assert _snapshot(d) == before

    # a missing leaf (or key) is re-issued alone, with the same CA
    (d / "ledger.pem").unlink()
    (d / "keyvault-key.pem").unlink()
    again = pki.init_dev_pki(d)
    assert not again.ca_created and set(again.issued) == {"ledger", "keyvault"}
    after = _snapshot(d)
    for name in ("ca.pem", "ca-key.pem", "router.pem", "router-key.pem"):
        assert after[name] == before[name]
    _cert(after["ledger.pem"]).verify_directly_issued_by(_cert(after["ca.pem"]))

    # a leaf expiring within a day is renewed
    soon, soon_key = pki.issue_cert(
        before["ca.pem"], before["ca-key.pem"], LEAF_IDS["router"], valid_for=dt.timedelta(hours=3)
    )
    (d / "router.pem").write_bytes(soon)
    (d / "router-key.pem").write_bytes(soon_key)
    assert pki.init_dev_pki(d).issued == ("router",)

    # loose key permissions are tightened
    (d / "router-key.pem").chmod(0o644)
    assert pki.init_dev_pki(d).issued == ()
    assert _mode(d / "router-key.pem") == 0o600


def test_init_dev_pki_replaces_expiring_ca(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    d.mkdir()
    old_ca = pki.generate_ca(valid_for=dt.timedelta(hours=12))
    (d / "ca.pem").write_bytes(old_ca[0])
    (d / "ca-key.pem").write_bytes(old_ca[1])
    paths = pki.init_dev_pki(d)
    assert paths.ca_created and set(paths.issued) == set(LEAF_IDS)
    assert paths.ca_cert.read_bytes() != old_ca[0]
    new_ca = _cert(paths.ca_cert.read_bytes())
    for leaf in paths.leaves().values():
        _cert(leaf.cert.read_bytes()).verify_directly_issued_by(new_ca)


def test_init_dev_pki_reissues_leaves_of_foreign_ca_and_trust_domain(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    pki.init_dev_pki(d)
    other = pki.generate_ca()
    foreign, foreign_key = pki.issue_cert(other[0], other[1], LEAF_IDS["ledger"])
    (d / "ledger.pem").write_bytes(foreign)
    (d / "ledger-key.pem").write_bytes(foreign_key)
    assert pki.init_dev_pki(d).issued == ("ledger",)

    moved = pki.init_dev_pki(d, trust_domain="example.org")
    assert not moved.ca_created and set(moved.issued) == set(LEAF_IDS)
    assert _uris(_cert(moved.router.cert.read_bytes())) == ["spiffe://example.org/router"]
    with pytest.raises(pki.InvalidSpiffeIdError):
        pki.init_dev_pki(d, trust_domain="Bad Domain")


def test_init_dev_pki_concurrent(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda _: pki.init_dev_pki(d), range(6)))
    assert sum(r.ca_created for r in results) == 1
    ca_cert = _cert((d / "ca.pem").read_bytes())
    for leaf in results[0].leaves().values():
        _cert(leaf.cert.read_bytes()).verify_directly_issued_by(ca_cert)
    assert not list(d.glob(".*.tmp"))


def test_issue_to_dir(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    with pytest.raises(FileNotFoundError, match="igw pki init"):
        pki.issue_to_dir(d, "agent", "red", "bot")
    pki.init_dev_pki(d)
    ca_cert = _cert((d / "ca.pem").read_bytes())

    cert_path, key_path = pki.issue_to_dir(d, "agent", "red", "bot-1")
    assert (cert_path, key_path) == (d / "agent-red-bot-1.pem", d / "agent-red-bot-1-key.pem")
    assert _uris(_cert(cert_path.read_bytes())) == ["spiffe://igw.local/team/red/agent/bot-1"]
    assert _mode(key_path) == 0o600
    _cert(cert_path.read_bytes()).verify_directly_issued_by(ca_cert)

    cert_path, _ = pki.issue_to_dir(d, "operator", "alice")
    assert cert_path == d / "operator-alice.pem"
    assert _uris(_cert(cert_path.read_bytes())) == ["spiffe://igw.local/operator/alice"]

    cert_path, _ = pki.issue_to_dir(d, "service", "router")
    assert cert_path == d / "router.pem"
    assert _uris(_cert(cert_path.read_bytes())) == ["spiffe://igw.local/router"]

    short, _ = pki.issue_to_dir(d, "operator", "bob", valid_for=dt.timedelta(hours=1))
    assert pki.describe_cert(short.read_bytes()).expires_in < dt.timedelta(hours=1)

    with pytest.raises(ValueError):
        pki.issue_to_dir(d, "agent", "only-team")
    with pytest.raises(ValueError):
        pki.issue_to_dir(d, "operator", "a", "b")
    with pytest.raises(pki.InvalidSpiffeIdError):
        pki.issue_to_dir(d, "agent", "red", "bad/name")
    with pytest.raises(pki.InvalidSpiffeIdError):
        pki.issue_to_dir(d, "operator", "..")
    with pytest.raises(ValueError):
        pki.issue_to_dir(d, "robot", "x")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- real mTLS


def test_certs_work_for_grpc_mtls(tmp_path: Path) -> None:
    """The issued files are accepted by gRPC (BoringSSL) for mutual TLS on localhost."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    paths = pki.init_dev_pki(tmp_path / "pki")
    seen: list[list[str]] = []

    class Health(health.HealthServicer):  # type: ignore[misc]
        def Check(
            self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
        ) -> health_pb2.HealthCheckResponse:
            pem = context.auth_context()["x509_pem_cert"][0]
            seen.append(pki.spiffe_ids_from_pem(pem))
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(Health(), server)
    server_creds = grpc.ssl_server_credentials(
        [(paths.ledger.key.read_bytes(), paths.ledger.cert.read_bytes())],
        root_certificates=paths.ca_cert.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("localhost:0", server_creds)
    server.start()
    try:
        creds = grpc.ssl_channel_credentials(
            root_certificates=paths.ca_cert.read_bytes(),
            private_key=paths.agent_demo.key.read_bytes(),
            certificate_chain=paths.agent_demo.cert.read_bytes(),
        )
        with grpc.secure_channel(f"localhost:{port}", creds) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert seen == [[LEAF_IDS["agent-demo-quickstart"]]]

        # a client certificate from another CA is rejected during the handshake
        other_dir = tmp_path / "other"
        other = pki.init_dev_pki(other_dir)
        bad = grpc.ssl_channel_credentials(
            root_certificates=paths.ca_cert.read_bytes(),
            private_key=other.agent_demo.key.read_bytes(),
            certificate_chain=other.agent_demo.cert.read_bytes(),
        )
        with grpc.secure_channel(f"localhost:{port}", bad) as channel:
            with pytest.raises(grpc.RpcError) as excinfo:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert excinfo.value.code() == grpc.StatusCode.UNAVAILABLE
        assert len(seen) == 1
    finally:
        server.stop(None)


def test_init_dev_pki_reissues_agent_leaves_made_under_the_old_server_capable_rule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    d = tmp_path / "pki"
    with monkeypatch.context() as m:  # how agent and operator leaves used to be issued
        old_rule = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        m.setattr(issue, "extended_key_usages", lambda server: old_rule)
        pki.init_dev_pki(d)
    old_eku = _cert((d / "agent-demo-quickstart.pem").read_bytes()).extensions.get_extension_for_class(
        x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in list(old_eku)
    again = pki.init_dev_pki(d)
    assert set(again.issued) == {"agent-demo-quickstart", "operator-admin"}
    for stem in again.issued:
        eku = _cert((d / f"{stem}.pem").read_bytes()).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]

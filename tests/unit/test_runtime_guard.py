"""The shared runtime's guard on a real mTLS server: a handler's unexpected exception is a
generic INTERNAL (its text never reaches the caller), and the trust domain is enforced."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from igw_dev import pki
from services.common.authz import ALL_KINDS, make_policy
from services.common.errors import error_info_from_rpc_error
from services.common.identity import Kind
from services.common.server import ServiceRuntime
from services.common.settings import RuntimeSettings
from services.common.tls import secure_channel

SECRET = "sk-should-never-leave-the-process"


async def _boom(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise RuntimeError(f"database said {SECRET}")


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


def _register(server: grpc.aio.Server) -> None:
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("igw.test.v1.Test", {
        "Boom": grpc.unary_unary_rpc_method_handler(_boom),
        "Echo": grpc.unary_unary_rpc_method_handler(_echo),
    })])


@asynccontextmanager
async def _runtime(paths: pki.PkiPaths, trust_domain: str) -> AsyncIterator[ServiceRuntime]:
    settings = RuntimeSettings.from_env("ledger", {
        "IGW_TLS_CERT": str(paths.ledger.cert), "IGW_TLS_KEY": str(paths.ledger.key),
        "IGW_TLS_CA": str(paths.ca_cert), "IGW_TRUST_DOMAIN": trust_domain, "IGW_GRACE_SECONDS": "1",
    })
    rt = ServiceRuntime(settings, policy=make_policy({"/igw.test.v1.Test/*": ALL_KINDS}),
                        registrars=[_register], service_names=["igw.test.v1.Test"])
    await rt.start()
    try:
        yield rt
    finally:
        await rt.stop()


async def _call(rt: ServiceRuntime, paths: pki.PkiPaths, method: str) -> bytes:
    agent = paths.agent_demo
    async with secure_channel(f"127.0.0.1:{rt.port}", agent.cert, agent.key, paths.ca_cert) as channel:
        result: bytes = await channel.unary_unary(f"/igw.test.v1.Test/{method}")(b"hello", timeout=5)
        return result


async def test_an_unexpected_exception_is_a_generic_internal_error(tmp_path: Path) -> None:
    paths = pki.init_dev_pki(tmp_path / "pki")
    async with _runtime(paths, "igw.local") as rt:
        assert await _call(rt, paths, "Echo") == b"hello"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _call(rt, paths, "Boom")
    err = info.value
    assert err.code() == grpc.StatusCode.INTERNAL
    assert SECRET not in (err.details() or "") and "database said" not in (err.details() or "")
    assert SECRET not in repr(err.trailing_metadata())


async def test_a_caller_from_another_trust_domain_is_refused(tmp_path: Path) -> None:
    paths = pki.init_dev_pki(tmp_path / "pki")  # certificates of igw.local
    async with _runtime(paths, "example.org") as rt:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _call(rt, paths, "Echo")
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    reason = error_info_from_rpc_error(info.value)
    assert reason is not None and reason.reason


def _mint(paths: pki.PkiPaths, tmp_path: Path, spiffe_id: str, *, ca: bool, key_cert_sign: bool) -> pki.CertKeyPaths:
    """A certificate signed by the dev CA, carrying one SPIFFE URI SAN, with the CA bits asked for."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intermediate")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=key_cert_sign,
                                     crl_sign=key_cert_sign, encipher_only=False, decipher_only=False),
                       critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    stem = f"minted-{ca}-{key_cert_sign}"
    out = pki.CertKeyPaths(tmp_path / f"{stem}.pem", tmp_path / f"{stem}-key.pem")
    out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return out


@pytest.mark.parametrize(("ca", "key_cert_sign"), [(True, True), (True, False), (False, True)])
async def test_a_ca_certificate_is_never_a_peer_identity(tmp_path: Path, ca: bool, key_cert_sign: bool) -> None:
    """A certificate that may sign others (cA=TRUE or keyCertSign), chained to our CA and naming
    the router, is refused before any handler runs; the same certificate without the CA bits
    is the router."""
    paths = pki.init_dev_pki(tmp_path / "pki")
    posing = _mint(paths, tmp_path, "spiffe://igw.local/router", ca=ca, key_cert_sign=key_cert_sign)
    honest = _mint(paths, tmp_path, "spiffe://igw.local/router", ca=False, key_cert_sign=False)
    async with _runtime(paths, "igw.local") as rt:
        async with secure_channel(f"127.0.0.1:{rt.port}", honest.cert, honest.key, paths.ca_cert) as channel:
            assert await channel.unary_unary("/igw.test.v1.Test/Echo")(b"hi", timeout=5) == b"hi"
        async with secure_channel(f"127.0.0.1:{rt.port}", posing.cert, posing.key, paths.ca_cert) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary("/igw.test.v1.Test/Echo")(b"hi", timeout=5)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    detail = error_info_from_rpc_error(info.value)
    assert detail is not None and detail.reason == "CA_CERTIFICATE"


async def _typed(request: Any, context: grpc.aio.ServicerContext) -> bytes:
    assert isinstance(request, health_pb2.HealthCheckRequest)  # decoded before the handler
    return request.service.encode()


@asynccontextmanager
async def _typed_runtime(paths: pki.PkiPaths) -> AsyncIterator[ServiceRuntime]:
    settings = RuntimeSettings.from_env("ledger", {
        "IGW_TLS_CERT": str(paths.ledger.cert), "IGW_TLS_KEY": str(paths.ledger.key),
        "IGW_TLS_CA": str(paths.ca_cert), "IGW_GRACE_SECONDS": "1",
    })

    def register(server: grpc.aio.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(
            _typed, request_deserializer=health_pb2.HealthCheckRequest.FromString)
        stream = grpc.unary_stream_rpc_method_handler(
            _typed_stream, request_deserializer=health_pb2.HealthCheckRequest.FromString)
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "igw.test.v1.Typed", {"Call": handler, "Stream": stream})])

    rt = ServiceRuntime(settings, policy=make_policy({"/igw.test.v1.Typed/*": {Kind.ROUTER}}),
                        registrars=[register], service_names=["igw.test.v1.Typed"])
    await rt.start()
    try:
        yield rt
    finally:
        await rt.stop()


async def _typed_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    assert isinstance(request, health_pb2.HealthCheckRequest)
    yield request.service.encode()


GARBAGE = b"\xff\xff\xff\xff\x0f\x0a\x80"


@pytest.mark.parametrize("method", ["Call", "Stream"])
async def test_garbage_bytes_are_invalid_argument_and_a_denied_caller_is_refused_before_parsing(
    tmp_path: Path, method: str
) -> None:
    paths = pki.init_dev_pki(tmp_path / "pki")

    async def call(who: pki.CertKeyPaths, body: bytes) -> list[bytes]:
        async with secure_channel(f"127.0.0.1:{rt.port}", who.cert, who.key, paths.ca_cert) as channel:
            if method == "Call":
                return [await channel.unary_unary("/igw.test.v1.Typed/Call")(body, timeout=5)]
            return [m async for m in channel.unary_stream("/igw.test.v1.Typed/Stream")(body, timeout=5)]

    good = health_pb2.HealthCheckRequest(service="svc").SerializeToString()
    async with _typed_runtime(paths) as rt:
        assert await call(paths.router, good) == [b"svc"]
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await call(paths.router, GARBAGE)
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await call(paths.agent_demo, GARBAGE)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info_from_rpc_error(bad.value)
    assert info is not None and info.reason == "MALFORMED_REQUEST" and info.metadata["method"].endswith(method)
    assert "DecodeError" not in (bad.value.details() or "") and "parse" not in (bad.value.details() or "").lower()
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    denied_info = error_info_from_rpc_error(denied.value)
    assert denied_info is not None and denied_info.reason == "METHOD_NOT_ALLOWED"


async def test_a_call_arriving_while_the_service_drains_is_unavailable_draining(tmp_path: Path) -> None:
    """Once a stop begins, a new call is refused at once with a reason clients retry elsewhere,
    while health still answers (NOT_SERVING) so probes see the drain."""
    paths = pki.init_dev_pki(tmp_path / "pki")
    async with _runtime(paths, "igw.local") as rt:
        assert await _call(rt, paths, "Echo") == b"hello"
        rt.guard.draining = True  # what stop() sets before it closes the port
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _call(rt, paths, "Echo")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        info = error_info_from_rpc_error(err.value)
        assert info is not None and info.reason == "DRAINING"
        agent = paths.agent_demo
        async with secure_channel(f"127.0.0.1:{rt.port}", agent.cert, agent.key, paths.ca_cert) as channel:
            reply = await channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)

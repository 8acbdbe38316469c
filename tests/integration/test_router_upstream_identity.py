"""How the router checks a ledger or vault replica's identity: gRPC's own TLS when the replica's
certificate states its identity as a DNS name, else the Python tunnel (services/router/upstream_tls.py).

Real in-process gRPC servers (health only) over real mTLS, with certificates minted per test.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from igw.client._spiffe import TlsFiles
from services.common.pki import identity_dns_name
from services.common.tls import server_credentials
from services.router.pool import ReplicaPool
from services.router.upstream_tls import native_channel, probe
from tests.integration.identity_certs import new_ca

NAME = "igw.ledger.v1.LedgerService"
LEDGER = "spiffe://igw.local/ledger"
KEYVAULT = "spiffe://igw.local/keyvault"


@pytest.fixture
def tls(tmp_path: Path) -> Path:
    mint = new_ca(tmp_path)

    mint("router", "spiffe://igw.local/router")
    mint("ledger", LEDGER, dns_names=())  # URI SAN and the identity's DNS name (as igw pki issues)
    mint("ledger-uri-only", LEDGER, dns_names=(), identity_name=False)  # as cert-manager with uris only
    # The vault's identity with the ledger's DNS name added: a certificate that lies about one of them.
    mint("vault-named-ledger", KEYVAULT, dns_names=(identity_dns_name(LEDGER),))
    mint("keyvault", KEYVAULT, dns_names=())
    return tmp_path


class Server:
    """A health-only gRPC server on the mTLS port presenting ``stem``'s certificate."""

    def __init__(self, d: Path, stem: str, port: int = 0) -> None:
        self.health = HealthServicer()
        self.server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        creds = server_credentials(d / f"{stem}.pem", d / f"{stem}-key.pem", d / "ca.pem")
        self.port = self.server.add_secure_port(f"127.0.0.1:{port}", creds)
        self.address = f"127.0.0.1:{self.port}"

    async def start(self) -> Server:
        await self.server.start()
        await self.health.set(NAME, health_pb2.HealthCheckResponse.SERVING)
        return self


def _files(d: Path) -> TlsFiles:
    return TlsFiles(d / "router.pem", d / "router-key.pem", d / "ca.pem")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _serving(ch: grpc.aio.Channel) -> bool:
    resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=NAME), timeout=5)
    return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


async def _pool(tls: Path, address: str, **kw: object) -> ReplicaPool:
    pool = ReplicaPool("ledger", [address], LEDGER, _files(tls), NAME, check_interval_s=0.2, **kw)  # type: ignore[arg-type]
    await pool.start()
    return pool


async def test_the_probe_tells_a_named_identity_from_a_uri_only_one_and_refuses_an_impostor(tls: Path) -> None:
    servers = {s: await Server(tls, s).start() for s in ("ledger", "ledger-uri-only", "vault-named-ledger")}
    try:
        assert (await probe(servers["ledger"].address, LEDGER, _files(tls))).verdict == "native"
        assert (await probe(servers["ledger-uri-only"].address, LEDGER, _files(tls))).verdict == "tunnel"
        lie = await probe(servers["vault-named-ledger"].address, LEDGER, _files(tls))
        assert lie.verdict == "refused" and KEYVAULT in lie.why
        assert (await probe(f"127.0.0.1:{_free_port()}", LEDGER, _files(tls))).verdict == "unreachable"
    finally:
        for s in servers.values():
            await s.server.stop(0)


async def test_the_native_channel_admits_only_a_certificate_with_the_identitys_dns_name(tls: Path) -> None:
    servers = {s: await Server(tls, s).start() for s in ("ledger", "ledger-uri-only", "keyvault")}
    try:
        async with native_channel(servers["ledger"].address, _files(tls), LEDGER) as ch:
            assert await _serving(ch)
        for wrong in ("ledger-uri-only", "keyvault"):  # no name at all; another service's name
            async with native_channel(servers[wrong].address, _files(tls), LEDGER) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await _serving(ch)
                assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(ValueError):
            native_channel(servers["ledger"].address, _files(tls), "spiffe://igw.local/team/t/agent/a")
    finally:
        for s in servers.values():
            await s.server.stop(0)


@pytest.mark.parametrize(("stem", "check", "mode"), [
    ("ledger", "auto", "native"),
    ("ledger-uri-only", "auto", "tunnel"),
    ("ledger", "uri", "tunnel"),
])
async def test_the_pool_uses_native_tls_only_for_a_named_identity_unless_told_uri(
    tls: Path, stem: str, check: str, mode: str,
) -> None:
    server = await Server(tls, stem).start()
    pool = await _pool(tls, server.address, identity_check=check)
    try:
        (rep,) = pool.replicas.values()
        assert (rep.mode, rep.tunnel is None) == (mode, mode == "native")
        assert pool.ready()
        stub = pool.stub(health_pb2_grpc.HealthStub)
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=NAME), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await pool.close()
        await server.server.stop(0)


async def test_an_impostor_carrying_the_ledgers_dns_name_is_refused_by_the_pool(tls: Path) -> None:
    impostor = await Server(tls, "vault-named-ledger").start()
    pool = await _pool(tls, impostor.address)
    try:
        await asyncio.sleep(0.6)
        (rep,) = pool.replicas.values()
        assert rep.mode == "tunnel" and not pool.ready()
        assert rep.tunnel is not None and rep.tunnel.refusals >= 1
    finally:
        await pool.close()
        await impostor.server.stop(0)


async def test_a_replica_down_at_start_gets_native_tls_once_it_is_up(tls: Path) -> None:
    port = _free_port()
    pool = await _pool(tls, f"127.0.0.1:{port}")
    server = None
    try:
        (rep,) = pool.replicas.values()
        assert (rep.mode, rep.decided, pool.ready()) == ("tunnel", False, False)
        server = await Server(tls, "ledger", port).start()
        for _ in range(50):
            if rep.mode == "native" and pool.ready():
                break
            await asyncio.sleep(0.1)
        assert (rep.mode, rep.decided, pool.ready()) == ("native", True, True)
    finally:
        await pool.close()
        if server is not None:
            await server.server.stop(0)


async def test_a_native_replica_rotated_to_a_uri_only_certificate_falls_back_to_the_tunnel(tls: Path) -> None:
    first = await Server(tls, "ledger").start()
    pool = await _pool(tls, first.address)
    second = None
    try:
        (rep,) = pool.replicas.values()
        assert rep.mode == "native" and pool.ready()
        # The replica restarts on the same port with a certificate that has no DNS name (the
        # native check now fails every handshake): after a few failed checks it is probed again.
        await first.server.stop(0)
        second = await Server(tls, "ledger-uri-only", first.port).start()
        for _ in range(60):
            if rep.mode == "tunnel" and pool.ready():
                break
            await asyncio.sleep(0.1)
        assert rep.mode == "tunnel" and pool.ready()
    finally:
        await pool.close()
        if second is not None:
            await second.server.stop(0)


async def test_replicas_that_never_answer_the_handshake_delay_neither_start_nor_the_others(tls: Path) -> None:
    ledger = await Server(tls, "ledger").start()
    # Three listeners that accept TCP connections (the kernel's backlog) and never say a TLS word.
    silent = [socket.socket() for _ in range(3)]
    for s in silent:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
    mute = [f"127.0.0.1:{s.getsockname()[1]}" for s in silent]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    pool = ReplicaPool("ledger", [ledger.address, *mute], LEDGER, _files(tls), NAME, check_interval_s=0.2,
                       probe_timeout_s=1.0)
    await pool.start()
    try:
        assert loop.time() - t0 < 2.5  # probed side by side: one timeout, not one per replica (3 s)
        reps = pool.replicas
        assert reps[ledger.address].mode == "native"
        assert {(reps[m].mode, reps[m].decided) for m in mute} == {("tunnel", False)}
        # The silent replicas are probed again every round (each waits its timeout); meanwhile the
        # health checks go on and every call lands on the ledger that answers.
        await asyncio.sleep(1.5)
        assert pool.ready() and pool.healthy_count() == 1
        assert {pool.pick().address for _ in range(10)} == {ledger.address}
    finally:
        await pool.close()
        for s in silent:
            s.close()
        await ledger.server.stop(0)

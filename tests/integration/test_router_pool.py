"""The router's replica pool and the SPIFFE tunnel, against real gRPC servers over real mTLS.

In-process servers (health only) with certificates that carry nothing but their URI SAN.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from igw.client._spiffe import SpiffeTunnel, TlsFiles
from igw_dev.pki import generate_ca, issue_cert
from services.common.tls import ServerCertFiles, server_credentials
from services.router.pool import ReplicaPool

NAME = "igw.ledger.v1.LedgerService"


def _mint(d: Path, stem: str, ca: tuple[bytes, bytes], spiffe_id: str) -> None:
    cert, key = issue_cert(ca[0], ca[1], spiffe_id, dns_names=(), ip_addresses=())
    (d / f"{stem}.pem").write_bytes(cert)
    (d / f"{stem}-key.pem").write_bytes(key)


@pytest.fixture
def tls(tmp_path: Path) -> Path:
    ca = generate_ca()
    (tmp_path / "ca.pem").write_bytes(ca[0])
    for stem in ("ledger", "keyvault", "router"):
        _mint(tmp_path, stem, ca, f"spiffe://igw.local/{stem}")
    # The right name from a CA nobody trusts.
    _mint(tmp_path, "stranger", generate_ca(), "spiffe://igw.local/ledger")
    return tmp_path


class Replica:
    """A health-only gRPC server on the mTLS port, presenting ``stem``'s certificate."""

    def __init__(self, d: Path, stem: str, health: HealthServicer | None = None) -> None:
        self.health = health or HealthServicer()
        self.server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        creds = server_credentials(d / f"{stem}.pem", d / f"{stem}-key.pem", d / "ca.pem")
        self.port = self.server.add_secure_port("127.0.0.1:0", creds)
        self.address = f"127.0.0.1:{self.port}"

    async def start(self, serving: bool = True) -> Replica:
        await self.server.start()
        await self.set(serving)
        return self

    async def set(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set(NAME, status)


def _files(d: Path) -> TlsFiles:
    return TlsFiles(d / "router.pem", d / "router-key.pem", d / "ca.pem")


async def _check(target: str) -> int:
    async with grpc.aio.insecure_channel(target) as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=NAME), timeout=5)
        return int(resp.status)


async def test_the_tunnel_admits_only_the_expected_spiffe_id(tls: Path) -> None:
    ledger = await Replica(tls, "ledger").start()
    vault = await Replica(tls, "keyvault").start()
    stranger = await Replica(tls, "stranger").start()
    good = SpiffeTunnel(ledger.address, "spiffe://igw.local/ledger", _files(tls))
    posing = SpiffeTunnel(vault.address, "spiffe://igw.local/ledger", _files(tls))
    untrusted = SpiffeTunnel(stranger.address, "spiffe://igw.local/ledger", _files(tls))
    for t in (good, posing, untrusted):
        await t.start()
    try:
        assert await _check(good.target) == health_pb2.HealthCheckResponse.SERVING
        for bad in (posing, untrusted):
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await _check(bad.target)
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
            assert bad.refusals >= 1
        assert good.refusals == 0
    finally:
        for t in (good, posing, untrusted):
            await t.close()
        for r in (ledger, vault, stranger):
            await r.server.stop(0)


def test_a_half_written_rotation_keeps_the_previous_material(tls: Path) -> None:
    files = _files(tls)
    first = files.context()
    server = ServerCertFiles(tls / "ledger.pem", tls / "ledger-key.pem", tls / "ca.pem")
    assert server.fetch() is None  # nothing changed
    # A new key lands before its certificate: both sides keep what they had.
    other = generate_ca()
    _, new_key = issue_cert(other[0], other[1], "spiffe://igw.local/router", dns_names=(), ip_addresses=())
    (tls / "router-key.pem").write_bytes(new_key)
    (tls / "ledger-key.pem").write_bytes(new_key)
    assert files.context() is first
    assert server.fetch() is None
    # The matching certificate arrives: both pick up the new pair.
    cert, key = issue_cert(other[0], other[1], "spiffe://igw.local/router", dns_names=(), ip_addresses=())
    (tls / "router.pem").write_bytes(cert)
    (tls / "router-key.pem").write_bytes(key)
    (tls / "ledger.pem").write_bytes(cert)
    (tls / "ledger-key.pem").write_bytes(key)
    assert files.context() is not first and files.loads == 2
    assert server.fetch() is not None and server.loads == 2


async def test_the_pool_spreads_calls_and_skips_dead_and_unready_replicas(tls: Path) -> None:
    replicas = [await Replica(tls, "ledger").start() for _ in range(3)]
    pool = ReplicaPool("ledger", [r.address for r in replicas], "spiffe://igw.local/ledger", _files(tls), NAME,
                       check_interval_s=0.2)
    await pool.start()
    try:
        assert pool.ready() and pool.healthy_count() == 3
        picked = {pool.pick().address for _ in range(30)}
        assert picked == {r.address for r in replicas}  # round-robin over all three

        await replicas[0].set(False)  # not ready (e.g. lost its database)
        await replicas[1].server.stop(0)  # dead
        await asyncio.sleep(1.0)
        assert {pool.pick().address for _ in range(20)} == {replicas[2].address}
        assert pool.healthy_count() == 1
        stub = pool.stub(health_pb2_grpc.HealthStub)
        for _ in range(10):  # every call lands on the one healthy replica
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=NAME), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING

        await replicas[2].set(False)
        await asyncio.sleep(0.8)
        assert not pool.ready()
        await replicas[0].set(True)
        await asyncio.sleep(0.8)
        assert pool.ready() and {pool.pick().address for _ in range(10)} == {replicas[0].address}
    finally:
        await pool.close()
        for r in replicas:
            await r.server.stop(0)


async def test_the_pool_refuses_a_replica_that_is_not_the_ledger(tls: Path) -> None:
    impostor = await Replica(tls, "keyvault").start()
    pool = ReplicaPool("ledger", [impostor.address], "spiffe://igw.local/ledger", _files(tls), NAME,
                       check_interval_s=0.2)
    await pool.start()
    try:
        await asyncio.sleep(0.5)
        assert not pool.ready()
        rep = next(iter(pool.replicas.values()))
        assert rep.tunnel.refusals >= 1
    finally:
        await pool.close()
        await impostor.server.stop(0)


async def test_a_host_name_becomes_one_replica_per_address(tls: Path) -> None:
    ledger = await Replica(tls, "ledger").start()
    # "localhost" as a headless Service would be: resolved (IPv4 preferred), one replica per address.
    pool = ReplicaPool("ledger", [f"localhost:{ledger.port}"], "spiffe://igw.local/ledger", _files(tls), NAME,
                       check_interval_s=0.2)
    await pool.start()
    try:
        assert list(pool.replicas) == [f"127.0.0.1:{ledger.port}"]
        assert pool.ready()
    finally:
        await pool.close()
        await ledger.server.stop(0)


async def test_secure_channel_with_an_expected_id_checks_it(tls: Path) -> None:
    from services.common.tls import secure_channel

    ledger = await Replica(tls, "ledger").start()
    files = (tls / "router.pem", tls / "router-key.pem", tls / "ca.pem")
    try:
        async with secure_channel(ledger.address, *files, expected_id="spiffe://igw.local/ledger") as ch:
            resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=NAME), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        async with secure_channel(ledger.address, *files, expected_id="spiffe://igw.local/keyvault") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=NAME), timeout=5)
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await ledger.server.stop(0)


class CountingHealth(HealthServicer):
    """A health servicer that counts ``Check`` and ``Watch`` calls; ``hang`` makes ``Check`` stall
    (a replica whose event loop answers streams it has but not new calls), ``short_watch`` ends each
    ``Watch`` after its first answer (what a connection that ages out does to a stream)."""

    def __init__(self) -> None:
        super().__init__()
        self.checks = self.watches = 0
        self.hang = self.short_watch = False

    async def Check(self, request, context):  # type: ignore[no-untyped-def]
        self.checks += 1
        if self.hang:
            await asyncio.sleep(30)
        return await super().Check(request, context)

    async def Watch(self, request, context):  # type: ignore[no-untyped-def]
        self.watches += 1
        if self.short_watch:
            await context.write(health_pb2.HealthCheckResponse(status=self._server_status[request.service]))
            return
        await super().Watch(request, context)


async def _until(cond, timeout: float) -> float:  # type: ignore[no-untyped-def]
    """Seconds until ``cond()`` holds (polled every 10 ms); fails after ``timeout``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not cond():
        assert loop.time() - start < timeout, "condition not reached in time"
        await asyncio.sleep(0.01)
    return loop.time() - start


@contextlib.asynccontextmanager
async def _one_replica_pool(
    tls: Path, health: CountingHealth, **intervals: float
) -> AsyncIterator[tuple[Replica, ReplicaPool]]:
    """A ledger replica with ``health`` and a started pool over it (closed, and the replica stopped, after)."""
    ledger = await Replica(tls, "ledger", health).start()
    pool = ReplicaPool("ledger", [ledger.address], "spiffe://igw.local/ledger", _files(tls), NAME, **intervals)
    await pool.start()
    try:
        yield ledger, pool
    finally:
        await pool.close()
        await ledger.server.stop(0)


async def test_the_pool_follows_pushed_health_and_polls_nothing_while_nothing_changes(tls: Path) -> None:
    health = CountingHealth()
    # A check round every 2 s, liveness checks every minute: anything faster is the Watch stream.
    async with _one_replica_pool(tls, health, check_interval_s=2.0, liveness_interval_s=60.0) as (ledger, pool):
        assert pool.ready()
        await _until(lambda: next(iter(pool.replicas.values())).watching, 2.0)
        checks = health.checks
        await asyncio.sleep(3.0)  # one check round passes: the watched, healthy replica is not checked
        assert health.checks == checks
        assert health.watches == 1

        await ledger.set(False)  # it loses its database: the pool knows well before a check round
        assert await _until(lambda: not pool.ready(), 1.0) < 1.0
        await ledger.set(True)
        assert await _until(pool.ready, 1.0) < 1.0
        assert health.checks == checks


async def test_a_replica_that_hangs_with_its_stream_open_drops_out_at_the_liveness_check(tls: Path) -> None:
    health = CountingHealth()
    async with _one_replica_pool(tls, health, check_interval_s=0.2, liveness_interval_s=0.6) as (_, pool):
        await _until(lambda: next(iter(pool.replicas.values())).watching, 2.0)
        health.hang = True  # the stream stays open and says SERVING; new calls stall
        # At most a liveness interval, a round and the check's 1 s timeout.
        await _until(lambda: not pool.ready(), 3.0)
        health.hang = False
        await _until(pool.ready, 3.0)


async def test_a_stream_that_ends_keeps_a_serving_replica_in_the_pool(tls: Path) -> None:
    health = CountingHealth()
    health.short_watch = True
    async with _one_replica_pool(tls, health, check_interval_s=0.2, liveness_interval_s=60.0) as (_, pool):
        loop = asyncio.get_running_loop()
        end = loop.time() + 2.0
        while loop.time() < end:  # never out of the pool while its streams keep ending
            assert pool.ready()
            await asyncio.sleep(0.01)
        assert health.watches >= 4  # each ended stream is opened again
        assert health.checks >= 4  # and the replica checked meanwhile

"""Certificate roles over real TLS: a service certificate can serve, an agent's cannot pose as a service."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from igw_dev import pki
from services.common.tls import secure_channel, server_credentials


async def _check(paths: pki.PkiPaths, serve_as: pki.CertKeyPaths) -> grpc.StatusCode:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(serve_as.cert, serve_as.key, paths.ca_cert))
    await server.start()
    try:
        router = paths.router
        async with secure_channel(f"127.0.0.1:{port}", router.cert, router.key, paths.ca_cert) as channel:
            try:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
            except grpc.aio.AioRpcError as err:
                return err.code()
            return grpc.StatusCode.OK
    finally:
        await server.stop(None)


@pytest.fixture
def dev_pki(tmp_path: Path) -> pki.PkiPaths:
    return pki.init_dev_pki(tmp_path / "pki")


async def test_a_service_certificate_serves(dev_pki: pki.PkiPaths) -> None:
    assert await _check(dev_pki, dev_pki.ledger) == grpc.StatusCode.OK


@pytest.mark.parametrize("who", ["agent_demo", "operator_admin"])
async def test_an_agent_or_operator_certificate_cannot_pose_as_a_service(dev_pki: pki.PkiPaths, who: str) -> None:
    assert await _check(dev_pki, getattr(dev_pki, who)) == grpc.StatusCode.UNAVAILABLE

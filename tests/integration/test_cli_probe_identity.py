"""`igw probe --tls --server-id`: the health check over mTLS checks the server's SPIFFE id."""

from __future__ import annotations

from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from igw_dev.pki import generate_ca, issue_cert
from services.cli.main import main
from services.common.tls import server_credentials


def test_probe_over_mtls_checks_the_servers_spiffe_id(tmp_path: Path) -> None:
    ca = generate_ca()
    (tmp_path / "ca.pem").write_bytes(ca[0])
    for stem, sid in (("ledger", "spiffe://igw.local/ledger"), ("op", "spiffe://igw.local/operator/ops")):
        cert, key = issue_cert(ca[0], ca[1], sid, dns_names=(), ip_addresses=())  # URI SAN only
        (tmp_path / f"{stem}.pem").write_bytes(cert)
        (tmp_path / f"{stem}-key.pem").write_bytes(key)
    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    servicer.set("readiness", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(
        tmp_path / "ledger.pem", tmp_path / "ledger-key.pem", tmp_path / "ca.pem"))
    server.start()
    try:
        common = ["probe", f"127.0.0.1:{port}", "readiness", "--tls", "--cert", str(tmp_path / "op.pem"),
                  "--key", str(tmp_path / "op-key.pem"), "--ca", str(tmp_path / "ca.pem"), "--connect-timeout", "3"]
        assert main([*common, "--server-id", "spiffe://igw.local/ledger"]) == 0
        assert main([*common, "--server-id", "spiffe://igw.local/router"]) == 2  # refused: connection failure
    finally:
        server.stop(0)

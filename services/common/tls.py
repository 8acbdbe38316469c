"""mTLS credentials. Servers *require* a client certificate; gRPC's default does not."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import grpc

# Long-lived channels: keepalive so a dead peer is noticed, no per-call handshakes.
CHANNEL_OPTIONS: tuple[tuple[str, int | str], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 32 * 1024 * 1024),
    ("grpc.enable_retries", 1),
    # Spread calls over every address a name resolves to (a headless Service gives one per ready pod).
    ("grpc.lb_policy_name", "round_robin"),
)

SERVER_OPTIONS: tuple[tuple[str, int | str], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 32 * 1024 * 1024),
    ("grpc.so_reuseport", 0),
    # Clients reconnect (and re-resolve, so they find new replicas) every 5 minutes; calls in flight get
    # 150 s more, longer than a call's total timeout.
    ("grpc.max_connection_age_ms", 300_000),
    ("grpc.max_connection_age_grace_ms", 150_000),
)


def server_credentials(cert: Path, key: Path, ca: Path) -> grpc.ServerCredentials:
    """Server TLS that rejects any client without a certificate chained to ``ca``."""
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=ca.read_bytes(),
        require_client_auth=True,
    )


def channel_credentials(cert: Path, key: Path, ca: Path) -> grpc.ChannelCredentials:
    """Client TLS presenting ``cert`` and trusting only ``ca``."""
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(), private_key=key.read_bytes(), certificate_chain=cert.read_bytes()
    )


def secure_channel(
    target: str, cert: Path, key: Path, ca: Path, *, server_name: str = "localhost",
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """An aio mTLS channel to another igw service (or the router, for clients)."""
    options = (*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", server_name))
    return grpc.aio.secure_channel(
        target, channel_credentials(cert, key, ca), options=options, interceptors=list(interceptors) or None
    )

"""mTLS credentials. Servers *require* a client certificate; gRPC's default does not.

Both sides follow their files on disk, so cert-manager or SPIRE may rotate certificate, key
or CA bundle at any time without a restart:

- servers use gRPC's dynamic SSL credentials: every new handshake asks
  :class:`ServerCertFiles` for the current material, re-read only when a file changed;
- clients that know the SPIFFE id they expect (the router to the ledger and the vault, the
  CLI and the typed client to the router) connect through :mod:`igw.client._spiffe`, which
  checks the server's URI SAN on every connection and reloads the files for new connections.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from igw.client._spiffe import SpiffeTunnel, TlsFiles

_LOGGER = logging.getLogger(__name__)

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


def _stamps(paths: Sequence[Path]) -> tuple[tuple[int, int, int], ...]:
    out = []
    for p in paths:
        st = p.stat()
        out.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


def _check_pair(cert_pem: bytes, key_pem: bytes, ca_pem: bytes) -> None:
    """Raises ValueError unless the key belongs to the certificate and the CA bundle parses."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    if cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise ValueError("the key does not belong to the certificate")
    if not x509.load_pem_x509_certificates(ca_pem):
        raise ValueError("the CA bundle holds no certificate")


class ServerCertFiles:
    """A server's certificate, key and CA bundle, re-read when they change on disk.

    gRPC calls :meth:`fetch` before each new TLS handshake; it stats the three files and
    returns new material only when they changed and agree with each other (a rotation caught
    half-written keeps the previous material until it is complete).
    """

    def __init__(self, cert: Path, key: Path, ca: Path) -> None:
        self.paths = (cert, key, ca)
        self._lock = threading.Lock()
        self._stamps = _stamps(self.paths)
        self.loads = 0
        self.initial = self._config()

    def _config(self) -> grpc.ServerCertificateConfiguration:
        cert, key, ca = (p.read_bytes() for p in self.paths)
        _check_pair(cert, key, ca)
        self.loads += 1
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """New material when the files changed (and are consistent), else None (keep the current)."""
        with self._lock:
            try:
                stamps = _stamps(self.paths)
                if stamps == self._stamps:
                    return None
                config = self._config()
            except Exception as err:  # never fail a handshake over a rotation in progress
                _LOGGER.warning("TLS files changed but do not load yet; serving with the previous ones",
                                extra={"error": str(err)})
                return None
            self._stamps = stamps
            _LOGGER.info("TLS certificate reloaded from disk", extra={"cert": str(self.paths[0])})
            return config


def server_credentials(cert: Path, key: Path, ca: Path) -> grpc.ServerCredentials:
    """Server TLS that rejects any client without a certificate chained to ``ca``; follows the files."""
    files = ServerCertFiles(cert, key, ca)
    return grpc.dynamic_ssl_server_credentials(files.initial, files.fetch, require_client_authentication=True)


def channel_credentials(cert: Path, key: Path, ca: Path) -> grpc.ChannelCredentials:
    """Client TLS presenting ``cert`` and trusting only ``ca`` (gRPC's own TLS: host name checked)."""
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(), private_key=key.read_bytes(), certificate_chain=cert.read_bytes()
    )


def spiffe_channel(
    target: str, files: TlsFiles, expected_id: str, *,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    options: Sequence[tuple[str, int | str]] = CHANNEL_OPTIONS,
) -> tuple[grpc.aio.Channel, SpiffeTunnel]:
    """An aio channel to ``target`` whose server must prove ``expected_id`` on every connection.

    The tunnel runs on the running event loop; close it (``await tunnel.close()``) after the channel.
    """
    tunnel = SpiffeTunnel(target, expected_id, files)
    channel = grpc.aio.insecure_channel(
        tunnel.target, options=[*options, ("grpc.default_authority", target)],
        interceptors=list(interceptors) or None,
    )
    task = asyncio.get_running_loop().create_task(tunnel.start())
    _KEEP.add(task)
    task.add_done_callback(_KEEP.discard)
    weakref.finalize(channel, _close_quietly, tunnel)
    return channel, tunnel


_KEEP: set[asyncio.Task[None]] = set()


def _close_quietly(tunnel: SpiffeTunnel) -> None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is not None and not loop.is_closed():
        loop.create_task(tunnel.close())
    else:
        import shutil

        shutil.rmtree(str(Path(tunnel.path).parent), ignore_errors=True)


def secure_channel(
    target: str, cert: Path, key: Path, ca: Path, *, expected_id: str | None = None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """An aio mTLS channel to another igw service (or the router, for clients).

    With ``expected_id`` the server's SPIFFE id is checked on every connection (see
    :func:`spiffe_channel`); without it this is plain gRPC TLS, which checks the address
    against the certificate's DNS/IP names (tests and tools that dial a known local address).
    """
    if expected_id is not None:
        channel, _tunnel = spiffe_channel(target, TlsFiles(cert, key, ca), expected_id, interceptors=interceptors)
        return channel
    return grpc.aio.secure_channel(
        target, channel_credentials(cert, key, ca), options=CHANNEL_OPTIONS, interceptors=list(interceptors) or None
    )

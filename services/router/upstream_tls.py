"""How the router checks a ledger or vault replica's identity: gRPC's own TLS, or the Python tunnel.

The router must know it talks to the ledger (or the vault) before it sends a byte. grpcio checks
a server certificate against a DNS name only, so the SPIFFE id (a URI SAN) is checked by a TLS
tunnel in Python (``igw.client._spiffe``), which relays every byte of every RPC through the
router's event loop. A service certificate may also state its identity as a DNS name under
``.invalid`` (:func:`services.common.pki.identity_dns_name`: ``ledger.igw.local.spiffe.invalid``;
``igw pki`` issues it, cert-manager with ``dnsNames``); then gRPC's native TLS checks that name on
every connection, with no Python in the data path.

``IGW_ROUTER_UPSTREAM_IDENTITY`` chooses:

- ``auto`` (the default): each replica is probed once with the tunnel's own check (chain, exactly
  one URI SAN equal to the expected id, no CA certificate). A replica that passes and whose
  certificate also carries the identity's DNS name gets a native channel; any other gets the
  tunnel (which then refuses a wrong identity on every connection, as before). A native replica
  that stays unreachable is probed again, and falls back to the tunnel when its certificate no
  longer carries the name (a rotation to a URI-only certificate).
- ``uri``: the tunnel for every replica (the URI SAN checked on every connection).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence

import grpc

from igw.client._identity import IDENTITY_CHECKS, Probe, native_credentials, native_options, verdict_of
from igw.client._spiffe import TlsFiles, split_host_port
from services.common.tls import CHANNEL_OPTIONS

__all__ = ["MODES", "Probe", "native_channel", "probe"]

MODES = IDENTITY_CHECKS


async def probe(address: str, expected_id: str, files: TlsFiles, timeout_s: float = 5.0) -> Probe:
    """One mTLS handshake with ``address``, checked as the tunnel checks every connection."""
    try:
        host, port = split_host_port(address)
        ctx = files.context()
        _reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ctx, server_hostname=""), timeout_s)
    except ssl.SSLCertVerificationError as err:
        return Probe("refused", f"server certificate not trusted: {err.verify_message}")
    except (OSError, ssl.SSLError, TimeoutError, ValueError) as err:
        return Probe("unreachable", type(err).__name__)
    try:
        return verdict_of(writer.get_extra_info("ssl_object"), expected_id)
    finally:
        # Cut at once: a TLS close waits for the server's close_notify (up to 30 s in asyncio).
        writer.transport.abort()


def native_channel(
    address: str, files: TlsFiles, expected_id: str, interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """A channel with gRPC's own mTLS whose server must carry ``expected_id``'s DNS name.

    The files are read now: after a rotation the pool builds a new channel (``_follow_files``).
    """
    options = [*CHANNEL_OPTIONS, *native_options(expected_id)]
    return grpc.aio.secure_channel(address, native_credentials(files), options=options,
                                   interceptors=list(interceptors) or None)

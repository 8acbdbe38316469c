"""How a connection to an igw service checks the server's identity: gRPC's own TLS, or the tunnel.

grpcio checks a server certificate against a DNS name only, so the SPIFFE id (a URI SAN) is
checked by the TLS tunnel in :mod:`igw.client._spiffe`, which relays every byte through Python.
An igw service certificate may also state its identity as a DNS name under ``.invalid``
(``router.igw.local.spiffe.invalid``, :func:`identity_dns_name`; ``igw pki`` issues it, and
cert-manager does with ``dnsNames``). Then gRPC's own TLS can check that name on every connection,
with no Python between the channel and the socket.

``auto`` (the default) probes the server once with the tunnel's full check (chain, exactly one URI
SAN equal to the expected id, no CA certificate); a server that passes and whose certificate also
carries the name gets a native channel, any other the tunnel (which then refuses a wrong identity
on every connection, as always). ``uri`` keeps the tunnel for every connection. The name is under
``.invalid``, which no public CA issues: only the CA that issues igw's identities can put it in a
certificate. A CA shared with parties who may request arbitrary DNS names should use ``uri``.

Only the standard library and grpcio are used: agents install grpcio and protobuf, nothing else.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any, Literal

import grpc

from igw.client._spiffe import PeerRefused, TlsFiles, check_peer, split_host_port

__all__ = ["IDENTITY_CHECKS", "IDENTITY_DNS_SUFFIX", "Link", "Probe", "decide", "identity_dns_name",
           "native_credentials", "native_options", "probe", "stamps_of", "verdict_of"]

IDENTITY_CHECKS = ("auto", "uri")
IDENTITY_DNS_SUFFIX = ".spiffe.invalid"
_SPIFFE_PREFIX = "spiffe://"
# A link is looked at again (files changed, a doubt raised, an undecided probe) at most this often.
_RECHECK_S = 1.0
Verdict = Literal["native", "tunnel", "refused", "unreachable"]


def identity_dns_name(spiffe_id: str) -> str | None:
    """The DNS name that states a service identity where gRPC's own TLS can check it.

    ``spiffe://igw.local/ledger`` -> ``ledger.igw.local.spiffe.invalid``; None for anything but a
    service (one path segment). The name is under ``.invalid``, which no public or ordinary
    internal CA issues, so only the CA that issues igw's identities puts it in a certificate.
    """
    if not spiffe_id.startswith(_SPIFFE_PREFIX):
        return None
    domain, _, path = spiffe_id[len(_SPIFFE_PREFIX):].partition("/")
    if not domain or not path or "/" in path:
        return None
    return f"{path}.{domain}{IDENTITY_DNS_SUFFIX}".lower()


@dataclass(frozen=True, slots=True)
class Probe:
    """What one TLS handshake with a server showed.

    ``native``: the expected SPIFFE id and its DNS name; ``tunnel``: the expected id without the
    name; ``refused``: not the expected identity (or not our CA); ``unreachable``: no handshake.
    """

    verdict: Verdict
    why: str = ""


def verdict_of(ssl_object: ssl.SSLObject | ssl.SSLSocket, expected_id: str) -> Probe:
    """The verdict on a verified handshake: the tunnel's check, then the identity's DNS name."""
    try:
        check_peer(ssl_object, expected_id)
    except PeerRefused as err:
        return Probe("refused", str(err))
    name = identity_dns_name(expected_id)
    sans: Any = (ssl_object.getpeercert() or {}).get("subjectAltName", ())
    if name and name in (str(v).lower() for k, v in sans if k == "DNS"):
        return Probe("native")
    return Probe("tunnel", f"the certificate does not carry {name}")


def probe(address: str, expected_id: str, files: TlsFiles, timeout_s: float = 5.0) -> Probe:
    """One mTLS handshake with ``address`` (blocking), checked as the tunnel checks every connection."""
    try:
        host, port = split_host_port(address)
        with socket.create_connection((host, port), timeout_s) as raw, \
                files.context().wrap_socket(raw, server_hostname=None) as tls:
            return verdict_of(tls, expected_id)
    except ssl.SSLCertVerificationError as err:
        return Probe("refused", f"server certificate not trusted: {err.verify_message}")
    except (OSError, ValueError) as err:  # ssl.SSLError and TimeoutError are OSErrors
        return Probe("unreachable", type(err).__name__)


def decide(
    address: str, expected_id: str, files: TlsFiles, identity_check: str, timeout_s: float = 5.0,
) -> tuple[str, bool]:
    """(mode, decided): ``native`` only when a probe saw the identity and its DNS name; ``decided``
    is false when the server could not be reached (the tunnel is used meanwhile). The probe waits at
    most ``timeout_s`` (a call's remaining deadline), and never more than 5 s."""
    if identity_check == "uri":
        return "tunnel", True
    seen = probe(address, expected_id, files, min(max(timeout_s, 0.05), 5.0))
    return ("native" if seen.verdict == "native" else "tunnel"), seen.verdict != "unreachable"


def stamps_of(files: TlsFiles) -> tuple[tuple[int, int, int], ...]:
    """The files' stamps, or () while one is missing (mid-rotation)."""
    try:
        return files.stamps()
    except OSError:
        return ()


def native_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """gRPC's own mTLS credentials from the files as they are now (a rotation needs a new channel)."""
    return grpc.ssl_channel_credentials(
        root_certificates=files.ca.read_bytes(), private_key=files.key.read_bytes(),
        certificate_chain=files.cert.read_bytes(),
    )


def native_options(expected_id: str) -> list[tuple[str, int | str]]:
    """The channel option that makes gRPC check the identity's DNS name on every connection."""
    name = identity_dns_name(expected_id)
    if name is None:
        raise ValueError(f"{expected_id} is not a service identity")
    return [("grpc.ssl_target_name_override", name)]


@dataclass
class Link:
    """One server address as a client holds it: its channel, how its identity is checked, and
    whether it is due a new channel (files rotated, the server unreachable when probed, or a doubt
    raised by a failed call on a native channel: a server rotated to a certificate without the name)."""

    channel: Any
    mode: str
    decided: bool
    stamps: tuple[tuple[int, int, int], ...]
    doubted: bool = False
    looked_at: float = 0.0

    def __post_init__(self) -> None:
        self.looked_at = time.monotonic()

    def due(self, files: TlsFiles) -> bool:
        """True when the client should probe again and build a new channel (looked at once a second)."""
        now = time.monotonic()
        if now - self.looked_at < _RECHECK_S:
            return False
        self.looked_at = now
        if not self.decided or self.doubted:
            return True
        if self.mode != "native":
            return False  # the tunnel reads rotated files on each new connection by itself
        stamps = stamps_of(files)
        return bool(stamps) and stamps != self.stamps  # () is a file mid-rotation: wait for all

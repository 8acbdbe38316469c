"""Where a provider credential may be sent: the one base-URL rule of the router and the vault.

Both services apply :func:`check_base_url`, so a URL the router's config accepts is a URL
the vault will bind a key to, and the reverse (see docs/operations.md, "Local providers").

- ``https://host[:port][/path]``: any host but a forbidden one (below).
- ``http://`` only for a *local* provider: a model server the platform runs itself, on
  this host or inside the cluster (``http://127.0.0.1:8000/v1``,
  ``http://vllm.inference.svc:8000/v1``, ``http://10.0.3.7:8000/v1``). The router marks
  such providers ``local: true``; the vault has no such flag, so for it an ``http`` base
  URL *is* a local provider's and the same rule applies. A local host is a private one:
  a loopback, private (RFC 1918, CGNAT, unique-local) address, or a name that no public DNS
  serves (one label, or ending in ``.svc``, ``.cluster.local``, ``.local``, ``.internal``,
  ``.lan``, ``.home.arpa``, ``.localhost``). A public name or address over plain ``http``
  (``http://api.example.com``) is refused: a key would cross the internet in clear.
- Never, whatever the scheme: link-local addresses (169.254.0.0/16, fe80::/10, where cloud
  metadata services live), cloud metadata host names and addresses
  (``metadata.google.internal``, ``100.100.100.200``, ``fd00:ec2::254``...), unspecified
  (0.0.0.0, ::), multicast and broadcast addresses, and numeric host spellings that the
  C resolver reads as an IPv4 address but that are not dotted quads (``2852039166``,
  ``0xa9.0xfe.0xa9.0xfe``, ``169.254.43518``): they would slip past the address checks.
- No user info, query or fragment, no URL-significant characters in the path: the URL is
  an allowlist entry, not a carrier.

The check is on the URL as written. A DNS name that later resolves to a forbidden address
is outside what a config check can see; egress network policy covers that (operations guide).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from urllib.parse import urlsplit

__all__ = ["MAX_URL", "EgressRefused", "check_base_url", "refused_host"]

MAX_URL = 2048
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# Host names of cloud instance-metadata services (lower case, no trailing dot).
METADATA_HOSTS = frozenset({
    "metadata",
    "metadata.google.internal",
    "metadata.goog",
    "instance-data",
    "instance-data.ec2.internal",
    "metadata.azure.internal",
    "metadata.packet.net",
    "metadata.platformequinix.com",
    "metadata.tencentyun.com",
    "metadata.oraclecloud.com",
})
# Metadata services at addresses that are not link-local.
METADATA_ADDRESSES = frozenset({
    ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
    ipaddress.ip_address("fd00:ec2::254"),  # AWS IMDS over IPv6
})


# DNS suffixes no public resolver serves: in-cluster and on-premises names.
PRIVATE_SUFFIXES = (".svc", ".cluster.local", ".local", ".internal", ".lan", ".home.arpa", ".localhost")


class EgressRefused(ValueError):
    """The base URL is not one a credential may be sent to. The message never quotes the URL."""


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The host as an IP address when it is a literal; raises EgressRefused for ambiguous spellings."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        addr = None
    if addr is not None:
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
        return addr
    try:
        socket.inet_aton(host)
    except (OSError, ValueError):
        return None
    # inet_aton took it but it is no dotted quad: the resolver would read an address here.
    raise EgressRefused("the host is a numeric address in a non-standard spelling")


def refused_host(host: str) -> str | None:
    """Why no credential may go to ``host`` (whatever the scheme), or None when it may."""
    name = host.lower().rstrip(".")
    if not name:
        return "the URL has no host"
    if name in METADATA_HOSTS:
        return "the host is a cloud metadata service"
    try:
        addr = _address(name)
    except EgressRefused as err:
        return str(err)
    if addr is None:
        return None
    if addr in METADATA_ADDRESSES:
        return "the host is a cloud metadata service"
    if addr.is_link_local:
        return "the host is a link-local address (where metadata services live)"
    if addr.is_unspecified:
        return "the host is an unspecified address"
    if addr.is_multicast:
        return "the host is a multicast address"
    if isinstance(addr, ipaddress.IPv4Address) and addr == ipaddress.IPv4Address("255.255.255.255"):
        return "the host is a broadcast address"
    return None


def check_base_url(value: object, *, local: bool) -> str:
    """``value`` when a provider credential may be sent there; raises EgressRefused otherwise.

    ``local``: the provider is a model server the platform runs itself, so plain ``http``
    is admitted (still never to a forbidden host).
    """
    if not isinstance(value, str) or not value or len(value) > MAX_URL or _CONTROL.search(value):
        raise EgressRefused(f"must be a URL of at most {MAX_URL} printable characters")
    if any(ch.isspace() for ch in value) or "\\" in value:
        raise EgressRefused("must not contain spaces or backslashes")
    try:
        parts = urlsplit(value)
        host = parts.hostname or ""
        _ = parts.port
    except ValueError:
        raise EgressRefused("is not a valid URL") from None
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment \
            or "@" in parts.netloc or not host:
        raise EgressRefused("must be scheme://host[:port][/path] with no credentials, query or fragment")
    if parts.scheme == "https":
        pass
    elif parts.scheme == "http":
        if not local:
            raise EgressRefused("must be https (http only for providers marked local)")
    else:
        raise EgressRefused("must be https (http only for providers marked local)")
    if any(c in parts.path for c in "%#?@") or ".." in parts.path:
        raise EgressRefused("path has URL-significant characters")
    why = refused_host(host)
    if why is not None:
        raise EgressRefused(why)
    if parts.scheme == "http" and not is_private_host(host):
        raise EgressRefused("plain http only to a private host (loopback, private address, in-cluster name)")
    return value


def is_private_host(host: str) -> bool:
    """A host on this machine or the platform's own network: where plain http may go."""
    name = host.lower().rstrip(".")
    addr = _address(name)
    if addr is not None:
        return addr.is_loopback or addr.is_private or addr in _CGNAT
    return "." not in name or name == "localhost" or name.endswith(PRIVATE_SUFFIXES)


_CGNAT = ipaddress.ip_network("100.64.0.0/10")

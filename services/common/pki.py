"""Certificates as a service sees them: summarise one, refuse to start with an expired one.

igw's identities are X.509 certificates carrying one SPIFFE URI SAN. In production they come from
the operator's CA (cert-manager, SPIRE); in development from the dev CA in ``igw_dev.pki`` (the dev
package, not part of the runtime). This module only reads certificates:

* :func:`describe_cert` - a :class:`CertInfo` summary (SPIFFE IDs, validity, CA or leaf).
* :func:`check_not_expired` - fail fast, with a hint how to renew, before a service or the CLI uses
  an expired or not yet valid certificate.
* :func:`uri_sans` / :func:`spiffe_ids` / :func:`is_ca` - the parts the dev CA checks too.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509

from igw.client._identity import identity_dns_name

__all__ = [
    "SPIFFE_PREFIX",
    "CertInfo",
    "CertificateExpiredError",
    "CertificateNotYetValidError",
    "PkiError",
    "check_not_expired",
    "describe_cert",
    "identity_dns_name",
    "is_ca",
    "spiffe_ids",
    "uri_sans",
]

SPIFFE_PREFIX: Final = "spiffe://"
# A service identity's DNS name, which lets gRPC's own TLS check it (under RFC 2606's ``.invalid``):
# defined next to the agents' client, which checks the router's.


# --------------------------------------------------------------------------- errors


class PkiError(Exception):
    """Base class for certificate errors (here and in the dev CA)."""


class CertificateExpiredError(PkiError):
    """A certificate on disk is past its ``notAfter``."""


class CertificateNotYetValidError(PkiError):
    """A certificate on disk is before its ``notBefore``."""


# --------------------------------------------------------------------------- inspection


@dataclass(frozen=True, slots=True)
class CertInfo:
    """Summary of one certificate (see :func:`describe_cert`)."""

    spiffe_ids: tuple[str, ...]
    subject: str
    issuer: str
    serial_number: int
    not_before: dt.datetime
    not_after: dt.datetime
    is_ca: bool
    expired: bool
    not_yet_valid: bool
    expires_in: dt.timedelta
    """Time left until ``not_after``; negative once expired."""

    @property
    def spiffe_id(self) -> str | None:
        """The single SPIFFE ID, or ``None`` if there are zero or several."""
        return self.spiffe_ids[0] if len(self.spiffe_ids) == 1 else None


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None


def uri_sans(cert: x509.Certificate) -> list[str]:
    san = _san(cert)
    return [str(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)] if san else []


def dns_sans(cert: x509.Certificate) -> list[str]:
    san = _san(cert)
    return [str(v) for v in san.get_values_for_type(x509.DNSName)] if san else []


def spiffe_ids(cert: x509.Certificate) -> tuple[str, ...]:
    return tuple(u for u in uri_sans(cert) if u.startswith(SPIFFE_PREFIX))


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _as_bytes(pem: bytes | str) -> bytes:
    return pem.encode("ascii") if isinstance(pem, str) else pem


def describe_cert(pem: bytes | str, *, now: dt.datetime | None = None) -> CertInfo:
    """Summarise a PEM certificate (the first one if ``pem`` holds a chain).

    Args:
        pem: PEM text or bytes.
        now: reference time (timezone-aware); defaults to the current time.
    """
    cert = x509.load_pem_x509_certificate(_as_bytes(pem))
    ref = now or dt.datetime.now(dt.UTC)
    not_before = cert.not_valid_before_utc
    not_after = cert.not_valid_after_utc
    return CertInfo(
        spiffe_ids=spiffe_ids(cert),
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        serial_number=cert.serial_number,
        not_before=not_before,
        not_after=not_after,
        is_ca=is_ca(cert),
        expired=ref >= not_after,
        not_yet_valid=ref < not_before,
        expires_in=not_after - ref,
    )


def _zulu(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def _renew_hint(info: CertInfo) -> str:
    """Best-effort CLI hint for renewing the certificate described by ``info``."""
    if info.is_ca:
        return "run `igw pki init` to renew"
    sid = info.spiffe_id
    if sid is not None:
        seg = sid.removeprefix(SPIFFE_PREFIX).split("/")[1:]
        if len(seg) == 4 and seg[0] == "team" and seg[2] == "agent":
            return f"run `igw pki issue agent {seg[1]} {seg[3]}` to renew"
        if len(seg) == 2 and seg[0] == "operator":
            return f"run `igw pki issue operator {seg[1]}` to renew"
    return "run `igw pki issue ...`/`igw pki init` to renew"


def check_not_expired(path: str | os.PathLike[str], *, now: dt.datetime | None = None) -> None:
    """Fail fast with a clear message if the certificate at ``path`` is unusable now.

    Raises:
        FileNotFoundError: the file does not exist.
        CertificateExpiredError: the certificate is past ``notAfter``, e.g.
            ``certificate /x/agent.pem expired at 2026-11-20T10:00:00Z (run
            `igw pki issue agent demo quickstart` to renew)``.
        CertificateNotYetValidError: the certificate's ``notBefore`` is in
            the future (usually clock skew).
    """
    p = Path(path)
    info = describe_cert(p.read_bytes(), now=now)
    if info.expired:
        raise CertificateExpiredError(
            f"certificate {p} expired at {_zulu(info.not_after)} ({_renew_hint(info)})"
        )
    if info.not_yet_valid:
        raise CertificateNotYetValidError(
            f"certificate {p} is not valid before {_zulu(info.not_before)} "
            "(check the system clock, or re-issue the certificate)"
        )

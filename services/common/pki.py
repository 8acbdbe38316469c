"""Development PKI for igw: a private CA plus SPIFFE X.509 leaf certificates.

Every igw workload (router, keyvault, ledger, agents, operators) authenticates
with mTLS.  Its identity is *exactly one* SPIFFE URI SAN in its certificate,
e.g. ``spiffe://igw.local/team/demo/agent/quickstart``.

This module creates and inspects such certificates:

* :func:`generate_ca` / :func:`issue_cert` - in-memory PEM generation.
* :func:`init_dev_pki` - idempotently lay out a full dev PKI in a directory.
* :func:`issue_to_dir` - issue one extra agent/operator/service certificate.
* :func:`describe_cert` / :func:`check_not_expired` - inspection helpers.
* :func:`spiffe_ids_from_der` / :func:`spiffe_ids_from_pem` - fast, cached
  peer-identity extraction for the gRPC servers.

All keys are ECDSA P-256, stored unencrypted as PKCS#8 PEM with mode 0600.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import functools
import ipaddress
import logging
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "DEFAULT_TRUST_DOMAIN",
    "CertInfo",
    "CertKeyPaths",
    "CertificateExpiredError",
    "CertificateNotYetValidError",
    "InvalidSpiffeIdError",
    "PkiError",
    "PkiPaths",
    "SpiffeId",
    "check_not_expired",
    "describe_cert",
    "generate_ca",
    "init_dev_pki",
    "issue_cert",
    "issue_to_dir",
    "parse_spiffe_id",
    "spiffe_ids_from_der",
    "spiffe_ids_from_pem",
    "validate_spiffe_id",
]

_LOGGER = logging.getLogger(__name__)

DEFAULT_TRUST_DOMAIN: Final = "igw.local"

#: Leaf certificates are backdated by this much to tolerate clock skew.
_BACKDATE: Final = dt.timedelta(minutes=5)
#: ``init_dev_pki`` renews anything expiring sooner than this.
_RENEW_BEFORE: Final = dt.timedelta(days=1)
_CA_MIN_VALIDITY: Final = dt.timedelta(days=30)

_SPIFFE_PREFIX: Final = "spiffe://"
_MAX_SPIFFE_ID_LEN: Final = 2048
_TRUST_DOMAIN_RE: Final = re.compile(r"[a-z0-9._-]+")
_SEGMENT_RE: Final = re.compile(r"[A-Za-z0-9._-]+")
_X509_NAME_MAX: Final = 64

_CA_CERT_NAME: Final = "ca.pem"
_CA_KEY_NAME: Final = "ca-key.pem"
_LOCK_NAME: Final = ".pki.lock"

PrincipalKind = Literal["agent", "operator", "service"]


# --------------------------------------------------------------------------- errors


class PkiError(Exception):
    """Base class for PKI errors raised by this module."""


class InvalidSpiffeIdError(PkiError, ValueError):
    """A string is not a well-formed SPIFFE ID acceptable to igw."""


class CertificateExpiredError(PkiError):
    """A certificate on disk is past its ``notAfter``."""


class CertificateNotYetValidError(PkiError):
    """A certificate on disk is before its ``notBefore``."""


# --------------------------------------------------------------------------- SPIFFE IDs


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A parsed SPIFFE ID: ``spiffe://<trust_domain>/<segments...>``."""

    trust_domain: str
    segments: tuple[str, ...]

    @property
    def path(self) -> str:
        """The path component, with a leading slash (``/team/x/agent/y``)."""
        return "/" + "/".join(self.segments)

    def __str__(self) -> str:
        return f"{_SPIFFE_PREFIX}{self.trust_domain}{self.path}"


def parse_spiffe_id(value: str) -> SpiffeId:
    """Parse and validate a workload SPIFFE ID.

    Rules (a strict subset of the SPIFFE spec): scheme exactly ``spiffe``,
    trust domain ``[a-z0-9._-]+``, at least one path segment, each segment
    ``[A-Za-z0-9._-]+`` and not ``.``/``..``, no query, fragment, port,
    userinfo, trailing slash or empty segment, at most 2048 characters.

    Raises:
        InvalidSpiffeIdError: if ``value`` does not satisfy the rules.
    """
    if not isinstance(value, str):
        raise InvalidSpiffeIdError(f"SPIFFE ID must be a str, got {type(value).__name__}")
    if len(value) > _MAX_SPIFFE_ID_LEN:
        raise InvalidSpiffeIdError(f"SPIFFE ID longer than {_MAX_SPIFFE_ID_LEN} characters")
    if not value.startswith(_SPIFFE_PREFIX):
        raise InvalidSpiffeIdError(f"invalid SPIFFE ID {value!r}: must start with 'spiffe://'")
    rest = value[len(_SPIFFE_PREFIX) :]
    trust_domain, sep, path = rest.partition("/")
    if not trust_domain:
        raise InvalidSpiffeIdError(f"invalid SPIFFE ID {value!r}: empty trust domain")
    if not _TRUST_DOMAIN_RE.fullmatch(trust_domain):
        raise InvalidSpiffeIdError(f"invalid SPIFFE ID {value!r}: trust domain may only contain [a-z0-9._-]")
    if not sep or not path:
        raise InvalidSpiffeIdError(
            f"invalid SPIFFE ID {value!r}: a workload ID needs at least one path segment"
        )
    segments = tuple(path.split("/"))
    for segment in segments:
        if not segment:
            raise InvalidSpiffeIdError(
                f"invalid SPIFFE ID {value!r}: empty path segment (double or trailing slash)"
            )
        if segment in (".", ".."):
            raise InvalidSpiffeIdError(f"invalid SPIFFE ID {value!r}: '.'/'..' segments are not allowed")
        if not _SEGMENT_RE.fullmatch(segment):
            raise InvalidSpiffeIdError(
                f"invalid SPIFFE ID {value!r}: path segment {segment!r} may only contain [A-Za-z0-9._-]"
            )
    return SpiffeId(trust_domain=trust_domain, segments=segments)


def validate_spiffe_id(value: str) -> str:
    """Return ``value`` unchanged if it is a valid SPIFFE ID (see :func:`parse_spiffe_id`)."""
    parse_spiffe_id(value)
    return value


def _check_segment(what: str, value: str) -> str:
    if not _SEGMENT_RE.fullmatch(value) or value in (".", ".."):
        raise InvalidSpiffeIdError(f"invalid {what} {value!r}: may only contain [A-Za-z0-9._-]")
    return value


def _check_trust_domain(value: str) -> str:
    if not _TRUST_DOMAIN_RE.fullmatch(value):
        raise InvalidSpiffeIdError(f"invalid trust domain {value!r}: may only contain [a-z0-9._-]")
    return value


# --------------------------------------------------------------------------- generation


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _load_ec_key(key_pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"expected an EC private key, got {type(key).__name__}")
    return key


def _same_public_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    return cert.public_key().public_bytes(enc, fmt) == key.public_key().public_bytes(enc, fmt)


def _x509_text(value: str) -> str:
    """Clamp a string to the 64-character upper bound of CN/O attributes."""
    return value[:_X509_NAME_MAX] or "-"


def generate_ca(
    common_name: str = "igw dev CA",
    valid_for: dt.timedelta = dt.timedelta(days=30),
) -> tuple[bytes, bytes]:
    """Create a self-signed ECDSA P-256 CA.

    The CA carries critical ``basicConstraints(CA=true, pathlen=0)`` and
    critical ``keyUsage(keyCertSign, cRLSign)``; it is backdated by five
    minutes to tolerate clock skew.

    Returns:
        ``(cert_pem, key_pem)``; the key is unencrypted PKCS#8 PEM.
    """
    if valid_for <= dt.timedelta(0):
        raise ValueError("valid_for must be positive")
    key = _new_key()
    now = _utcnow()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "igw"),
            x509.NameAttribute(NameOID.COMMON_NAME, _x509_text(common_name)),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + valid_for)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    _LOGGER.debug("generated CA %r valid until %s", common_name, cert.not_valid_after_utc.isoformat())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def is_service_identity(parsed: SpiffeId) -> bool:
    """True for a service's identity (``spiffe://<td>/<service>``), false for agents and operators."""
    return len(parsed.segments) == 1


def _usages(server: bool) -> list[x509.ObjectIdentifier]:
    if server:
        return [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    return [ExtendedKeyUsageOID.CLIENT_AUTH]


def issue_cert(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    spiffe_id: str,
    *,
    dns_names: Sequence[str] = ("localhost",),
    ip_addresses: Sequence[str] = ("127.0.0.1",),
    valid_for: dt.timedelta = dt.timedelta(days=7),
    not_before: dt.datetime | None = None,
    extra_uri_sans: Sequence[str] = (),
    omit_spiffe_id: bool = False,
) -> tuple[bytes, bytes]:
    """Issue an ECDSA P-256 X.509-SVID leaf signed by the given CA.

    The leaf has exactly one URI SAN (``spiffe_id``), critical
    ``keyUsage(digitalSignature)`` and critical ``basicConstraints(CA=false)``.
    A service identity (one path segment: router, keyvault, ledger) also gets
    the DNS/IP SANs and EKU ``serverAuth``+``clientAuth``, so it can serve on
    localhost. An agent or operator certificate gets EKU ``clientAuth`` only
    and no DNS/IP SANs: a leaked agent key cannot pose as one of the services.

    Args:
        ca_cert_pem: issuing CA certificate (PEM).
        ca_key_pem: issuing CA private key (PEM, unencrypted).
        spiffe_id: validated with :func:`parse_spiffe_id`.
        dns_names: DNS SANs.
        ip_addresses: IP SANs (IPv4 or IPv6 literals).
        valid_for: lifetime.  ``notAfter`` is ``now + valid_for`` (or
            ``not_before + valid_for`` when ``not_before`` is given), clamped to
            the CA's ``notAfter``.
        not_before: explicit ``notBefore`` (timezone-aware; naive means UTC).
            Defaults to now minus five minutes.  Tests use a past value with a
            short ``valid_for`` to mint already-expired certificates.
        extra_uri_sans: **tests only** - additional, unvalidated URI SANs, used
            to mint deliberately invalid (multi-identity) certificates.
        omit_spiffe_id: **tests only** - leave the SPIFFE URI SAN out (the ID
            is still validated) to mint an identity-less certificate.

    Returns:
        ``(cert_pem, key_pem)``.

    Raises:
        InvalidSpiffeIdError: ``spiffe_id`` is malformed.
        ValueError: bad SAN values, lifetimes, or a CA cert/key mismatch.
    """
    parse_spiffe_id(spiffe_id)
    if valid_for <= dt.timedelta(0):
        raise ValueError("valid_for must be positive")
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = _load_ec_key(ca_key_pem)
    if not _same_public_key(ca_cert, ca_key):
        raise ValueError("CA private key does not match CA certificate")

    now = _utcnow()
    if not_before is None:
        start, end = now - _BACKDATE, now + valid_for
    else:
        start = not_before if not_before.tzinfo is not None else not_before.replace(tzinfo=dt.UTC)
        end = start + valid_for
    ca_not_after = ca_cert.not_valid_after_utc
    if end > ca_not_after:
        _LOGGER.debug("clamping leaf %s notAfter %s to CA notAfter %s", spiffe_id, end, ca_not_after)
        end = ca_not_after
    if end <= start:
        raise ValueError("certificate would have an empty validity window (CA expires too soon?)")

    sans: list[x509.GeneralName] = []
    if not omit_spiffe_id:
        sans.append(x509.UniformResourceIdentifier(spiffe_id))
    sans.extend(x509.UniformResourceIdentifier(u) for u in extra_uri_sans)
    parsed = parse_spiffe_id(spiffe_id)
    server = is_service_identity(parsed)
    # (an identity-less test certificate still needs some subjectAltName)
    if server or (omit_spiffe_id and not extra_uri_sans):
        sans.extend(x509.DNSName(d) for d in dns_names)
        sans.extend(x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses)
    if not sans:
        raise ValueError("certificate would have no subjectAltName entries")

    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _x509_text(parsed.trust_domain)),
            x509.NameAttribute(NameOID.COMMON_NAME, _x509_text(parsed.path.lstrip("/"))),
        ]
    )
    key = _new_key()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(_usages(server)),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _LOGGER.debug("issued %s valid %s .. %s", spiffe_id, start.isoformat(), end.isoformat())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


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


def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)]


def _spiffe_ids(cert: x509.Certificate) -> tuple[str, ...]:
    return tuple(u for u in _uri_sans(cert) if u.startswith(_SPIFFE_PREFIX))


def _is_ca(cert: x509.Certificate) -> bool:
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
    ref = now or _utcnow()
    not_before = cert.not_valid_before_utc
    not_after = cert.not_valid_after_utc
    return CertInfo(
        spiffe_ids=_spiffe_ids(cert),
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        serial_number=cert.serial_number,
        not_before=not_before,
        not_after=not_after,
        is_ca=_is_ca(cert),
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
        with contextlib.suppress(InvalidSpiffeIdError):
            parsed = parse_spiffe_id(sid)
            seg = parsed.segments
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


@functools.lru_cache(maxsize=4096)
def _spiffe_ids_from_der_cached(der: bytes) -> tuple[str, ...]:
    try:
        cert = x509.load_der_x509_certificate(der)
        return _spiffe_ids(cert)
    except ValueError:
        _LOGGER.debug("could not parse peer certificate DER (%d bytes)", len(der))
        return ()


@functools.lru_cache(maxsize=4096)
def _spiffe_ids_from_pem_cached(pem: bytes) -> tuple[str, ...]:
    try:
        cert = x509.load_pem_x509_certificate(pem)
        return _spiffe_ids(cert)
    except ValueError:
        _LOGGER.debug("could not parse peer certificate PEM (%d bytes)", len(pem))
        return ()


def spiffe_ids_from_der(der: bytes) -> list[str]:
    """Return every URI SAN starting with ``spiffe://`` in a DER certificate.

    Results are cached by the DER bytes (LRU, 4096 entries).  Unparseable
    input yields ``[]`` - callers must treat "not exactly one ID" as
    unauthenticated.  The IDs are returned as found, not validated.
    """
    return list(_spiffe_ids_from_der_cached(bytes(der)))


def spiffe_ids_from_pem(pem: bytes | str) -> list[str]:
    """Like :func:`spiffe_ids_from_der` for PEM input.

    gRPC Python exposes the peer certificate as PEM under the auth-context key
    ``x509_pem_cert``.
    """
    return list(_spiffe_ids_from_pem_cached(_as_bytes(pem)))


# --------------------------------------------------------------------------- on-disk layout


@dataclass(frozen=True, slots=True)
class CertKeyPaths:
    """Paths of one leaf certificate and its private key."""

    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class PkiPaths:
    """Result of :func:`init_dev_pki`."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    router: CertKeyPaths
    keyvault: CertKeyPaths
    ledger: CertKeyPaths
    operator_admin: CertKeyPaths
    agent_demo: CertKeyPaths
    ca_created: bool
    """True if this call (re)generated the CA."""
    issued: tuple[str, ...]
    """Leaf names (e.g. ``"router"``) (re)issued by this call."""

    def leaves(self) -> dict[str, CertKeyPaths]:
        """All leaves keyed by file stem (``router``, ``operator-admin``, ...)."""
        return {
            "router": self.router,
            "keyvault": self.keyvault,
            "ledger": self.ledger,
            "operator-admin": self.operator_admin,
            "agent-demo-quickstart": self.agent_demo,
        }


def _paths_for(directory: Path, stem: str) -> CertKeyPaths:
    return CertKeyPaths(cert=directory / f"{stem}.pem", key=directory / f"{stem}-key.pem")


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically with permission bits ``mode``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_pair(paths: CertKeyPaths, cert_pem: bytes, key_pem: bytes) -> None:
    _write_atomic(paths.key, key_pem, 0o600)
    _write_atomic(paths.cert, cert_pem, 0o644)


@contextlib.contextmanager
def _dir_lock(directory: Path) -> Iterator[None]:
    """Serialise PKI mutations across processes (e.g. several services starting)."""
    fd = os.open(directory / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def _load_ca(directory: Path, *, renew_before: dt.timedelta) -> tuple[bytes, bytes] | None:
    """Return the CA in ``directory`` if usable for at least ``renew_before``."""
    cert_path, key_path = directory / _CA_CERT_NAME, directory / _CA_KEY_NAME
    try:
        cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = _load_ec_key(key_pem)
    except (OSError, ValueError, TypeError, PkiError) as exc:
        if cert_path.exists() or key_path.exists():
            _LOGGER.warning("existing CA in %s is unusable (%s); generating a new one", directory, exc)
        return None
    if not _same_public_key(cert, key) or not _is_ca(cert):
        _LOGGER.warning("existing CA in %s is inconsistent; generating a new one", directory)
        return None
    if cert.not_valid_after_utc - _utcnow() < renew_before:
        _LOGGER.info("CA in %s expires at %s; generating a new one", directory, cert.not_valid_after_utc)
        return None
    if key_path.stat().st_mode & 0o077:
        key_path.chmod(0o600)
    return cert_pem, key_pem


def _leaf_ok(paths: CertKeyPaths, ca_cert_pem: bytes, spiffe_id: str, renew_before: dt.timedelta) -> bool:
    """True if the leaf on disk is signed by the CA, has the right ID and is fresh."""
    try:
        cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
        key = _load_ec_key(paths.key.read_bytes())
        ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
        cert.verify_directly_issued_by(ca_cert)
    except (OSError, ValueError, TypeError, InvalidSignature, PkiError):
        return False
    if not _same_public_key(cert, key) or _uri_sans(cert) != [spiffe_id]:
        return False
    try:  # leaves from before client-only certificates existed are reissued
        usages = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return False
    if usages != _usages(is_service_identity(parse_spiffe_id(spiffe_id))):
        return False
    now = _utcnow()
    if cert.not_valid_before_utc > now or cert.not_valid_after_utc - now < renew_before:
        return False
    if paths.key.stat().st_mode & 0o077:
        paths.key.chmod(0o600)
    return True


def _dev_principals(trust_domain: str) -> dict[str, str]:
    """File stem -> SPIFFE ID for the standard dev identities."""
    td = trust_domain
    return {
        "router": f"spiffe://{td}/router",
        "keyvault": f"spiffe://{td}/keyvault",
        "ledger": f"spiffe://{td}/ledger",
        "operator-admin": f"spiffe://{td}/operator/admin",
        "agent-demo-quickstart": f"spiffe://{td}/team/demo/agent/quickstart",
    }


def init_dev_pki(
    directory: str | os.PathLike[str],
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    valid_for_days: int = 7,
) -> PkiPaths:
    """Create (or refresh) the development PKI in ``directory``.

    Writes ``ca.pem``/``ca-key.pem`` and, for ``router``, ``keyvault``,
    ``ledger``, ``operator-admin`` (``spiffe://<td>/operator/admin``) and
    ``agent-demo-quickstart`` (``spiffe://<td>/team/demo/agent/quickstart``),
    ``<name>.pem`` + ``<name>-key.pem``.  Private keys are mode 0600.

    Idempotent: an existing CA that is valid for more than one more day is
    reused, and only leaves that are missing, unreadable, not issued by that
    CA, carry a different SPIFFE ID (e.g. another trust domain) or expire
    within a day (or half their lifetime, if shorter) are (re)issued.  If the
    CA is regenerated every leaf is re-issued.  Safe to call concurrently from
    several processes (guarded by an ``flock`` on ``<directory>/.pki.lock``).
    """
    _check_trust_domain(trust_domain)
    if valid_for_days < 1:
        raise ValueError("valid_for_days must be >= 1")
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    leaf_validity = dt.timedelta(days=valid_for_days)
    leaf_renew_before = min(_RENEW_BEFORE, leaf_validity / 2)
    ca_validity = max(_CA_MIN_VALIDITY, leaf_validity * 2)
    principals = _dev_principals(trust_domain)
    issued: list[str] = []

    with _dir_lock(root):
        ca = _load_ca(root, renew_before=_RENEW_BEFORE)
        ca_created = ca is None
        if ca is None:
            ca = generate_ca(common_name=f"igw dev CA ({trust_domain})", valid_for=ca_validity)
            _write_atomic(root / _CA_KEY_NAME, ca[1], 0o600)
            _write_atomic(root / _CA_CERT_NAME, ca[0], 0o644)
            _LOGGER.info("created dev CA in %s", root)
        ca_cert_pem, ca_key_pem = ca
        for stem, spiffe_id in principals.items():
            paths = _paths_for(root, stem)
            if not ca_created and _leaf_ok(paths, ca_cert_pem, spiffe_id, leaf_renew_before):
                continue
            cert_pem, key_pem = issue_cert(ca_cert_pem, ca_key_pem, spiffe_id, valid_for=leaf_validity)
            _write_pair(paths, cert_pem, key_pem)
            issued.append(stem)
            _LOGGER.info("issued %s -> %s", spiffe_id, paths.cert)

    return PkiPaths(
        directory=root,
        ca_cert=root / _CA_CERT_NAME,
        ca_key=root / _CA_KEY_NAME,
        router=_paths_for(root, "router"),
        keyvault=_paths_for(root, "keyvault"),
        ledger=_paths_for(root, "ledger"),
        operator_admin=_paths_for(root, "operator-admin"),
        agent_demo=_paths_for(root, "agent-demo-quickstart"),
        ca_created=ca_created,
        issued=tuple(issued),
    )


def _principal(kind: PrincipalKind, names: Sequence[str], trust_domain: str) -> tuple[str, str]:
    """Return ``(file_stem, spiffe_id)`` for an ``issue_to_dir`` request."""
    if kind == "agent":
        if len(names) != 2:
            raise ValueError("agent certificates need exactly two names: TEAM AGENT")
        team, agent = (_check_segment("team name", names[0]), _check_segment("agent name", names[1]))
        return f"agent-{team}-{agent}", f"spiffe://{trust_domain}/team/{team}/agent/{agent}"
    if kind == "operator":
        if len(names) != 1:
            raise ValueError("operator certificates need exactly one name")
        name = _check_segment("operator name", names[0])
        return f"operator-{name}", f"spiffe://{trust_domain}/operator/{name}"
    if kind == "service":
        if len(names) != 1:
            raise ValueError("service certificates need exactly one name")
        name = _check_segment("service name", names[0])
        return name, f"spiffe://{trust_domain}/{name}"
    raise ValueError(f"unknown principal kind {kind!r} (expected agent, operator or service)")


def issue_to_dir(
    directory: str | os.PathLike[str],
    kind: PrincipalKind,
    *names: str,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    valid_for: dt.timedelta = dt.timedelta(days=7),
) -> tuple[Path, Path]:
    """Issue (or re-issue, overwriting) one certificate using the CA in ``directory``.

    * ``issue_to_dir(d, "agent", TEAM, AGENT)`` -> ``agent-<team>-<agent>.pem``
      for ``spiffe://<td>/team/<team>/agent/<agent>``
    * ``issue_to_dir(d, "operator", NAME)`` -> ``operator-<name>.pem`` for
      ``spiffe://<td>/operator/<name>``
    * ``issue_to_dir(d, "service", NAME)`` -> ``<name>.pem`` for
      ``spiffe://<td>/<name>``

    Returns:
        ``(cert_path, key_path)``; the key is written with mode 0600.

    Raises:
        FileNotFoundError: no CA in ``directory`` (run ``igw pki init``).
        InvalidSpiffeIdError / ValueError: bad names or kind.
    """
    _check_trust_domain(trust_domain)
    root = Path(directory)
    stem, spiffe_id = _principal(kind, names, trust_domain)
    ca_cert_path, ca_key_path = root / _CA_CERT_NAME, root / _CA_KEY_NAME
    if not ca_cert_path.exists() or not ca_key_path.exists():
        raise FileNotFoundError(f"no CA found in {root} (run `igw pki init` first)")
    paths = _paths_for(root, stem)
    with _dir_lock(root):
        cert_pem, key_pem = issue_cert(
            ca_cert_path.read_bytes(), ca_key_path.read_bytes(), spiffe_id, valid_for=valid_for
        )
        _write_pair(paths, cert_pem, key_pem)
    _LOGGER.info("issued %s -> %s", spiffe_id, paths.cert)
    return paths.cert, paths.key

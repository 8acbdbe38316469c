"""The dev CA's certificates, in memory: a CA and SPIFFE X.509 leaves signed by it.

* :func:`generate_ca` - a self-signed ECDSA P-256 CA.
* :func:`issue_cert` - a leaf with exactly one SPIFFE URI SAN; server usage for the services only.

All keys are ECDSA P-256, unencrypted PKCS#8 PEM. :mod:`igw_dev.pki.layout` writes them to disk.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
from collections.abc import Sequence
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from igw_dev.pki.spiffe import is_service_identity, parse_spiffe_id
from services.common.pki import PkiError, identity_dns_name

__all__ = ["extended_key_usages", "generate_ca", "issue_cert", "load_ec_key", "same_public_key", "utcnow"]

_LOGGER = logging.getLogger(__name__)

#: Leaf certificates are backdated by this much to tolerate clock skew.
_BACKDATE: Final = dt.timedelta(minutes=5)
_X509_NAME_MAX: Final = 64


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def load_ec_key(key_pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"expected an EC private key, got {type(key).__name__}")
    return key


def same_public_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
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
    now = utcnow()
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


def extended_key_usages(server: bool) -> list[x509.ObjectIdentifier]:
    """serverAuth + clientAuth for a service's certificate; clientAuth only for agents and operators."""
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
    identity_name: bool = True,
) -> tuple[bytes, bytes]:
    """Issue an ECDSA P-256 X.509-SVID leaf signed by the given CA.

    The leaf has exactly one URI SAN (``spiffe_id``), critical
    ``keyUsage(digitalSignature)`` and critical ``basicConstraints(CA=false)``.
    A service identity (one path segment: router, keyvault, ledger) also gets
    the DNS/IP SANs and EKU ``serverAuth``+``clientAuth``, so it can serve on
    localhost, and (``identity_name``) its identity as a DNS name too
    (:func:`services.common.pki.identity_dns_name`), which lets the router check it with
    gRPC's native TLS. An agent or operator certificate gets EKU ``clientAuth`` only
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
    ca_key = load_ec_key(ca_key_pem)
    if not same_public_key(ca_cert, ca_key):
        raise ValueError("CA private key does not match CA certificate")

    now = utcnow()
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
        named = identity_dns_name(spiffe_id) if server and identity_name and not omit_spiffe_id else None
        sans.extend(x509.DNSName(d) for d in ([named] if named else []) + list(dns_names))
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
            x509.ExtendedKeyUsage(extended_key_usages(server)),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _LOGGER.debug("issued %s valid %s .. %s", spiffe_id, start.isoformat(), end.isoformat())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)

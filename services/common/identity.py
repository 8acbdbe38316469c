"""Caller identity: the single SPIFFE URI SAN of the peer's client certificate.

Identity is never a request field. A certificate with zero or several URI SANs,
or one from another trust domain, has no identity and may call nothing. Neither has a
CA certificate (basicConstraints cA=TRUE, or keyUsage keyCertSign): a CA signs
identities, it is never one, even when its chain verifies.
"""

from __future__ import annotations

import enum
import functools
import ssl
from dataclasses import dataclass

import grpc
from cryptography import x509

from services.common import ids

_SEGMENT = ids.SEGMENT


class Kind(enum.Enum):
    """What sort of principal a certificate names."""

    AGENT = "agent"
    OPERATOR = "operator"
    ROUTER = "router"
    KEYVAULT = "keyvault"
    LEDGER = "ledger"


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified caller."""

    spiffe_id: str
    kind: Kind
    team: str = ""
    agent: str = ""
    name: str = ""


class IdentityError(Exception):
    """The peer certificate does not carry exactly one acceptable SPIFFE id."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse_spiffe_id(spiffe_id: str, trust_domain: str) -> Identity:
    """Parses ``spiffe://<trust_domain>/...`` into an Identity or raises IdentityError."""
    prefix = f"spiffe://{trust_domain}/"
    if not spiffe_id.startswith(prefix):
        raise IdentityError("UNTRUSTED_IDENTITY", "certificate identity is not in this trust domain")
    parts = spiffe_id[len(prefix) :].split("/")
    if not all(_SEGMENT.match(p) for p in parts):
        raise IdentityError("MALFORMED_IDENTITY", "certificate identity has a malformed path")
    if len(parts) == 1 and parts[0] in ("router", "keyvault", "ledger"):
        return Identity(spiffe_id, Kind(parts[0]), name=parts[0])
    if len(parts) == 4 and parts[0] == "team" and parts[2] == "agent":
        return Identity(spiffe_id, Kind.AGENT, team=parts[1], agent=parts[3], name=parts[3])
    if len(parts) == 2 and parts[0] == "operator":
        return Identity(spiffe_id, Kind.OPERATOR, name=parts[1])
    raise IdentityError("UNKNOWN_IDENTITY", "certificate identity names no known principal")


def is_ca_certificate(cert: x509.Certificate) -> bool:
    """True when ``cert`` may sign certificates: basicConstraints cA=TRUE or keyUsage keyCertSign."""
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return True
    except x509.ExtensionNotFound:
        pass
    try:
        return bool(cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign)
    except x509.ExtensionNotFound:
        return False


@functools.lru_cache(maxsize=4096)
def _identity_from_pem(pem: bytes, trust_domain: str) -> Identity | IdentityError:
    cert = x509.load_pem_x509_certificate(pem)
    if is_ca_certificate(cert):
        return IdentityError("CA_CERTIFICATE", "a CA certificate is never a peer identity")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) != 1:
        return IdentityError("AMBIGUOUS_IDENTITY", "client certificate must carry exactly one URI SAN")
    try:
        return parse_spiffe_id(uris[0], trust_domain)
    except IdentityError as err:
        return err


def identity_from_context(context: grpc.aio.ServicerContext, trust_domain: str) -> Identity:
    """The verified identity of the caller, or IdentityError.

    The TLS layer has already verified the chain against our CA and required a
    client certificate; this reads the one URI SAN out of it (cached per cert).
    """
    auth = context.auth_context()
    pems = auth.get("x509_pem_cert") if auth else None
    if not pems:
        raise IdentityError("NO_CLIENT_CERTIFICATE", "a client certificate is required")
    result = _identity_from_pem(pems[0], trust_domain)
    if isinstance(result, IdentityError):
        raise result
    return result


def identity_from_der(der: bytes, trust_domain: str) -> Identity:
    """The identity in a verified DER client certificate (the HTTPS edge), by the gRPC rules."""
    result = _identity_from_pem(ssl.DER_cert_to_PEM_cert(der).encode(), trust_domain)
    if isinstance(result, IdentityError):
        raise result
    return result

"""SPIFFE IDs for the dev CA: parse and validate them, read them back from certificates.

The rules are a strict subset of the SPIFFE spec (see :func:`parse_spiffe_id`). The services check
a peer's identity in ``services.common.identity``; this module is what the dev CA refuses to issue.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from typing import Final

from cryptography import x509

from services.common.pki import SPIFFE_PREFIX, PkiError, spiffe_ids

__all__ = [
    "DEFAULT_TRUST_DOMAIN",
    "InvalidSpiffeIdError",
    "SpiffeId",
    "check_segment",
    "check_trust_domain",
    "is_service_identity",
    "parse_spiffe_id",
    "spiffe_ids_from_der",
    "spiffe_ids_from_pem",
    "validate_spiffe_id",
]

_LOGGER = logging.getLogger(__name__)

DEFAULT_TRUST_DOMAIN: Final = "igw.local"

_MAX_SPIFFE_ID_LEN: Final = 2048
_TRUST_DOMAIN_RE: Final = re.compile(r"[a-z0-9._-]+")
_SEGMENT_RE: Final = re.compile(r"[A-Za-z0-9._-]+")


class InvalidSpiffeIdError(PkiError, ValueError):
    """A string is not a well-formed SPIFFE ID acceptable to igw."""



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
        return f"{SPIFFE_PREFIX}{self.trust_domain}{self.path}"


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
    if not value.startswith(SPIFFE_PREFIX):
        raise InvalidSpiffeIdError(f"invalid SPIFFE ID {value!r}: must start with 'spiffe://'")
    rest = value[len(SPIFFE_PREFIX) :]
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


def check_segment(what: str, value: str) -> str:
    if not _SEGMENT_RE.fullmatch(value) or value in (".", ".."):
        raise InvalidSpiffeIdError(f"invalid {what} {value!r}: may only contain [A-Za-z0-9._-]")
    return value


def check_trust_domain(value: str) -> str:
    if not _TRUST_DOMAIN_RE.fullmatch(value):
        raise InvalidSpiffeIdError(f"invalid trust domain {value!r}: may only contain [a-z0-9._-]")
    return value



def is_service_identity(parsed: SpiffeId) -> bool:
    """True for a service's identity (``spiffe://<td>/<service>``), false for agents and operators."""
    return len(parsed.segments) == 1



@functools.lru_cache(maxsize=4096)
def _spiffe_ids_from_der_cached(der: bytes) -> tuple[str, ...]:
    try:
        cert = x509.load_der_x509_certificate(der)
        return spiffe_ids(cert)
    except ValueError:
        _LOGGER.debug("could not parse peer certificate DER (%d bytes)", len(der))
        return ()


@functools.lru_cache(maxsize=4096)
def _spiffe_ids_from_pem_cached(pem: bytes) -> tuple[str, ...]:
    try:
        cert = x509.load_pem_x509_certificate(pem)
        return spiffe_ids(cert)
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
    return list(_spiffe_ids_from_pem_cached(pem.encode("ascii") if isinstance(pem, str) else pem))

"""The development PKI: a private CA plus SPIFFE X.509 leaf certificates for every igw identity.

Every igw workload (router, keyvault, ledger, agents, operators) authenticates with mTLS; its
identity is *exactly one* SPIFFE URI SAN, e.g. ``spiffe://igw.local/team/demo/agent/quickstart``.

* ``spiffe`` - SPIFFE ID rules, and reading the IDs back from a certificate.
* ``issue`` - :func:`generate_ca` / :func:`issue_cert`, in memory.
* ``layout`` - :func:`init_dev_pki` / :func:`issue_to_dir`, on disk (``igw pki``).

Reading certificates is the runtime's business (``services.common.pki``: :func:`describe_cert`,
:func:`check_not_expired`); it is re-exported here so one import serves a test or a dev tool.
"""

from __future__ import annotations

from igw_dev.pki.issue import generate_ca, issue_cert
from igw_dev.pki.layout import CertKeyPaths, PkiPaths, PrincipalKind, init_dev_pki, issue_to_dir
from igw_dev.pki.spiffe import (
    DEFAULT_TRUST_DOMAIN,
    InvalidSpiffeIdError,
    SpiffeId,
    is_service_identity,
    parse_spiffe_id,
    spiffe_ids_from_der,
    spiffe_ids_from_pem,
    validate_spiffe_id,
)
from services.common.pki import (
    CertificateExpiredError,
    CertificateNotYetValidError,
    CertInfo,
    PkiError,
    check_not_expired,
    describe_cert,
)

__all__ = [
    "DEFAULT_TRUST_DOMAIN",
    "CertInfo",
    "CertKeyPaths",
    "CertificateExpiredError",
    "CertificateNotYetValidError",
    "InvalidSpiffeIdError",
    "PkiError",
    "PkiPaths",
    "PrincipalKind",
    "SpiffeId",
    "check_not_expired",
    "describe_cert",
    "generate_ca",
    "init_dev_pki",
    "is_service_identity",
    "issue_cert",
    "issue_to_dir",
    "parse_spiffe_id",
    "spiffe_ids_from_der",
    "spiffe_ids_from_pem",
    "validate_spiffe_id",
]

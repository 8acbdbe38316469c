"""The dev PKI on disk: ``igw pki init`` and ``igw pki issue``.

* :func:`init_dev_pki` - idempotently lay out the CA and the standard dev identities in a directory.
* :func:`issue_to_dir` - issue one extra agent, operator or service certificate from that CA.

Keys are written with mode 0600, atomically, under an ``flock`` so services starting together agree.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from igw_dev.pki.issue import extended_key_usages, generate_ca, issue_cert, load_ec_key, same_public_key, utcnow
from igw_dev.pki.spiffe import (
    DEFAULT_TRUST_DOMAIN,
    check_segment,
    check_trust_domain,
    is_service_identity,
    parse_spiffe_id,
)
from services.common.pki import PkiError, is_ca, uri_sans

__all__ = ["CertKeyPaths", "PkiPaths", "PrincipalKind", "init_dev_pki", "issue_to_dir"]

_LOGGER = logging.getLogger(__name__)

#: ``init_dev_pki`` renews anything expiring sooner than this.
_RENEW_BEFORE: Final = dt.timedelta(days=1)
_CA_MIN_VALIDITY: Final = dt.timedelta(days=30)

_CA_CERT_NAME: Final = "ca.pem"
_CA_KEY_NAME: Final = "ca-key.pem"
_LOCK_NAME: Final = ".pki.lock"

PrincipalKind = Literal["agent", "operator", "service"]


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
        key = load_ec_key(key_pem)
    except (OSError, ValueError, TypeError, PkiError) as exc:
        if cert_path.exists() or key_path.exists():
            _LOGGER.warning("existing CA in %s is unusable (%s); generating a new one", directory, exc)
        return None
    if not same_public_key(cert, key) or not is_ca(cert):
        _LOGGER.warning("existing CA in %s is inconsistent; generating a new one", directory)
        return None
    if cert.not_valid_after_utc - utcnow() < renew_before:
        _LOGGER.info("CA in %s expires at %s; generating a new one", directory, cert.not_valid_after_utc)
        return None
    if key_path.stat().st_mode & 0o077:
        key_path.chmod(0o600)
    return cert_pem, key_pem


def _leaf_ok(paths: CertKeyPaths, ca_cert_pem: bytes, spiffe_id: str, renew_before: dt.timedelta) -> bool:
    """True if the leaf on disk is signed by the CA, has the right ID and is fresh."""
    try:
        cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
        key = load_ec_key(paths.key.read_bytes())
        ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
        cert.verify_directly_issued_by(ca_cert)
    except (OSError, ValueError, TypeError, InvalidSignature, PkiError):
        return False
    if not same_public_key(cert, key) or uri_sans(cert) != [spiffe_id]:
        return False
    try:  # leaves from before client-only certificates existed are reissued
        found = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return False
    if found != extended_key_usages(is_service_identity(parse_spiffe_id(spiffe_id))):
        return False
    now = utcnow()
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
    check_trust_domain(trust_domain)
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
        team, agent = (check_segment("team name", names[0]), check_segment("agent name", names[1]))
        return f"agent-{team}-{agent}", f"spiffe://{trust_domain}/team/{team}/agent/{agent}"
    if kind == "operator":
        if len(names) != 1:
            raise ValueError("operator certificates need exactly one name")
        name = check_segment("operator name", names[0])
        return f"operator-{name}", f"spiffe://{trust_domain}/operator/{name}"
    if kind == "service":
        if len(names) != 1:
            raise ValueError("service certificates need exactly one name")
        name = check_segment("service name", names[0])
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
    check_trust_domain(trust_domain)
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

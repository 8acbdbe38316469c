"""KeyVault domain: provider keys, versions, leases, validation.

Errors raised by the vault (all from ``services.common.errors``; the reason is the API):

    IgwError
    ├── InvalidArgument     INVALID_ARGUMENT   <FIELD>_INVALID (the message names the field,
    │                                            never echoes the value)
    ├── NotFound            NOT_FOUND          KEY_NOT_FOUND
    ├── AlreadyExists       ALREADY_EXISTS     KEY_EXISTS
    ├── FailedPrecondition  FAILED_PRECONDITION KEY_DISABLED
    ├── Aborted             ABORTED            REQUEST_ID_REUSED (same id, other payload)
    ├── PermissionDenied    PERMISSION_DENIED  NO_KEY_FOR_PROVIDER, TEAM_NOT_ALLOWED
    │                                            (authz: METHOD_NOT_ALLOWED, from the guard)
    ├── Unavailable         UNAVAILABLE        MASTER_KEY_UNAVAILABLE, AUDIT_UNAVAILABLE
    └── Internal            INTERNAL           DECRYPTION_FAILED (fail closed)

Key version lifecycle::

    ACTIVE --rotate--> GRACE --(grace_end passes)--> DISABLED (effective; read-time)
       \\______________disable (whole key)____________/

Only the ACTIVE (newest) version of an ACTIVE key is ever leased. "The old version works
during grace" means: leases already issued on it stay valid until they expire, and the
provider-side key is expected to keep working until ``grace_end``; after that the vault
reports it DISABLED and the operator may revoke it at the provider.

Audit records and their chain are in ``audit_records.py``.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from services.common import egress, ids
from services.common import errors as E

PROVIDER_RE = re.compile(r"^[a-z0-9_-]{1,32}\Z")
MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,127}\Z")
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9._/-]{1,63}\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_SECRET_BYTES = 4096
MAX_TEAMS = 1000
MAX_LABELS = 64
MAX_LABEL_VALUE = 256
MAX_GRACE = dt.timedelta(days=30)
#: Hard limit on a lease's lifetime: leases live "a few seconds to a minute" (issue 4).
MAX_LEASE_TTL_SECONDS = 60


class KeyState(enum.Enum):
    """State of a key or version (names match the proto's KeyState without prefix)."""

    ACTIVE = "ACTIVE"
    GRACE = "GRACE"
    DISABLED = "DISABLED"



def utcnow() -> dt.datetime:
    """Now, timezone-aware UTC (the default clock)."""
    return dt.datetime.now(dt.UTC)


# ---------------------------------------------------------------------------- keys


@dataclass(frozen=True, slots=True)
class KeyVersionInfo:
    """One version's metadata (never the secret)."""

    version: int
    state: KeyState
    created_at: dt.datetime
    grace_end: dt.datetime | None
    fingerprint: str

    def effective_state(self, now: dt.datetime) -> KeyState:
        """GRACE turns into DISABLED once ``grace_end`` has passed."""
        if self.state is KeyState.GRACE and (self.grace_end is None or now >= self.grace_end):
            return KeyState.DISABLED
        return self.state


@dataclass(frozen=True, slots=True)
class ProviderKeyInfo:
    """A provider key's metadata and its versions (newest first). Never holds the secret."""

    name: str
    provider: str
    base_url: str
    allowed_teams: tuple[str, ...]
    all_teams: bool
    labels: Mapping[str, str]
    rotation_period: dt.timedelta | None
    state: KeyState
    created_at: dt.datetime
    versions: tuple[KeyVersionInfo, ...] = ()

    @property
    def current(self) -> KeyVersionInfo | None:
        """The ACTIVE version, if any."""
        return next((v for v in self.versions if v.state is KeyState.ACTIVE), None)

    def rotation_due(self, now: dt.datetime) -> bool:
        """True when the current version is older than the rotation period."""
        cur = self.current
        if self.state is not KeyState.ACTIVE or cur is None or self.rotation_period is None:
            return False
        return now >= cur.created_at + self.rotation_period


@dataclass(frozen=True, slots=True)
class NewKey:
    """A validated CreateProviderKey request. The secret never shows in repr."""

    request_id: str
    name: str
    provider: str
    secret: bytes = field(repr=False)
    base_url: str
    allowed_teams: tuple[str, ...]
    all_teams: bool
    labels: Mapping[str, str]
    rotation_period: dt.timedelta | None

    def __repr__(self) -> str:
        return f"NewKey(name={self.name!r}, provider={self.provider!r}, secret=<redacted>)"


@dataclass(frozen=True, slots=True)
class Lease:
    """A lease on one key version for one call. Holds the secret: repr hides it."""

    lease_id: str
    key_name: str
    key_version: int
    secret: str
    base_url: str
    expire_time: dt.datetime

    def __repr__(self) -> str:
        return (
            f"Lease(key_name={self.key_name!r}, key_version={self.key_version}, "
            f"expire_time={self.expire_time.isoformat()}, lease_id=<redacted>, secret=<redacted>)"
        )

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class IssueRequest:
    """A validated IssueCredential request."""

    provider: str
    team: str
    model: str
    request_id: str
    ttl: dt.timedelta | None


@dataclass(frozen=True, slots=True)
class EndLeaseRequest:
    """A validated EndLease request."""

    lease_id: str
    used: bool
    reason: str
    request_id: str
    provider: str
    team: str
    model: str
    key_name: str
    key_version: int


LEASE_ID_RE = re.compile(r"^[A-Za-z0-9]{1,64}\Z")
REASON_RE = re.compile(r"^[A-Z0-9_]{0,64}\Z")


def check_lease_id(value: str) -> str:
    """A lease id as IssueCredential hands them out: ``^[A-Za-z0-9]{1,64}$``."""
    if not isinstance(value, str) or not LEASE_ID_RE.match(value):
        raise _bad("lease_id", "1-64 characters of A-Z a-z 0-9")
    return value


def check_reason(value: str) -> str:
    """A lease end reason: ``^[A-Z0-9_]{0,64}$`` (a stable code, never free text)."""
    if not isinstance(value, str) or not REASON_RE.match(value):
        raise _bad("reason", "at most 64 characters of A-Z 0-9 _")
    return value




# ---------------------------------------------------------------------------- validation


def _bad(field_name: str, rule: str) -> E.InvalidArgument:
    # Never echo the value: it may be a secret pasted into the wrong field.
    return E.InvalidArgument(
        f"{field_name.upper()}_INVALID", f"{field_name} is invalid: {rule}", {"field": field_name}
    )


def check_name(value: str) -> str:
    """A key name: ``^[A-Za-z0-9._-]{1,64}$``."""
    if not ids.is_segment(value):
        raise _bad("name", "1-64 characters of A-Z a-z 0-9 . _ -")
    return value


def check_provider(value: str) -> str:
    """A provider name: ``^[a-z0-9_-]{1,32}$``."""
    if not isinstance(value, str) or not PROVIDER_RE.match(value):
        raise _bad("provider", "1-32 characters of a-z 0-9 _ -")
    return value


def check_request_id(value: str) -> str:
    """A request id: ``^[A-Za-z0-9._:-]{1,128}$``."""
    if not ids.is_request_id(value):
        raise _bad("request_id", "1-128 characters of A-Z a-z 0-9 . _ : -")
    return value


def check_team(value: str, field_name: str = "team") -> str:
    """A team name (a SPIFFE path segment)."""
    if not ids.is_segment(value):
        raise _bad(field_name, "1-64 characters of A-Z a-z 0-9 . _ -")
    return value


def check_model(value: str) -> str:
    """A provider model name (audit only)."""
    if not isinstance(value, str) or not MODEL_RE.match(value):
        raise _bad("model", "1-128 characters of A-Z a-z 0-9 . _ : / @ -, starting alphanumeric")
    return value


def check_secret(value: str) -> bytes:
    """Non-empty, at most 4096 UTF-8 bytes, no control characters (it ends up in a header)."""
    raw = value.encode("utf-8") if isinstance(value, str) else b""
    if not raw or len(raw) > MAX_SECRET_BYTES or _CONTROL.search(value):
        raise _bad("secret", f"1-{MAX_SECRET_BYTES} bytes without control characters")
    return raw


def check_base_url(value: str) -> str:
    """A base URL a key may be bound to: :func:`services.common.egress.check_base_url`, the
    rule the router applies to its config. The vault keeps no ``local`` flag: an ``http`` URL
    is a local provider's (a model server the platform runs), admitted as ``local: true`` is.

    No user info, query or fragment: the URL is an allowlist entry, not a carrier.
    """
    try:
        return egress.check_base_url(value, local=True)
    except egress.EgressRefused as err:
        raise _bad("base_url", f"https://host[:port][/path], or http:// for a local provider; {err}") from None


def check_teams(values: Sequence[str]) -> tuple[str, ...]:
    """Allowed teams: each a valid team name; deduplicated and sorted."""
    if len(values) > MAX_TEAMS:
        raise _bad("allowed_teams", f"at most {MAX_TEAMS} teams")
    return tuple(sorted({check_team(v, "allowed_teams") for v in values}))


def check_labels(values: Mapping[str, str]) -> dict[str, str]:
    """Labels: at most 64, keys ``^[A-Za-z0-9._/-]{1,63}$``, values ≤ 256 chars, no control chars."""
    if len(values) > MAX_LABELS:
        raise _bad("labels", f"at most {MAX_LABELS} labels")
    out: dict[str, str] = {}
    for k, v in values.items():
        if not LABEL_KEY_RE.match(k) or len(v) > MAX_LABEL_VALUE or _CONTROL.search(v):
            raise _bad("labels", "keys of A-Z a-z 0-9 . _ / - (1-63), values up to 256 printable characters")
        out[k] = v
    return out


def check_duration(value: dt.timedelta | None, field_name: str, maximum: dt.timedelta | None = None,
                   allow_zero: bool = True) -> dt.timedelta | None:
    """A non-negative duration, optionally capped."""
    if value is None:
        return None
    if value < dt.timedelta(0) or (not allow_zero and value == dt.timedelta(0)):
        raise _bad(field_name, "must be a positive duration")
    if maximum is not None and value > maximum:
        raise _bad(field_name, f"at most {int(maximum.total_seconds())} seconds")
    return value

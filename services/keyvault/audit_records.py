"""The vault's audit records and their chain: what a record holds and what its MAC covers.

Audit records are chained by ``hash = HMAC-SHA256(chain key, canonical record)``, the
canonical record including the previous record's hash and the tag ``igw-audit/v2-hmac-sha256``.
The unkeyed ``igw-audit/v1`` format (plain SHA-256) is not accepted by the verifier at all:
accepting it for old records would let a forger downgrade any record to it. A database
written before the chain was keyed (pre-release development data) reports HASH_MISMATCH at
sequence 1; re-create it.

Writing the chain is ``audit.py`` (the group-commit writer); reading and verifying it is
``audit_reader.py``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass

GENESIS_HASH = "0" * 64


class AuditAction(enum.Enum):
    """What an audit record is about."""

    ISSUE_CREDENTIAL = "ISSUE_CREDENTIAL"
    CREATE_KEY = "CREATE_KEY"
    ROTATE_KEY = "ROTATE_KEY"
    DISABLE_KEY = "DISABLE_KEY"
    REWRAP = "REWRAP"
    LEASE_USED = "LEASE_USED"
    LEASE_RETURNED = "LEASE_RETURNED"


class AuditOutcome(enum.Enum):
    """How an audited action ended."""

    ALLOWED = "ALLOWED"
    DENIED = "DENIED"



@dataclass(slots=True)
class AuditDraft:
    """An audit record before it has a place in the chain."""

    actor: str
    action: AuditAction
    outcome: AuditOutcome = AuditOutcome.ALLOWED
    reason: str = ""
    provider: str = ""
    key_name: str = ""
    key_version: int = 0
    team: str = ""
    model: str = ""
    request_id: str = ""
    lease_id_hmac: str = ""


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """A chained audit record, as stored."""

    sequence: int
    created_at: dt.datetime
    actor: str
    action: str
    outcome: str
    reason: str
    provider: str
    key_name: str
    key_version: int
    team: str
    model: str
    request_id: str
    lease_id_hmac: str
    prev_hash: str
    hash: str

    def as_row(self) -> dict[str, object]:
        """Column -> value (shallow: every field is a scalar; ``asdict`` would deep-copy each)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def canonical_ts(ts: dt.datetime) -> str:
    """UTC, microsecond precision (what Postgres timestamptz keeps), fixed format."""
    return ts.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


AUDIT_HASH_TAG = "igw-audit/v2-hmac-sha256"


def canonical_record(
    *,
    sequence: int,
    created_at: dt.datetime,
    actor: str,
    action: str,
    outcome: str,
    reason: str,
    provider: str,
    key_name: str,
    key_version: int,
    team: str,
    model: str,
    request_id: str,
    lease_id_hmac: str,
    prev_hash: str,
) -> bytes:
    """The canonical JSON array of every field and the previous hash: what a record's MAC covers."""
    return json.dumps(
        [
            AUDIT_HASH_TAG,
            int(sequence),
            canonical_ts(created_at),
            actor,
            action,
            outcome,
            reason,
            provider,
            key_name,
            int(key_version),
            team,
            model,
            request_id,
            lease_id_hmac,
            prev_hash,
        ],
        separators=(",", ":"),
        ensure_ascii=True,
    ).encode()


def record_hash(chain_key: bytes, **fields: object) -> str:
    """HMAC-SHA256 under the audit chain key of :func:`canonical_record` (hex).

    Keyed, so that someone able to write the database but without the master key (which
    unwraps the chain key) cannot re-hash an edited record and everything after it.
    """
    if len(chain_key) < 32:
        raise ValueError("the audit chain key must be at least 32 bytes")
    return hmac.new(chain_key, canonical_record(**fields), hashlib.sha256).hexdigest()  # type: ignore[arg-type]


def chain(
    draft: AuditDraft, sequence: int, created_at: dt.datetime, prev_hash: str, chain_key: bytes
) -> AuditRecord:
    """Gives a draft its place in the chain."""
    fields: dict[str, object] = {
        "sequence": sequence,
        "created_at": created_at,
        "actor": draft.actor,
        "action": draft.action.value,
        "outcome": draft.outcome.value,
        "reason": draft.reason,
        "provider": draft.provider,
        "key_name": draft.key_name,
        "key_version": draft.key_version,
        "team": draft.team,
        "model": draft.model,
        "request_id": draft.request_id,
        "lease_id_hmac": draft.lease_id_hmac,
        "prev_hash": prev_hash,
    }
    return AuditRecord(**fields, hash=record_hash(chain_key, **fields))  # type: ignore[arg-type]


def recompute_hash(rec: AuditRecord, chain_key: bytes) -> str:
    """The MAC a stored record should have."""
    row = rec.as_row()
    row.pop("hash")
    return record_hash(chain_key, **row)


def hash_matches(rec: AuditRecord, chain_key: bytes) -> bool:
    """Constant-time check of a stored record's MAC."""
    return hmac.compare_digest(recompute_hash(rec, chain_key), rec.hash)


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """Outcome of walking the chain."""

    ok: bool
    records_checked: int
    first_bad_sequence: int = 0
    reason: str = ""
    head_sequence: int = 0
    head_hash: str = ""


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """ListAuditEvents filters (empty/None: any)."""

    action: AuditAction | None = None
    outcome: AuditOutcome | None = None
    key_name: str = ""
    team: str = ""
    request_id: str = ""
    start_time: dt.datetime | None = None
    end_time: dt.datetime | None = None


def build_records(
    drafts: Sequence[AuditDraft], head: tuple[int, str] | None, now: dt.datetime, chain_key: bytes
) -> list[AuditRecord]:
    """Chains ``drafts`` after ``head`` (the last stored sequence and hash, or None)."""
    seq, prev = head if head is not None else (0, GENESIS_HASH)
    out = []
    for draft in drafts:
        seq += 1
        rec = chain(draft, seq, now, prev, chain_key)
        out.append(rec)
        prev = rec.hash
    return out

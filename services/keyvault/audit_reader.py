"""Reading the audit log: pages of records, newest first, and the walk that verifies the chain."""

from __future__ import annotations

import hmac
from dataclasses import replace
from typing import Any

from sqlalchemy import and_, func, select, text
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncEngine

from services.keyvault.audit_records import GENESIS_HASH, AuditFilter, AuditRecord, VerifyResult, hash_matches
from services.keyvault.orm import audit_events


def record_from_row(row: Row[Any]) -> AuditRecord:
    m = row._mapping
    return AuditRecord(**{c.name: m[c.name] for c in audit_events.columns})


async def list_events(
    engine: AsyncEngine, flt: AuditFilter, page_size: int, before_sequence: int | None
) -> tuple[list[AuditRecord], int | None]:
    """Newest first; returns the page and the sequence to continue below (None when done)."""
    c = audit_events.c
    conds = []
    if before_sequence is not None:
        conds.append(c.sequence < before_sequence)
    if flt.action is not None:
        conds.append(c.action == flt.action.value)
    if flt.outcome is not None:
        conds.append(c.outcome == flt.outcome.value)
    if flt.key_name:
        conds.append(c.key_name == flt.key_name)
    if flt.team:
        conds.append(c.team == flt.team)
    if flt.request_id:
        conds.append(c.request_id == flt.request_id)
    if flt.start_time is not None:
        conds.append(c.created_at >= flt.start_time)
    if flt.end_time is not None:
        conds.append(c.created_at < flt.end_time)
    stmt = select(audit_events).order_by(c.sequence.desc()).limit(page_size + 1)
    if conds:
        stmt = stmt.where(and_(*conds))
    async with engine.connect() as conn:
        rows = (await conn.execute(stmt)).all()
    records = [record_from_row(r) for r in rows[:page_size]]
    more = len(rows) > page_size
    return records, (records[-1].sequence if more and records else None)


async def verify_chain(
    engine: AsyncEngine, chain_key: bytes, page: int = 5000, anchor: tuple[int, str] | None = None,
) -> VerifyResult:
    """Walks the chain in sequence order; names the first record that does not verify.

    A record whose MAC is not the HMAC under ``chain_key`` is HASH_MISMATCH, whatever else
    it holds: records hashed with plain SHA-256 (the unkeyed ``igw-audit/v1`` format, or a
    forger without the key) never verify. ``anchor`` (sequence, hash), a head recorded outside
    the vault, must still be in the chain: ANCHOR_MISSING when the chain now ends before it
    (its tail was cut off), ANCHOR_MISMATCH when that record's hash differs.
    """
    result, anchor_hash = await _walk(engine, chain_key, page, anchor[0] if anchor else 0)
    if not result.ok or anchor is None:
        return result
    seq, want = anchor
    if result.head_sequence < seq:
        return replace(result, ok=False, first_bad_sequence=seq, reason="ANCHOR_MISSING")
    if not hmac.compare_digest(anchor_hash, want.lower()):
        return replace(result, ok=False, first_bad_sequence=seq, reason="ANCHOR_MISMATCH")
    return result


async def _walk(engine: AsyncEngine, chain_key: bytes, page: int, anchor_seq: int) -> tuple[VerifyResult, str]:
    """The walk itself; also returns the hash of record ``anchor_seq`` ("" when not reached)."""
    checked = 0
    expected_seq = 1
    prev = GENESIS_HASH
    after = 0
    anchor_hash = ""
    c = audit_events.c
    async with engine.connect() as conn:
        # One snapshot for the whole walk, so concurrent appends cannot look like gaps.
        async with conn.begin():
            await conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"))
            while True:
                rows = (
                    await conn.execute(
                        select(audit_events).where(c.sequence > after).order_by(c.sequence).limit(page)
                    )
                ).all()
                if not rows:
                    break
                for row in rows:
                    rec = record_from_row(row)
                    if rec.sequence != expected_seq:
                        return VerifyResult(False, checked, expected_seq, "SEQUENCE_GAP"), anchor_hash
                    checked += 1
                    if not hash_matches(rec, chain_key):
                        return VerifyResult(False, checked, rec.sequence, "HASH_MISMATCH"), anchor_hash
                    if rec.prev_hash != prev:
                        return VerifyResult(False, checked, rec.sequence, "CHAIN_BROKEN"), anchor_hash
                    if rec.sequence == anchor_seq:
                        anchor_hash = rec.hash
                    prev = rec.hash
                    expected_seq += 1
                    after = rec.sequence
    head = (after, prev) if checked else (0, "")
    return VerifyResult(True, checked, head_sequence=head[0], head_hash=head[1]), anchor_hash


async def chain_head(engine: AsyncEngine) -> int:
    """The last sequence (0 when empty)."""
    async with engine.connect() as conn:
        value = (await conn.execute(select(func.coalesce(func.max(audit_events.c.sequence), 0)))).scalar_one()
    return int(value)

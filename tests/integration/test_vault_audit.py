"""The vault's audit log: fail closed, append-only, tamper-evident, gap-free under concurrency."""

# ruff: noqa: F811  (the `vault` fixture is imported from test_vault_service)

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from sqlalchemy.engine import make_url

from igw.keyvault.v1 import keyvault_pb2 as pb
from services.keyvault import audit_records as AR
from services.keyvault.crypto import MasterKey
from services.keyvault.rewrap import RewrapError, rewrap
from tests.integration.test_vault_service import (  # noqa: F401  (fixtures)
    Vault,
    libpq,
    reason_of,
    start_vault,
    stop_vault,
    vault,
)


async def test_issue_credential_refuses_when_the_database_turns_read_only(vault: Vault) -> None:
    await vault.create("k")
    await vault.issue()  # warm: the key is cached, so only the audit write can fail now
    db = make_url(vault.url).database
    vault.sql(f'ALTER DATABASE "{db}" SET default_transaction_read_only = on')
    # Existing sessions keep their settings: drop them, as a failover to a read-only replica would.
    vault.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
              (db,))
    try:
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await vault.issue(request_id="ro-1")
            assert (info.value.code(), reason_of(info.value)) == (grpc.StatusCode.UNAVAILABLE, "AUDIT_UNAVAILABLE")
            assert info.value.details() and "sk-" not in info.value.details()
    finally:
        with psycopg.connect(libpq(vault.url), autocommit=True) as conn:
            conn.execute("SET default_transaction_read_only = off")
            conn.execute(f'ALTER DATABASE "{db}" RESET default_transaction_read_only')
    vault.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
              (db,))
    assert vault.sql("SELECT count(*) FROM audit_events WHERE request_id = 'ro-1'") == [(0,)]
    # Once the store is writable again, leases flow again and the chain is intact.
    assert (await vault.issue()).key_name == "k"
    assert (await vault.admin.VerifyAuditLog(pb.VerifyAuditLogRequest())).ok


async def test_issue_credential_refuses_while_the_audit_table_is_locked(vault: Vault) -> None:
    await vault.create("k")
    await vault.issue()
    locked, release = threading.Event(), threading.Event()

    def hold_lock() -> None:
        with psycopg.connect(libpq(vault.url)) as conn:
            conn.execute("LOCK TABLE audit_events IN ACCESS EXCLUSIVE MODE")
            locked.set()
            release.wait(30)
            conn.rollback()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    try:
        assert await asyncio.to_thread(locked.wait, 10)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await vault.issue(request_id="locked-1")
        assert (info.value.code(), reason_of(info.value)) == (grpc.StatusCode.UNAVAILABLE, "AUDIT_UNAVAILABLE")
    finally:
        release.set()
        await asyncio.to_thread(holder.join, 10)
    assert (await vault.issue(request_id="after-lock")).key_name == "k"


async def test_the_database_refuses_updates_and_deletes_of_audit_records(vault: Vault) -> None:
    await vault.create("k")
    for stmt in ("UPDATE audit_events SET team = 'x'", "DELETE FROM audit_events", "TRUNCATE audit_events"):
        with pytest.raises(psycopg.Error, match="append-only"):
            vault.sql(stmt)
    assert vault.sql("SELECT count(*) FROM audit_events") == [(1,)]


async def test_one_edited_audit_row_is_named_by_verify(vault: Vault) -> None:
    await vault.create("k", allowed_teams=["a"])
    for i in range(6):
        await vault.issue(team="a", request_id=f"r{i}")
    assert (await vault.admin.VerifyAuditLog(pb.VerifyAuditLogRequest())).ok
    # An attacker with DB access (able to disable the triggers) rewrites one record.
    vault.sql("ALTER TABLE audit_events DISABLE TRIGGER USER")
    vault.sql("UPDATE audit_events SET team = 'b' WHERE sequence = 4")
    vault.sql("ALTER TABLE audit_events ENABLE TRIGGER USER")
    verdict = await vault.admin.VerifyAuditLog(pb.VerifyAuditLogRequest())
    assert (verdict.ok, verdict.first_bad_sequence, verdict.reason) == (False, 4, "HASH_MISMATCH")
    assert verdict.records_checked == 4


async def _records(url: str) -> list[Any]:
    from sqlalchemy import select
    from sqlalchemy.ext.asyncio import create_async_engine

    from services.keyvault.audit_reader import record_from_row
    from services.keyvault.orm import audit_events

    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(select(audit_events).order_by(audit_events.c.sequence))).all()
    finally:
        await engine.dispose()
    return [record_from_row(r) for r in rows]


def _forge(vault: Vault, sequence: int, team: str, new_hash: str, prev_hash: str) -> None:
    vault.sql("UPDATE audit_events SET team = %s, hash = %s, prev_hash = %s WHERE sequence = %s",
              (team, new_hash, prev_hash, sequence))


def _unkeyed_v1_hash(rec: Any, prev_hash: str) -> str:
    """The record hash as it was before the chain was keyed: plain SHA-256, anyone can compute it."""
    fields = [
        "igw-audit/v1", rec.sequence, AR.canonical_ts(rec.created_at), rec.actor, rec.action, rec.outcome,
        rec.reason, rec.provider, rec.key_name, rec.key_version, rec.team, rec.model, rec.request_id,
        rec.lease_id_hmac, prev_hash,
    ]
    return hashlib.sha256(json.dumps(fields, separators=(",", ":"), ensure_ascii=True).encode()).hexdigest()


def _unkeyed_v2_hash(rec: Any, prev_hash: str) -> str:
    """Today's canonical form, but hashed with plain SHA-256 (a forger who read the code, not the key)."""
    fields = {**rec.as_row(), "prev_hash": prev_hash}
    fields.pop("hash")
    return hashlib.sha256(AR.canonical_record(**fields)).hexdigest()


async def test_a_rehashed_edit_by_the_key_holder_breaks_the_chain_at_the_next_record(vault: Vault) -> None:
    await vault.create("k")
    for i in range(3):
        await vault.issue(request_id=f"r{i}")
    rec = (await _records(vault.url))[1]
    assert rec.sequence == 2
    forged = AR.AuditRecord(**{**rec.as_row(), "team": "someone-else"})  # type: ignore[arg-type]
    # Even with the chain key, an edit cannot be hidden without rewriting every later record.
    new_hash = AR.recompute_hash(forged, vault.service._writer.chain_key)
    vault.sql("ALTER TABLE audit_events DISABLE TRIGGER USER")
    vault.sql("UPDATE audit_events SET team = 'someone-else', hash = %s WHERE sequence = 2", (new_hash,))
    vault.sql("ALTER TABLE audit_events ENABLE TRIGGER USER")
    verdict = await vault.admin.VerifyAuditLog(pb.VerifyAuditLogRequest())
    assert (verdict.ok, verdict.first_bad_sequence, verdict.reason) == (False, 3, "CHAIN_BROKEN")


@pytest.mark.parametrize("unkeyed", [_unkeyed_v1_hash, _unkeyed_v2_hash], ids=["v1-format", "v2-format"])
async def test_an_edit_with_the_whole_tail_rehashed_without_the_key_is_named(
    vault: Vault, unkeyed: Callable[[Any, str], str]
) -> None:
    """The old attack: edit one record, re-hash it and every later one with plain SHA-256."""
    await vault.create("k", allowed_teams=["a"])
    for i in range(6):
        await vault.issue(team="a", request_id=f"r{i}")
    records = await _records(vault.url)
    assert len(records) == 7
    vault.sql("ALTER TABLE audit_events DISABLE TRIGGER USER")
    prev = records[2].hash  # the tail from sequence 4 on is rewritten; 1..3 stay genuine
    for rec in records[3:]:
        team = "b" if rec.sequence == 4 else rec.team
        new_hash = unkeyed(AR.AuditRecord(**{**rec.as_row(), "team": team}), prev)  # type: ignore[arg-type]
        _forge(vault, rec.sequence, team, new_hash, prev)
        prev = new_hash
    vault.sql("ALTER TABLE audit_events ENABLE TRIGGER USER")
    # The forged chain is internally consistent: every prev_hash matches, so only the MAC can tell.
    forged = await _records(vault.url)
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(forged))
    verdict = await vault.admin.VerifyAuditLog(pb.VerifyAuditLogRequest())
    assert (verdict.ok, verdict.first_bad_sequence, verdict.reason) == (False, 4, "HASH_MISMATCH")
    assert verdict.records_checked == 4


async def test_a_whole_chain_rewritten_without_the_key_fails_at_the_first_record(vault: Vault) -> None:
    await vault.create("k")
    for i in range(3):
        await vault.issue(request_id=f"r{i}")
    vault.sql("ALTER TABLE audit_events DISABLE TRIGGER USER")
    prev = AR.GENESIS_HASH
    for rec in await _records(vault.url):
        new_hash = _unkeyed_v2_hash(rec, prev)
        _forge(vault, rec.sequence, rec.team, new_hash, prev)
        prev = new_hash
    vault.sql("ALTER TABLE audit_events ENABLE TRIGGER USER")
    verdict = await vault.admin.VerifyAuditLog(pb.VerifyAuditLogRequest())
    assert (verdict.ok, verdict.first_bad_sequence, verdict.reason) == (False, 1, "HASH_MISMATCH")


async def test_the_chain_key_lives_in_the_database_only_wrapped(vault: Vault) -> None:
    await vault.create("k")
    await vault.issue()
    key = vault.service._writer.chain_key
    assert key is not None and len(key) == 32
    ((key_id, value),) = vault.sql("SELECT master_key_id, value FROM vault_meta WHERE name = 'audit_chain_key'")
    assert key_id == MasterKey(vault.master).key_id and key not in bytes(value)
    assert MasterKey(vault.master).unwrap_chain_key(bytes(value)) == key
    dump = vault.sql("SELECT string_agg(t::text, '|') FROM (SELECT * FROM audit_events) t")[0][0]
    assert key.hex() not in dump


async def test_a_replica_started_later_uses_the_same_chain_key(pki: Path, vault: Vault) -> None:
    await vault.create("k")
    other = await start_vault(pki, vault.url, vault.master)
    try:
        assert other.service._writer.chain_key == vault.service._writer.chain_key
    finally:
        await stop_vault(other)


async def test_a_tampered_chain_key_seals_the_vault(pki: Path, fresh_database: str) -> None:
    master = os.urandom(32)
    v = await start_vault(pki, fresh_database, master)
    try:
        await v.create("k")
    finally:
        await stop_vault(v)
    wrapped = MasterKey(master).wrap_chain_key(os.urandom(32))
    # One bit of the wrapped key flipped (setting the last byte to 0 left it intact 1 time in 256).
    v.sql("UPDATE vault_meta SET value = %s WHERE name = 'audit_chain_key'",
          (wrapped[:-1] + bytes([wrapped[-1] ^ 1]),))
    sealed = await start_vault(pki, fresh_database, master)
    try:
        assert sealed.service.sealed
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await sealed.issue()
        assert reason_of(info.value) == "MASTER_KEY_UNAVAILABLE"
    finally:
        await stop_vault(sealed)


async def test_a_deleted_chain_key_cannot_be_replaced_unnoticed(pki: Path, fresh_database: str) -> None:
    master = os.urandom(32)
    v = await start_vault(pki, fresh_database, master)
    try:
        await v.create("k")
        await v.issue()
    finally:
        await stop_vault(v)
    v.sql("DELETE FROM vault_meta WHERE name = 'audit_chain_key'")
    again = await start_vault(pki, fresh_database, master)
    try:
        await again.issue()  # a new key is made, so the vault serves ...
        verdict = await again.admin.VerifyAuditLog(pb.VerifyAuditLogRequest())
        # ... but the records made under the lost key no longer verify.
        assert (verdict.ok, verdict.first_bad_sequence, verdict.reason) == (False, 1, "HASH_MISMATCH")
    finally:
        await stop_vault(again)


async def test_the_fast_path_forces_synchronous_commit_on_whatever_the_database_default(vault: Vault) -> None:
    db = make_url(vault.url).database
    vault.sql(f'ALTER DATABASE "{db}" SET synchronous_commit = off')
    try:
        with psycopg.connect(libpq(vault.url), autocommit=True) as conn:  # the default now says off
            assert conn.execute("SHOW synchronous_commit").fetchone() == ("off",)
        await vault.create("k")  # locked path: learns the chain head
        await vault.issue()  # fast path: opens its own connection, after the ALTER
        await vault.issue()
        writer = vault.service._writer
        conn = writer._conn
        assert conn is not None and not conn.closed
        cur = await conn.execute("SHOW synchronous_commit")
        assert await cur.fetchone() == ("on",)
        assert vault.sql("SELECT count(*) FROM audit_events") == [(3,)]
    finally:
        vault.sql(f'ALTER DATABASE "{db}" RESET synchronous_commit')


async def test_the_head_sequence_gauge_follows_the_chain(pki: Path, vault: Vault) -> None:
    await vault.create("k")
    for i in range(4):
        await vault.issue(request_id=f"g{i}")
    assert vault.runtime.registry.get_sample_value("igw_keyvault_audit_head_sequence") == 5
    other = await start_vault(pki, vault.url, vault.master)
    try:  # a replica (or a restart) starts from the stored head, not from 0
        assert other.runtime.registry.get_sample_value("igw_keyvault_audit_head_sequence") == 5
    finally:
        await stop_vault(other)


async def test_a_deleted_audit_row_shows_as_a_sequence_gap(vault: Vault) -> None:
    await vault.create("k")
    for i in range(4):
        await vault.issue(request_id=f"r{i}")
    vault.sql("ALTER TABLE audit_events DISABLE TRIGGER USER")
    vault.sql("DELETE FROM audit_events WHERE sequence = 3")
    vault.sql("ALTER TABLE audit_events ENABLE TRIGGER USER")
    verdict = await vault.admin.VerifyAuditLog(pb.VerifyAuditLogRequest())
    assert (verdict.ok, verdict.first_bad_sequence, verdict.reason) == (False, 3, "SEQUENCE_GAP")


async def test_200_concurrent_leases_make_one_gap_free_verified_chain(vault: Vault) -> None:
    await vault.create("k1")
    await vault.create("k2")
    results = await asyncio.gather(*(vault.issue(request_id=f"c{i}") for i in range(200)))
    assert len({r.lease_id for r in results}) == 200
    seqs = [s for (s,) in vault.sql("SELECT sequence FROM audit_events ORDER BY sequence")]
    assert seqs == list(range(1, 203))
    verdict = await vault.admin.VerifyAuditLog(pb.VerifyAuditLogRequest())
    assert verdict.ok and verdict.records_checked == 202
    # Group commit actually grouped: fewer batches than records.
    hist = vault.runtime.registry.get_sample_value("igw_keyvault_audit_batch_size_count")
    assert hist is not None and hist < 202


async def test_two_replicas_extend_one_chain(pki: Path, vault: Vault) -> None:
    other = await start_vault(pki, vault.url, vault.master)
    try:
        await vault.create("k")
        calls = [v.issue(request_id=f"x{i}") for i in range(60) for v in (vault, other)]
        await asyncio.gather(*calls)
        seqs = [s for (s,) in vault.sql("SELECT sequence FROM audit_events ORDER BY sequence")]
        assert seqs == list(range(1, 122))
        assert (await other.admin.VerifyAuditLog(pb.VerifyAuditLogRequest())).ok
    finally:
        await stop_vault(other)


async def test_rewrap_moves_every_data_key_to_the_new_master_key(pki: Path, fresh_database: str) -> None:
    old, new = os.urandom(32), os.urandom(32)
    v = await start_vault(pki, fresh_database, old)
    secrets = {f"k{i}": f"sk-rewrap-{uuid.uuid4().hex}" for i in range(3)}
    try:
        for name, secret in secrets.items():
            await v.create(name, secret=secret)
        await v.admin.RotateProviderKey(pb.RotateProviderKeyRequest(request_id="r", name="k0", secret="sk-k0-v2"))
        before = v.sql("SELECT key_id, version, ciphertext, nonce, wrapped_data_key FROM key_versions ORDER BY 1, 2")
    finally:
        await stop_vault(v)
    with pytest.raises(RewrapError):
        await asyncio.to_thread(rewrap, fresh_database, os.urandom(32), new)  # not the vault's key
    count = await asyncio.to_thread(rewrap, fresh_database, old, new)
    assert count == 4
    with psycopg.connect(libpq(fresh_database)) as conn:
        after = conn.execute(
            "SELECT key_id, version, ciphertext, nonce, wrapped_data_key, master_key_id FROM key_versions ORDER BY 1, 2"
        ).fetchall()
        rewrap_rows = conn.execute("SELECT action, outcome FROM audit_events WHERE action = 'REWRAP'").fetchall()
    for b, a in zip(before, after, strict=True):
        assert (b[2], b[3]) == (a[2], a[3])  # ciphertext and nonce untouched
        assert b[4] != a[4] and a[5] == MasterKey(new).key_id
    assert rewrap_rows == [("REWRAP", "ALLOWED")]

    stale = await start_vault(pki, fresh_database, old)
    try:
        assert stale.service.sealed
    finally:
        await stop_vault(stale)
    fresh = await start_vault(pki, fresh_database, new)
    try:
        got = {}
        for _ in range(6):
            lease = await fresh.issue()
            got[lease.key_name] = lease.secret
        assert got == {**secrets, "k0": "sk-k0-v2"}
        # The chain key moved to the new master key with the data keys: one chain, still verifying.
        verdict = await fresh.admin.VerifyAuditLog(pb.VerifyAuditLogRequest())
        assert verdict.ok and verdict.records_checked >= 5
    finally:
        await stop_vault(fresh)
    with psycopg.connect(libpq(fresh_database)) as conn:
        meta = conn.execute("SELECT name, master_key_id FROM vault_meta ORDER BY name").fetchall()
    assert meta == [("audit_chain_key", MasterKey(new).key_id), ("master_check", MasterKey(new).key_id)]


async def test_the_rewrap_command_moves_the_keys_and_names_who_ran_it(
    pki: Path, fresh_database: str, tmp_path: Path,
) -> None:
    import base64
    import subprocess
    import sys

    old, new = os.urandom(32), os.urandom(32)
    v = await start_vault(pki, fresh_database, old)
    try:
        await v.create("k", secret="sk-cli-rewrap-0001")
    finally:
        await stop_vault(v)
    (tmp_path / "old.key").write_text(base64.b64encode(old).decode())
    (tmp_path / "new.key").write_text(base64.b64encode(new).decode())
    env = {k: val for k, val in os.environ.items() if not k.startswith("IGW_")}
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "vault", "rewrap", "--database-url", fresh_database,
         "--old-key-file", str(tmp_path / "old.key"), "--new-key-file", str(tmp_path / "new.key")],
        cwd=root, env=env, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    with psycopg.connect(libpq(fresh_database)) as conn:
        (actor,) = conn.execute("SELECT actor FROM audit_events WHERE action = 'REWRAP'").fetchone() or ("",)
    assert actor.startswith("local:igw-vault-rewrap:") and actor != "local:igw-vault-rewrap:"
    fresh = await start_vault(pki, fresh_database, new)
    try:
        assert (await fresh.issue()).secret == "sk-cli-rewrap-0001"
        assert (await fresh.admin.VerifyAuditLog(pb.VerifyAuditLogRequest())).ok
    finally:
        await stop_vault(fresh)


async def test_a_cut_off_tail_shows_against_an_anchor_kept_outside_the_vault(vault: Vault) -> None:
    """Deleting the newest records leaves a chain that verifies on its own; the head an operator
    recorded from an earlier verify (`igw audit verify` prints it) shows the cut."""
    await vault.create("k")
    for i in range(5):
        await vault.issue(request_id=f"r{i}")
    first = await vault.admin.VerifyAuditLog(pb.VerifyAuditLogRequest())
    records = await _records(vault.url)
    assert first.ok and (first.head_sequence, first.head_hash) == (records[-1].sequence, records[-1].hash)
    anchor = pb.VerifyAuditLogRequest(anchor_sequence=first.head_sequence, anchor_hash=first.head_hash)
    await vault.issue(request_id="later")  # the chain grows past the anchor: still fine
    later = await vault.admin.VerifyAuditLog(anchor)
    assert later.ok and later.head_sequence == first.head_sequence + 1
    # An attacker with DB access (able to disable the triggers) deletes the newest three records.
    vault.sql("ALTER TABLE audit_events DISABLE TRIGGER USER")
    vault.sql("DELETE FROM audit_events WHERE sequence > %s", (first.head_sequence - 2,))
    vault.sql("ALTER TABLE audit_events ENABLE TRIGGER USER")
    alone = await vault.admin.VerifyAuditLog(pb.VerifyAuditLogRequest())
    assert alone.ok and alone.head_sequence == first.head_sequence - 2  # the chain alone cannot tell
    cut = await vault.admin.VerifyAuditLog(anchor)
    assert (cut.ok, cut.reason, cut.first_bad_sequence) == (False, "ANCHOR_MISSING", first.head_sequence)
    # A wrong hash for a record that is there, and malformed anchors.
    wrong = await vault.admin.VerifyAuditLog(pb.VerifyAuditLogRequest(anchor_sequence=2, anchor_hash="0" * 64))
    assert (wrong.ok, wrong.reason) == (False, "ANCHOR_MISMATCH")
    good = await vault.admin.VerifyAuditLog(pb.VerifyAuditLogRequest(anchor_sequence=2, anchor_hash=records[1].hash))
    assert good.ok
    for bad in (pb.VerifyAuditLogRequest(anchor_sequence=2, anchor_hash="xyz"),
                pb.VerifyAuditLogRequest(anchor_sequence=-1, anchor_hash=records[1].hash),
                pb.VerifyAuditLogRequest(anchor_hash=records[1].hash)):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await vault.admin.VerifyAuditLog(bad)
        assert (info.value.code(), reason_of(info.value)) == (grpc.StatusCode.INVALID_ARGUMENT, "ANCHOR_INVALID")

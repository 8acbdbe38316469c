"""Data access for provider keys, versions, idempotency, the master-key check and chain key.

Plain parameterised SQLAlchemy Core statements on the typed tables of ``orm``; every
mutation runs on a connection whose transaction the caller owns (the audit writer's
batch transaction for admin actions, so a change and its audit record commit together).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, exists, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.keyvault import crypto as C
from services.keyvault import domain as D
from services.keyvault.orm import admin_requests, audit_events, key_versions, provider_keys, vault_meta

_LOGGER = logging.getLogger(__name__)

MASTER_CHECK = "master_check"
#: vault_meta row holding the audit chain key, wrapped by (a key derived from) the master key.
CHAIN_KEY = "audit_chain_key"


@dataclass(frozen=True, slots=True)
class ActiveKey:
    """What IssueCredential needs of one key: its policy and its current sealed version."""

    name: str
    provider: str
    base_url: str
    allowed_teams: frozenset[str]
    all_teams: bool
    version: int
    sealed: C.SealedSecret

    def allows(self, team: str) -> bool:
        """May ``team`` use this key?"""
        return self.all_teams or team in self.allowed_teams


def _sealed(m: Any) -> C.SealedSecret:
    return C.SealedSecret(
        bytes(m["ciphertext"]), bytes(m["nonce"]), bytes(m["wrapped_data_key"]), bytes(m["wrap_nonce"]),
        m["master_key_id"],
    )


async def active_keys(engine: AsyncEngine, provider: str) -> list[ActiveKey]:
    """Every ACTIVE key of ``provider`` with its ACTIVE version, by name."""
    k, v = provider_keys.c, key_versions.c
    stmt = (
        select(
            k.name, k.provider, k.base_url, k.allowed_teams, k.all_teams, v.version, v.ciphertext, v.nonce,
            v.wrapped_data_key, v.wrap_nonce, v.master_key_id,
        )
        .select_from(provider_keys.join(key_versions, v.key_id == k.id))
        .where(k.provider == provider, k.state == D.KeyState.ACTIVE.value, v.state == D.KeyState.ACTIVE.value)
        .order_by(k.name)
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(stmt)).all()
    return [
        ActiveKey(
            r.name, r.provider, r.base_url, frozenset(r.allowed_teams or ()), bool(r.all_teams), r.version,
            _sealed(r._mapping),
        )
        for r in rows
    ]


def _version_info(m: Any) -> D.KeyVersionInfo:
    return D.KeyVersionInfo(
        version=m["version"], state=D.KeyState(m["state"]), created_at=m["created_at"],
        grace_end=m["grace_end"], fingerprint=m["fingerprint"],
    )


def _key_info(row: Row[Any], versions: Sequence[D.KeyVersionInfo]) -> D.ProviderKeyInfo:
    m = row._mapping
    period = m["rotation_period_seconds"]
    return D.ProviderKeyInfo(
        name=m["name"], provider=m["provider"], base_url=m["base_url"],
        allowed_teams=tuple(m["allowed_teams"] or ()), all_teams=bool(m["all_teams"]),
        labels=dict(m["labels"] or {}), rotation_period=dt.timedelta(seconds=period) if period else None,
        state=D.KeyState(m["state"]), created_at=m["created_at"], versions=tuple(versions),
    )


async def _load_infos(conn: AsyncConnection, key_rows: Sequence[Row[Any]]) -> list[D.ProviderKeyInfo]:
    if not key_rows:
        return []
    ids = [r.id for r in key_rows]
    v = key_versions.c
    vrows = (
        await conn.execute(
            select(v.key_id, v.version, v.state, v.created_at, v.grace_end, v.fingerprint)
            .where(v.key_id.in_(ids))
            .order_by(v.key_id, v.version.desc())
        )
    ).all()
    by_key: dict[int, list[D.KeyVersionInfo]] = {}
    for vr in vrows:
        by_key.setdefault(vr.key_id, []).append(_version_info(vr._mapping))
    return [_key_info(r, by_key.get(r.id, [])) for r in key_rows]


async def get_key(conn: AsyncConnection, name: str, *, for_update: bool = False) -> D.ProviderKeyInfo | None:
    """One key with its versions (optionally row-locked)."""
    stmt = select(provider_keys).where(provider_keys.c.name == name)
    if for_update:
        stmt = stmt.with_for_update()
    row = (await conn.execute(stmt)).first()
    if row is None:
        return None
    return (await _load_infos(conn, [row]))[0]


async def list_keys(
    engine: AsyncEngine, provider: str, page_size: int, after_name: str | None
) -> tuple[list[D.ProviderKeyInfo], str | None]:
    """Keys by name, paged by name; returns the page and the last name when more follow."""
    k = provider_keys.c
    conds = []
    if provider:
        conds.append(k.provider == provider)
    if after_name is not None:
        conds.append(k.name > after_name)
    stmt = select(provider_keys).order_by(k.name).limit(page_size + 1)
    if conds:
        stmt = stmt.where(and_(*conds))
    async with engine.connect() as conn:
        rows = (await conn.execute(stmt)).all()
        infos = await _load_infos(conn, rows[:page_size])
    more = len(rows) > page_size
    return infos, (infos[-1].name if more and infos else None)


# ---------------------------------------------------------------------------- mutations


async def insert_key(
    conn: AsyncConnection, new: D.NewKey, sealed: C.SealedSecret, fingerprint: str, now: dt.datetime
) -> None:
    """Inserts a key and its version 1 (ACTIVE)."""
    key_id = (
        await conn.execute(
            insert(provider_keys)
            .values(
                name=new.name, provider=new.provider, base_url=new.base_url,
                allowed_teams=list(new.allowed_teams), all_teams=new.all_teams, labels=dict(new.labels),
                rotation_period_seconds=int(new.rotation_period.total_seconds()) if new.rotation_period else None,
                state=D.KeyState.ACTIVE.value, created_at=now,
            )
            .returning(provider_keys.c.id)
        )
    ).scalar_one()
    await _insert_version(conn, key_id, 1, sealed, fingerprint, now)


async def _insert_version(
    conn: AsyncConnection, key_id: int, version: int, sealed: C.SealedSecret, fingerprint: str, now: dt.datetime
) -> None:
    await conn.execute(
        insert(key_versions).values(
            key_id=key_id, version=version, state=D.KeyState.ACTIVE.value, ciphertext=sealed.ciphertext,
            nonce=sealed.nonce, wrapped_data_key=sealed.wrapped_data_key, wrap_nonce=sealed.wrap_nonce,
            master_key_id=sealed.master_key_id, fingerprint=fingerprint, created_at=now, grace_end=None,
        )
    )


async def key_id(conn: AsyncConnection, name: str) -> int:
    """The row id of a key (which must exist)."""
    return int((await conn.execute(select(provider_keys.c.id).where(provider_keys.c.name == name))).scalar_one())


async def add_version(
    conn: AsyncConnection, name: str, version: int, sealed: C.SealedSecret, fingerprint: str,
    now: dt.datetime, grace_end: dt.datetime,
) -> None:
    """Moves the ACTIVE version to GRACE (or DISABLED for zero grace) and adds ``version`` ACTIVE."""
    kid = await key_id(conn, name)
    v = key_versions.c
    old_state = D.KeyState.GRACE.value if grace_end > now else D.KeyState.DISABLED.value
    await conn.execute(
        update(key_versions)
        .where(v.key_id == kid, v.state == D.KeyState.ACTIVE.value)
        .values(state=old_state, grace_end=grace_end)
    )
    await _insert_version(conn, kid, version, sealed, fingerprint, now)


async def disable_key(conn: AsyncConnection, name: str) -> None:
    """Disables a key and every version of it."""
    kid = await key_id(conn, name)
    await conn.execute(
        update(provider_keys).where(provider_keys.c.id == kid).values(state=D.KeyState.DISABLED.value)
    )
    await conn.execute(
        update(key_versions).where(key_versions.c.key_id == kid).values(state=D.KeyState.DISABLED.value)
    )


async def find_request(conn: AsyncConnection, request_id: str) -> tuple[str, str, str] | None:
    """(method, fingerprint, key_name) of a recorded admin request id."""
    a = admin_requests.c
    row = (await conn.execute(select(a.method, a.fingerprint, a.key_name).where(a.request_id == request_id))).first()
    return (row.method, row.fingerprint, row.key_name) if row else None


async def record_request(
    conn: AsyncConnection, request_id: str, method: str, fingerprint: str, key_name: str, now: dt.datetime
) -> None:
    """Remembers an admin request id (same transaction as its effect)."""
    await conn.execute(
        insert(admin_requests).values(
            request_id=request_id, method=method, fingerprint=fingerprint, key_name=key_name, created_at=now
        )
    )


# ---------------------------------------------------------------------------- master key check


async def check_master_key(
    engine: AsyncEngine, master: C.MasterKey, clock: Callable[[], dt.datetime] = D.utcnow
) -> str | None:
    """None when ``master`` is the vault's key; otherwise why not (no key bytes in it).

    The first start writes an encrypted check value; later starts must decrypt it. A vault
    that has keys but lost its check value is checked by unwrapping one stored data key.
    """
    m = vault_meta.c
    async with engine.begin() as conn:
        row = (await conn.execute(select(m.master_key_id, m.value).where(m.name == MASTER_CHECK))).first()
        if row is None:
            problem = await _check_against_a_version(conn, master)
            if problem is not None:
                return problem
            await conn.execute(
                pg_insert(vault_meta)
                .values(name=MASTER_CHECK, master_key_id=master.key_id, value=C.make_check_value(master),
                        updated_at=clock())
                .on_conflict_do_nothing(index_elements=["name"])
            )
            row = (await conn.execute(select(m.master_key_id, m.value).where(m.name == MASTER_CHECK))).first()
            assert row is not None
        if row.master_key_id != master.key_id or not C.verify_check_value(master, bytes(row.value)):
            return (
                f"the master key (id {master.key_id}) is not the one this vault's data is wrapped with "
                f"(id {row.master_key_id})"
            )
    return None


class ChainKeyError(Exception):
    """The stored audit chain key does not unwrap with this master key (no key bytes in it)."""


async def load_chain_key(
    engine: AsyncEngine, master: C.MasterKey, clock: Callable[[], dt.datetime] = D.utcnow
) -> bytes:
    """The audit chain key, made and stored (wrapped) on the first start; raises ChainKeyError.

    Replicas starting together agree on one key: the insert does nothing when another got
    there first, and everyone reads back the row that won.
    """
    m = vault_meta.c
    async with engine.begin() as conn:
        row = (await conn.execute(select(m.master_key_id, m.value).where(m.name == CHAIN_KEY))).first()
        if row is None:
            if (await conn.execute(select(exists().select_from(audit_events)))).scalar():
                _LOGGER.warning(
                    "audit log has records but no audit chain key: making one now; the existing records "
                    "(unkeyed igw-audit/v1 hashes, or a deleted key row) will not verify"
                )
            await conn.execute(
                pg_insert(vault_meta)
                .values(name=CHAIN_KEY, master_key_id=master.key_id,
                        value=master.wrap_chain_key(C.generate_chain_key()), updated_at=clock())
                .on_conflict_do_nothing(index_elements=["name"])
            )
            row = (await conn.execute(select(m.master_key_id, m.value).where(m.name == CHAIN_KEY))).first()
            assert row is not None
    if row.master_key_id != master.key_id:
        raise ChainKeyError(
            f"the audit chain key is wrapped by master key id {row.master_key_id}, not {master.key_id}"
        )
    try:
        return master.unwrap_chain_key(bytes(row.value))
    except C.DecryptionError:
        raise ChainKeyError("the stored audit chain key does not authenticate under this master key") from None


async def _check_against_a_version(conn: AsyncConnection, master: C.MasterKey) -> str | None:
    k, v = provider_keys.c, key_versions.c
    row = (
        await conn.execute(
            select(k.name, k.provider, v.version, v.ciphertext, v.nonce, v.wrapped_data_key, v.wrap_nonce,
                   v.master_key_id)
            .select_from(provider_keys.join(key_versions, v.key_id == k.id))
            .limit(1)
        )
    ).first()
    if row is None:
        return None
    try:
        C.unwrap_data_key(master, row.name, row.provider, row.version, _sealed(row._mapping))
    except C.DecryptionError:
        return f"the master key (id {master.key_id}) cannot unwrap the stored data keys"
    return None

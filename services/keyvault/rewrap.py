"""`igw vault rewrap`: move every data key to a new master key, never touching a secret.

In one transaction (holding the audit chain's advisory lock, so no vault replica appends
meanwhile): lock every key version, unwrap its data key with the old master key, wrap it
with the new one, replace the master-key check value, re-wrap the audit chain key (the
chain's HMAC key does not change, so the records before and after the rewrap form one chain
that verifies), and append one REWRAP audit record under that key.
The secrets' ciphertexts and nonces are not read into plaintext and not changed. Any data
key that does not unwrap with the old key aborts the whole transaction: nothing changes.

Running vaults still hold the old key: restart them with the new one (until then they
refuse keys they have not cached, failing closed with MASTER_KEY_UNAVAILABLE-style errors).
The lease-id HMAC key is derived from the master key, so HMACs written before the rewrap
are computed under the old key.
"""

from __future__ import annotations

import logging

from sqlalchemy import create_engine, func, pool, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from services.keyvault import audit_records as AR
from services.keyvault import crypto as C
from services.keyvault import domain as D
from services.keyvault.audit import CHAIN_LOCK_ID, append_sync
from services.keyvault.orm import key_versions, provider_keys, vault_meta
from services.keyvault.repository import CHAIN_KEY, MASTER_CHECK

_LOGGER = logging.getLogger(__name__)


class RewrapError(Exception):
    """The rewrap was refused; nothing was changed."""


def rewrap(
    url: str,
    old_master_key: bytes,
    new_master_key: bytes,
    *,
    actor: str = "local:igw-vault-rewrap",
    request_id: str = "",
) -> int:
    """Re-wraps every data key from ``old_master_key`` to ``new_master_key``; returns how many."""
    try:
        old, new = C.MasterKey(old_master_key), C.MasterKey(new_master_key)
    except C.MasterKeyError as err:
        raise RewrapError(str(err)) from None
    if old.key_id == new.key_id:
        raise RewrapError("the old and new master keys are the same")
    engine = create_engine(url, poolclass=pool.NullPool)
    k, v = provider_keys.c, key_versions.c
    try:
        with engine.begin() as conn:
            now = D.utcnow()
            draft = AR.AuditDraft(actor=actor, action=AR.AuditAction.REWRAP, request_id=request_id)
            # Chain lock first, as the vault's writer does before any admin change: no deadlock.
            conn.execute(select(func.pg_advisory_xact_lock(CHAIN_LOCK_ID)))
            rows = conn.execute(
                select(v.key_id, v.version, k.name, k.provider, v.ciphertext, v.nonce, v.wrapped_data_key,
                       v.wrap_nonce, v.master_key_id)
                .select_from(provider_keys.join(key_versions, v.key_id == k.id))
                .order_by(v.key_id, v.version)
                .with_for_update(of=key_versions)
            ).all()
            count = 0
            for r in rows:
                sealed = C.SealedSecret(
                    bytes(r.ciphertext), bytes(r.nonce), bytes(r.wrapped_data_key), bytes(r.wrap_nonce),
                    r.master_key_id,
                )
                try:
                    moved = C.rewrap_data_key(old, new, r.name, r.provider, r.version, sealed)
                except C.DecryptionError:
                    raise RewrapError(
                        f"key {r.name!r} version {r.version} does not unwrap with the old master key "
                        f"(id {old.key_id}); nothing was changed"
                    ) from None
                conn.execute(
                    update(key_versions)
                    .where(v.key_id == r.key_id, v.version == r.version)
                    .values(wrapped_data_key=moved.wrapped_data_key, wrap_nonce=moved.wrap_nonce,
                            master_key_id=moved.master_key_id)
                )
                count += 1
            check = conn.execute(
                select(vault_meta.c.master_key_id, vault_meta.c.value).where(vault_meta.c.name == MASTER_CHECK)
            ).first()
            if check is not None and not (
                check.master_key_id == old.key_id and C.verify_check_value(old, bytes(check.value))
            ):
                raise RewrapError(f"the old master key (id {old.key_id}) is not this vault's key")
            chain_row = conn.execute(
                select(vault_meta.c.master_key_id, vault_meta.c.value)
                .where(vault_meta.c.name == CHAIN_KEY)
                .with_for_update()
            ).first()
            if chain_row is None:
                # No vault has started on this database since the chain became keyed: start it now.
                chain_key = C.generate_chain_key()
            else:
                try:
                    if chain_row.master_key_id != old.key_id:
                        raise C.DecryptionError("wrapped by another master key")
                    chain_key = old.unwrap_chain_key(bytes(chain_row.value))
                except C.DecryptionError:
                    raise RewrapError(
                        f"the audit chain key does not unwrap with the old master key (id {old.key_id}); "
                        "nothing was changed"
                    ) from None
            for name, value in ((MASTER_CHECK, C.make_check_value(new)), (CHAIN_KEY, new.wrap_chain_key(chain_key))):
                stmt = pg_insert(vault_meta).values(name=name, master_key_id=new.key_id, value=value, updated_at=now)
                conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=["name"],
                        set_={"master_key_id": stmt.excluded.master_key_id, "value": stmt.excluded.value,
                              "updated_at": stmt.excluded.updated_at},
                    )
                )
            append_sync(conn, [draft], now, chain_key)
    finally:
        engine.dispose()
    _LOGGER.info("rewrapped data keys", extra={"count": count, "old_key_id": old.key_id, "new_key_id": new.key_id})
    return count


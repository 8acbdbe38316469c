"""SQLAlchemy 2 typed models of the vault's own database (schema owned by migrations/keyvault)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import BigInteger, Boolean, DateTime, ForeignKey, Integer, LargeBinary, MetaData, Table, Text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

_TS = DateTime(timezone=True)


class Base(DeclarativeBase):
    """Declarative base with the naming conventions."""

    metadata = MetaData(naming_convention=NAMING)


class ProviderKeyRow(Base):
    """A provider key (metadata; the secret lives in key_versions, encrypted)."""

    __tablename__ = "provider_keys"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    name: Mapped[str] = mapped_column(Text, unique=True)
    provider: Mapped[str] = mapped_column(Text)
    base_url: Mapped[str] = mapped_column(Text)
    allowed_teams: Mapped[list[str]] = mapped_column(ARRAY(Text))
    all_teams: Mapped[bool] = mapped_column(Boolean)
    labels: Mapped[dict[str, Any]] = mapped_column(JSONB)
    rotation_period_seconds: Mapped[int | None] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(_TS)


class KeyVersionRow(Base):
    """One version of a key: the secret under its own data key, the data key wrapped."""

    __tablename__ = "key_versions"

    key_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("provider_keys.id"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[str] = mapped_column(Text)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    nonce: Mapped[bytes] = mapped_column(LargeBinary)
    wrapped_data_key: Mapped[bytes] = mapped_column(LargeBinary)
    wrap_nonce: Mapped[bytes] = mapped_column(LargeBinary)
    master_key_id: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(_TS)
    grace_end: Mapped[dt.datetime | None] = mapped_column(_TS)


class AuditEventRow(Base):
    """One append-only, hash-chained audit record."""

    __tablename__ = "audit_events"

    sequence: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    created_at: Mapped[dt.datetime] = mapped_column(_TS)
    actor: Mapped[str] = mapped_column(Text)
    action: Mapped[str] = mapped_column(Text)
    outcome: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    provider: Mapped[str] = mapped_column(Text)
    key_name: Mapped[str] = mapped_column(Text)
    key_version: Mapped[int] = mapped_column(Integer)
    team: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(Text)
    request_id: Mapped[str] = mapped_column(Text)
    lease_id_hmac: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(Text)
    hash: Mapped[str] = mapped_column(Text)


class AdminRequestRow(Base):
    """An admin mutation's request id and keyed payload fingerprint (idempotency)."""

    __tablename__ = "admin_requests"

    request_id: Mapped[str] = mapped_column(Text, primary_key=True)
    method: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(Text)
    key_name: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(_TS)


class VaultMetaRow(Base):
    """Vault-wide values; ``master_check`` proves at start that the master key is right."""

    __tablename__ = "vault_meta"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    master_key_id: Mapped[str] = mapped_column(Text)
    value: Mapped[bytes] = mapped_column(LargeBinary)
    updated_at: Mapped[dt.datetime] = mapped_column(_TS)


provider_keys: Table = ProviderKeyRow.__table__  # type: ignore[assignment]
key_versions: Table = KeyVersionRow.__table__  # type: ignore[assignment]
audit_events: Table = AuditEventRow.__table__  # type: ignore[assignment]
admin_requests: Table = AdminRequestRow.__table__  # type: ignore[assignment]
vault_meta: Table = VaultMetaRow.__table__  # type: ignore[assignment]

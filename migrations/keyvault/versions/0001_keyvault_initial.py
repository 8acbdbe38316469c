"""KeyVault initial schema: provider keys, encrypted versions, hash-chained audit, idempotency.

Revision ID: 0001
Revises:
Create Date: 2025-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "provider_keys",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("provider", sa.Text, nullable=False),
        sa.Column("base_url", sa.Text, nullable=False),
        sa.Column("allowed_teams", postgresql.ARRAY(sa.Text), nullable=False, server_default="{}"),
        sa.Column("all_teams", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("labels", postgresql.JSONB, nullable=False, server_default="{}"),
        sa.Column("rotation_period_seconds", sa.BigInteger, nullable=True),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.UniqueConstraint("name", name="uq_provider_keys_name"),
        sa.CheckConstraint("state IN ('ACTIVE', 'DISABLED')", name="ck_provider_keys_state"),
        sa.CheckConstraint(
            "rotation_period_seconds IS NULL OR rotation_period_seconds > 0",
            name="ck_provider_keys_rotation_period",
        ),
    )
    op.create_index("ix_provider_keys_provider", "provider_keys", ["provider", "state"])

    op.create_table(
        "key_versions",
        sa.Column("key_id", sa.BigInteger, sa.ForeignKey("provider_keys.id", ondelete="RESTRICT"),
                  primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("ciphertext", sa.LargeBinary, nullable=False),
        sa.Column("nonce", sa.LargeBinary, nullable=False),
        sa.Column("wrapped_data_key", sa.LargeBinary, nullable=False),
        sa.Column("wrap_nonce", sa.LargeBinary, nullable=False),
        sa.Column("master_key_id", sa.Text, nullable=False),
        sa.Column("fingerprint", sa.Text, nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("grace_end", _TS, nullable=True),
        sa.CheckConstraint("version >= 1", name="ck_key_versions_version"),
        sa.CheckConstraint("state IN ('ACTIVE', 'GRACE', 'DISABLED')", name="ck_key_versions_state"),
        sa.CheckConstraint("state <> 'GRACE' OR grace_end IS NOT NULL", name="ck_key_versions_grace_end"),
        sa.CheckConstraint("octet_length(nonce) = 12 AND octet_length(wrap_nonce) = 12",
                           name="ck_key_versions_nonces"),
    )
    # At most one ACTIVE version per key: the one leases are issued on.
    op.create_index(
        "uq_key_versions_one_active", "key_versions", ["key_id"], unique=True,
        postgresql_where=sa.text("state = 'ACTIVE'"),
    )

    op.create_table(
        "audit_events",
        sa.Column("sequence", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("outcome", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False, server_default=""),
        sa.Column("provider", sa.Text, nullable=False, server_default=""),
        sa.Column("key_name", sa.Text, nullable=False, server_default=""),
        sa.Column("key_version", sa.Integer, nullable=False, server_default="0"),
        sa.Column("team", sa.Text, nullable=False, server_default=""),
        sa.Column("model", sa.Text, nullable=False, server_default=""),
        sa.Column("request_id", sa.Text, nullable=False, server_default=""),
        sa.Column("lease_id_hmac", sa.Text, nullable=False, server_default=""),
        sa.Column("prev_hash", sa.Text, nullable=False),
        sa.Column("hash", sa.Text, nullable=False),
        sa.CheckConstraint("sequence >= 1", name="ck_audit_events_sequence"),
    )
    op.create_index("ix_audit_events_request_id", "audit_events", ["request_id"])
    op.create_index("ix_audit_events_key_name", "audit_events", ["key_name", "sequence"])
    op.create_index("ix_audit_events_created_at", "audit_events", ["created_at"])
    # Append-only: the database itself refuses UPDATE, DELETE and TRUNCATE. Someone able to
    # disable triggers can still edit rows; the hash chain is what makes that visible.
    op.execute(
        """
        CREATE FUNCTION keyvault_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'audit_events is append-only' USING ERRCODE = 'insufficient_privilege';
        END
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER audit_events_no_update_delete BEFORE UPDATE OR DELETE ON audit_events "
        "FOR EACH ROW EXECUTE FUNCTION keyvault_audit_append_only()"
    )
    op.execute(
        "CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events "
        "FOR EACH STATEMENT EXECUTE FUNCTION keyvault_audit_append_only()"
    )

    op.create_table(
        "admin_requests",
        sa.Column("request_id", sa.Text, primary_key=True),
        sa.Column("method", sa.Text, nullable=False),
        sa.Column("fingerprint", sa.Text, nullable=False),
        sa.Column("key_name", sa.Text, nullable=False),
        sa.Column("created_at", _TS, nullable=False),
    )

    op.create_table(
        "vault_meta",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("master_key_id", sa.Text, nullable=False),
        sa.Column("value", sa.LargeBinary, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("vault_meta")
    op.drop_table("admin_requests")
    op.drop_table("audit_events")
    op.execute("DROP FUNCTION IF EXISTS keyvault_audit_append_only()")
    op.drop_table("key_versions")
    op.drop_table("provider_keys")

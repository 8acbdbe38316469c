"""Alembic environment of the ledger (configured in code by services.common.db, no alembic.ini).

Migrations run on a synchronous psycopg engine, in one transaction that first takes a
transaction-scoped advisory lock, so several ledger replicas starting together migrate
once: the others wait, then find the schema at head and do nothing.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool, text
from sqlalchemy.engine import make_url

from services.ledger.orm import Base

# pg_advisory_xact_lock key of "ledger migrations" (any fixed bigint; shared by all replicas).
MIGRATION_LOCK_KEY = 0x16E0_1ED6_E5

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("igw_url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: set config.attributes['igw_url'] or sqlalchemy.url")
    # Migrations always run on the synchronous psycopg 3 driver.
    return make_url(url).set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def run_migrations_offline() -> None:
    """Emits SQL to stdout instead of running it."""
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Runs the migrations against the database under the migration lock."""
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

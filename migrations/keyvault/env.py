"""Alembic environment of the keyvault's own database (configured in code by services.common.db)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

VERSION_TABLE = "keyvault_alembic_version"


def _url() -> str:
    cfg = context.config
    url = cfg.attributes.get("igw_url") or cfg.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL given to the keyvault migrations")
    return str(url)


def run_offline() -> None:
    context.configure(url=_url(), literal_binds=True, version_table=VERSION_TABLE)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    engine = create_engine(_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, version_table=VERSION_TABLE, transaction_per_migration=True)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()

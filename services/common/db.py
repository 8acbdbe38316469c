"""Database plumbing shared by the ledger and the keyvault (each with its own database).

Schemas are owned by alembic: ``migrations/<component>/`` holds one alembic environment
per component (``ledger``, ``keyvault``), configured here in code (no alembic.ini), so
``upgrade(component, url)`` works the same from the service, the CLI and the tests.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(component: str, url: str) -> Config:
    """An alembic Config for ``migrations/<component>`` pointed at ``url``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR / component))
    # '%' must be escaped for configparser interpolation.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["igw_url"] = url
    return cfg


def upgrade(component: str, url: str, revision: str = "head") -> None:
    """Runs ``alembic upgrade`` for one component (synchronous; call before serving)."""
    command.upgrade(alembic_config(component, url), revision)


def downgrade(component: str, url: str, revision: str = "base") -> None:
    """Runs ``alembic downgrade`` for one component."""
    command.downgrade(alembic_config(component, url), revision)


def make_async_engine(url: str, *, pool_size: int = 10, max_overflow: int = 10) -> AsyncEngine:
    """An async engine on psycopg 3 with a bounded pool and pre-ping."""
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_pre_ping=True,
        pool_recycle=1800,
    )

"""Shared fixtures: a throwaway Postgres, a dev PKI, fresh databases, service processes.

The suite starts its own embedded Postgres unless ``IGW_TEST_DATABASE_URL`` points at
one (a server URL; databases are created on it). It never skips for want of a database.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from igw_dev import pki as pki_mod


class _ExternalPg:
    """A Postgres given by IGW_TEST_DATABASE_URL."""

    def __init__(self, url: str) -> None:
        self._url = make_url(url)

    def url(self, database: str) -> str:
        return self._url.set(database=database).render_as_string(hide_password=False)

    def libpq_dsn(self, database: str) -> str:
        return self._url.set(drivername="postgresql", database=database).render_as_string(
            hide_password=False
        )

    def create_database(self, name: str) -> None:
        with psycopg.connect(self.libpq_dsn("postgres"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{name}"')

    def terminate_connections(self, database: str) -> None:
        with psycopg.connect(self.libpq_dsn("postgres"), autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            )


@pytest.fixture(scope="session")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A running Postgres server for the whole session."""
    external = os.environ.get("IGW_TEST_DATABASE_URL")
    if external:
        yield _ExternalPg(external)
        return
    from igw_dev.pg import EmbeddedPostgres

    server = EmbeddedPostgres(tmp_path_factory.mktemp("pgdata") / "data", fast=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fresh_database(pg: object) -> Iterator[str]:
    """The SQLAlchemy URL of a brand-new empty database."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    pg.create_database(name)  # type: ignore[attr-defined]
    yield pg.url(name)  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dev PKI: ca.pem, router/keyvault/ledger, operator-admin, agent-demo-quickstart."""
    directory = tmp_path_factory.mktemp("pki")
    pki_mod.init_dev_pki(directory)
    return directory

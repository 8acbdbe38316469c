"""Readiness for a service that needs its database: one small dedicated connection, ``SELECT 1``.

The probe keeps its own connection (never one of the service's pooled ones, so a busy pool
cannot make the service look down, and a down database cannot make a probe wait for the pool)
and reconnects when it breaks, with short timeouts: a database that went away shows as
not ready within a couple of seconds, and ready again as soon as it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import psycopg
from sqlalchemy.engine import make_url

_LOGGER = logging.getLogger(__name__)


class DatabaseProbe:
    """``await probe()`` -> True when the database answers ``SELECT 1`` within ``timeout_s``."""

    def __init__(self, url: str, *, timeout_s: float = 1.0) -> None:
        self._dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        self._timeout_s = timeout_s
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self.last_ok = False

    async def __call__(self) -> bool:
        try:
            conn = self._conn
            if conn is None or conn.closed:
                new: psycopg.AsyncConnection[Any] = await asyncio.wait_for(
                    psycopg.AsyncConnection.connect(
                        self._dsn, autocommit=True, connect_timeout=max(1, round(self._timeout_s)),
                        application_name="igw-readiness",
                    ),
                    self._timeout_s * 2,
                )
                conn = self._conn = new
            await asyncio.wait_for(conn.execute("SELECT 1"), self._timeout_s)
            self.last_ok = True
        except (Exception, TimeoutError) as err:
            if self.last_ok:
                _LOGGER.warning("database unreachable", extra={"error": type(err).__name__})
            self.last_ok = False
            await self.close()
        return self.last_ok

    async def close(self) -> None:
        """Drops the probe's connection."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 1.0)

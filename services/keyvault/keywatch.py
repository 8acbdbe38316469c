"""Cross-replica key-cache invalidation: every key change NOTIFYs ``igw_vault_keys`` in the
transaction that makes it; every vault LISTENs and drops its cached keys when one arrives.

A replica therefore stops leasing a disabled (or rotated-away) key as soon as the change
commits, not after ``IGW_VAULT_KEY_CACHE_SECONDS``. If the listening connection is lost, the
cache is dropped on reconnect (a notification may have been missed) and the cache's own expiry
bounds staleness in the meantime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import pq

_LOGGER = logging.getLogger(__name__)

CHANNEL = "igw_vault_keys"
NOTIFY_SQL = "SELECT pg_notify('igw_vault_keys', '')"


class KeyWatch:
    """Listens for key changes and calls ``on_change`` (from the event loop) for each."""

    def __init__(self, dsn: str, on_change: Callable[[], None], *, retry_s: float = 1.0) -> None:
        self._dsn = dsn
        self._on_change = on_change
        self._retry_s = retry_s
        self._task: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()

    def start(self) -> None:
        """Starts listening in the background."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="vault-keywatch")

    async def close(self) -> None:
        """Stops listening."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self._dsn, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._on_change()  # anything may have changed while nobody listened
                    self.listening.set()
                    await self._listen(conn)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # the database went away: retry, the cache expiry covers the gap
                _LOGGER.warning("key-change listener lost its connection; retrying",
                                extra={"error": type(err).__name__})
            self.listening.clear()
            await asyncio.sleep(self._retry_s)

    async def _listen(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Calls ``on_change`` for each batch of notifications until the connection fails.

        The event loop wakes this only when the socket has data. psycopg's own ``notifies()``
        wakes every 0.1 s to check for interrupts: about 3 ms of CPU per second in an idle vault,
        most of what it did when idle."""
        pgconn = conn.pgconn
        readable = asyncio.Event()
        loop = asyncio.get_running_loop()
        fd = pgconn.socket
        loop.add_reader(fd, readable.set)
        try:
            while True:
                await readable.wait()
                readable.clear()
                pgconn.consume_input()  # raises OperationalError once the server has gone
                changed = False
                while pgconn.notifies() is not None:
                    changed = True
                if changed:
                    self._on_change()
                if pgconn.status != pq.ConnStatus.OK:
                    raise psycopg.OperationalError("key-change listener: connection lost")
        finally:
            loop.remove_reader(fd)

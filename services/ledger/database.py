"""The ledger's database connection: one pooled psycopg 3 connection per call, one round trip
on the hot paths (the plpgsql functions created by ``migrations/ledger``).

Fault handling lives here, once:

- a connection error (Postgres restarted, backend killed) drops the dead idle connections
  (``pool.check()``) and retries once; every mutating call is idempotent (request id,
  reservation id), so a retry after an ambiguous commit counts nothing twice;
- serialization failures and deadlocks are retried a bounded number of times with jitter;
- no connection within ``timeout`` seconds (Postgres down) fails fast.

Whatever still fails becomes ``Unavailable("DATABASE_UNAVAILABLE")``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Self, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from sqlalchemy.engine import make_url

from services.common import errors as E

_LOGGER = logging.getLogger(__name__)
T = TypeVar("T")

CONFLICT_RETRIES = 5

Conn = psycopg.AsyncConnection[Any]


def libpq_dsn(url: str) -> str:
    """A SQLAlchemy URL (``postgresql+psycopg://...``) as a libpq URI."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class Database:
    """The ledger's database, behind a bounded async connection pool (the queries are in the
    repository's parts: :mod:`services.ledger.repository` and the modules it combines)."""

    def __init__(self, pool: AsyncConnectionPool[Any], timeout: float) -> None:
        self._pool = pool
        self._timeout = timeout

    @classmethod
    async def open(
        cls, url: str, *, pool_size: int = 20, timeout: float = 2.0, allow_unbudgeted: bool = False
    ) -> Self:
        """Opens the pool (waits for one connection; raises Unavailable if none comes).

        ``allow_unbudgeted`` sets ``igw.allow_unbudgeted`` on every connection: ``ledger_hold``
        then places holds for teams no budget applies to instead of refusing them (NO_BUDGET).
        """
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            libpq_dsn(url),
            min_size=min(4, pool_size),
            max_size=pool_size,
            timeout=timeout,
            kwargs={
                "autocommit": True,
                "connect_timeout": max(1, round(timeout)),
                # A statement stuck behind a lock must not hold a connection forever.
                "options": "-c statement_timeout=15000 -c TimeZone=UTC"
                + f" -c igw.allow_unbudgeted={'on' if allow_unbudgeted else 'off'}",
            },
            open=False,
            name="ledger",
        )
        try:
            await pool.open(wait=True, timeout=max(timeout, 5.0))
        except PoolTimeout:
            await pool.close()
            raise E.Unavailable("DATABASE_UNAVAILABLE", "cannot connect to the ledger database") from None
        return cls(pool, timeout)

    async def close(self) -> None:
        """Closes every connection."""
        await self._pool.close()

    async def _run(self, what: str, fn: Callable[[Conn], Awaitable[T]]) -> T:
        conflicts = 0
        reconnected = False
        while True:
            try:
                async with self._pool.connection(timeout=self._timeout) as conn:
                    return await fn(conn)
            except (pg_errors.SerializationFailure, pg_errors.DeadlockDetected) as exc:
                conflicts += 1
                if conflicts > CONFLICT_RETRIES:
                    _LOGGER.warning("giving up after %d conflicts", conflicts, extra={"op": what})
                    raise E.Unavailable(
                        "DATABASE_CONFLICT", "the ledger database is too contended; retry"
                    ) from exc
                await asyncio.sleep(random.uniform(0.001, 0.005) * conflicts)
            except PoolTimeout:
                raise E.Unavailable(
                    "DATABASE_UNAVAILABLE", "the ledger database is unavailable; retry later"
                ) from None
            except psycopg.OperationalError as exc:
                if reconnected:
                    _LOGGER.warning("database unavailable: %s", type(exc).__name__, extra={"op": what})
                    raise E.Unavailable(
                        "DATABASE_UNAVAILABLE", "the ledger database is unavailable; retry later"
                    ) from None
                reconnected = True
                _LOGGER.info("database connection lost (%s); retrying once", type(exc).__name__)
                try:
                    await asyncio.wait_for(self._pool.check(), timeout=self._timeout)
                except (TimeoutError, psycopg.Error):
                    pass

    async def _call(self, what: str, sql: str, params: Sequence[Any]) -> Any:
        async def go(conn: Conn) -> Any:
            cur = await conn.execute(sql, params)  # type: ignore[arg-type]
            row = await cur.fetchone()
            return row[0] if row else None

        return await self._run(what, go)

"""The vault's key-change listener against a real Postgres: a NOTIFY drops the cache at once,
a lost connection is noticed and replaced, and nothing fires while nothing changes."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest

from services.keyvault.keywatch import NOTIFY_SQL, KeyWatch


class Counter:
    def __init__(self) -> None:
        self.n = 0
        self.changed = asyncio.Event()

    def __call__(self) -> None:
        self.n += 1
        self.changed.set()

    async def next_change(self, timeout: float = 5.0) -> int:
        await asyncio.wait_for(self.changed.wait(), timeout)
        self.changed.clear()
        return self.n


@pytest.fixture
def database(pg: object) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    pg.create_database(name)  # type: ignore[attr-defined]
    return name


@pytest.fixture
def dsn(pg: object, database: str) -> str:
    return str(pg.libpq_dsn(database))  # type: ignore[attr-defined]


async def _notify(dsn: str, times: int = 1) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for _ in range(times):
            await conn.execute(NOTIFY_SQL)


async def _started(dsn: str) -> tuple[KeyWatch, Counter]:
    counter = Counter()
    watch = KeyWatch(dsn, counter, retry_s=0.1)
    watch.start()
    await asyncio.wait_for(watch.listening.wait(), 10)
    assert await counter.next_change() == 1  # the cache is dropped when listening starts
    return watch, counter


async def test_a_notification_reaches_the_listener_and_nothing_fires_without_one(dsn: str) -> None:
    watch, counter = await _started(dsn)
    try:
        await asyncio.sleep(0.5)
        assert counter.n == 1, "nothing changed, so nothing may fire"
        await _notify(dsn)
        assert await counter.next_change() == 2
        await _notify(dsn)
        assert await counter.next_change() == 3
    finally:
        await watch.close()


async def test_notifications_in_a_burst_all_drop_the_cache_at_least_once(dsn: str) -> None:
    watch, counter = await _started(dsn)
    try:
        await _notify(dsn, times=5)
        assert await counter.next_change() >= 2
        await asyncio.sleep(0.3)
        assert 2 <= counter.n <= 6  # one call per batch received, never more than one per notify
    finally:
        await watch.close()


async def test_a_lost_connection_is_replaced_and_the_cache_dropped_on_reconnect(
    pg: object, database: str, dsn: str
) -> None:
    watch, counter = await _started(dsn)
    try:
        assert pg.terminate_connections(database) >= 1  # type: ignore[attr-defined]
        # The listener notices the closed socket, reconnects and drops the cache again.
        assert await counter.next_change(10) == 2
        await asyncio.wait_for(watch.listening.wait(), 10)
        await _notify(dsn)
        assert await counter.next_change() == 3
    finally:
        await watch.close()


async def test_close_stops_listening(dsn: str) -> None:
    watch, counter = await _started(dsn)
    await watch.close()
    await _notify(dsn)
    await asyncio.sleep(0.3)
    assert counter.n == 1

"""The repository retries serialization failures and deadlocks a bounded number of times."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from psycopg import errors as pg_errors

from services.common import errors as E
from services.ledger import database as repo_mod
from services.ledger.repository import CONFLICT_RETRIES, Repository


class FakePool:
    """Hands out a placeholder connection and counts how often one was asked for."""

    def __init__(self) -> None:
        self.connections = 0

    @asynccontextmanager
    async def connection(self, timeout: float) -> AsyncIterator[object]:
        self.connections += 1
        yield object()


def _failing(times: int, exc: type[Exception]) -> tuple[list[int], Any]:
    calls: list[int] = []

    async def fn(conn: object) -> str:
        calls.append(1)
        if len(calls) <= times:
            raise exc("conflict")
        return "done"

    return calls, fn


class RecordingRandom:
    """Stands in for the repository's ``random``: jitter at its lower bound, calls recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.calls.append((a, b))
        return a


@pytest.fixture(autouse=True)
def jitter(monkeypatch: pytest.MonkeyPatch) -> RecordingRandom:
    """Replaces the jitter source of the repository module only (sleeps stay real: milliseconds)."""
    fake = RecordingRandom()
    monkeypatch.setattr(repo_mod, "random", fake)
    return fake


@pytest.mark.parametrize("exc", [pg_errors.SerializationFailure, pg_errors.DeadlockDetected])
async def test_a_conflict_is_retried_until_the_call_succeeds(exc: type[Exception], jitter: RecordingRandom) -> None:
    pool = FakePool()
    calls, fn = _failing(CONFLICT_RETRIES, exc)
    assert await Repository(pool, timeout=1.0)._run("op", fn) == "done"  # type: ignore[arg-type]
    # Each attempt on a fresh pooled connection, after a jittered back-off of milliseconds.
    assert len(calls) == pool.connections == CONFLICT_RETRIES + 1
    assert jitter.calls == [(0.001, 0.005)] * CONFLICT_RETRIES


@pytest.mark.parametrize("exc", [pg_errors.SerializationFailure, pg_errors.DeadlockDetected])
async def test_conflicts_past_the_bound_become_unavailable(exc: type[Exception]) -> None:
    pool = FakePool()
    calls, fn = _failing(10**6, exc)
    with pytest.raises(E.Unavailable) as err:
        await Repository(pool, timeout=1.0)._run("op", fn)  # type: ignore[arg-type]
    assert err.value.reason == "DATABASE_CONFLICT"
    assert isinstance(err.value.__cause__, exc)
    assert len(calls) == CONFLICT_RETRIES + 1


async def test_other_database_errors_are_not_retried_as_conflicts() -> None:
    pool = FakePool()
    calls, fn = _failing(1, pg_errors.CheckViolation)
    with pytest.raises(pg_errors.CheckViolation):
        await Repository(pool, timeout=1.0)._run("op", fn)  # type: ignore[arg-type]
    assert len(calls) == 1

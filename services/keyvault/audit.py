"""The hash-chained, append-only audit log: one writer per process, group commit.

What a record holds and what its MAC covers is ``audit_records``; reading and verifying the
chain is ``audit_reader``.

Every lease, denial and admin action becomes one record whose hash covers its fields and
the previous record's hash. The hash is an HMAC-SHA256 under the vault's audit chain key
(random, stored only wrapped by the master key: see ``crypto``), so someone who can write
the database but has no master key cannot re-hash an edited record and the records after it.
Appends are serialised so sequences have no gaps:

* inside a process, one writer task takes every record waiting in its queue and writes
  them in one transaction (group commit: concurrent callers share one commit);
* across vault replicas, that transaction first takes ``pg_advisory_xact_lock`` and reads
  the chain's head inside the lock, so all replicas extend one chain.

A caller's ``append`` returns only once its record is committed (``synchronous_commit``
forced on for the locked path's transaction and for the fast path's session, whatever the
database or role default). If the write fails, every
caller of that batch gets ``Unavailable(AUDIT_UNAVAILABLE)`` and must not hand out anything.

Admin mutations run *inside* the batch transaction (``action`` callbacks, each in a
savepoint), so a key change and its audit record commit or vanish together. A callback that
raises an ``IgwError`` is recorded as a denial with that reason and its error re-raised;
one that raises :class:`Replay` (an idempotent retry) writes no record.

Limit: the chain proves that no record was edited, inserted or removed *before* its last
record, not that the last records are still there. Someone able to bypass the append-only
triggers can cut the tail off and the shorter chain still verifies. Anchoring the head
somewhere else is what detects that: the ``igw_keyvault_audit_head_sequence`` gauge (a
scraped series that goes down), and ``VerifyAuditLog``'s ``records_checked`` compared with
an earlier answer. A head record in the database would not help: whoever can truncate the
table can also put back the head row as it was at that point.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from sqlalchemy import Connection, insert, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.common import errors as E
from services.keyvault.audit_records import AuditDraft, AuditOutcome, AuditRecord, build_records
from services.keyvault.domain import utcnow
from services.keyvault.metrics import VaultMetrics
from services.keyvault.orm import audit_events

_LOGGER = logging.getLogger(__name__)

#: One advisory lock id for the chain, shared by every replica and by ``igw vault rewrap``.
CHAIN_LOCK_ID = int.from_bytes(hashlib.sha256(b"igw-keyvault-audit-chain").digest()[:8], "big", signed=True)


Action = Callable[[AsyncConnection, AuditDraft], Awaitable[Any]]


class Replay(Exception):
    """Raised by an admin action that is an idempotent replay: no record, return ``result``."""

    def __init__(self, result: Any) -> None:
        super().__init__("replay")
        self.result = result


def audit_unavailable() -> E.Unavailable:
    """The one error callers get when their record could not be made durable."""
    return E.Unavailable("AUDIT_UNAVAILABLE", "the audit log cannot be written; nothing was issued")



@dataclass
class _Item:
    draft: AuditDraft
    action: Action | None
    future: asyncio.Future[tuple[AuditRecord | None, Any]]


_HEAD = select(audit_events.c.sequence, audit_events.c.hash).order_by(audit_events.c.sequence.desc()).limit(1)
_LOCK = text(
    "SELECT set_config('lock_timeout', :lock_ms, true), set_config('statement_timeout', :stmt_ms, true),"
    " set_config('synchronous_commit', 'on', true), pg_advisory_xact_lock(:lock_id)"
)


def append_sync(
    conn: Connection, drafts: Sequence[AuditDraft], now: dt.datetime, chain_key: bytes
) -> list[AuditRecord]:
    """Appends within the caller's (synchronous) transaction, e.g. ``igw vault rewrap``."""
    conn.execute(_LOCK, {"lock_ms": "10000", "stmt_ms": "60000", "lock_id": CHAIN_LOCK_ID})
    row = conn.execute(_HEAD).first()
    records = build_records(drafts, (row[0], row[1]) if row else None, now, chain_key)
    if records:
        conn.execute(insert(audit_events), [r.as_row() for r in records])
    return records


class AuditWriter:
    """The single audit writer task of a vault process.

    ``chain_key`` is the unwrapped audit chain key; None (a sealed vault) refuses every append.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        metrics: VaultMetrics,
        clock: Callable[[], dt.datetime] = utcnow,
        *,
        chain_key: bytes | None = None,
        max_batch: int = 1024,
        lock_timeout_ms: int = 2000,
        statement_timeout_ms: int = 5000,
    ) -> None:
        self._engine = engine
        self._metrics = metrics
        self._clock = clock
        self._max_batch = max_batch
        self._chain_key = chain_key
        self._params = {
            "lock_ms": str(lock_timeout_ms),
            "stmt_ms": str(statement_timeout_ms),
            "lock_id": CHAIN_LOCK_ID,
        }
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        # Fast path: the chain head this writer last wrote or read, and its own connection.
        self._head: tuple[int, str] | None = None
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._dsn = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._statement_timeout_ms = statement_timeout_ms

    @property
    def chain_key(self) -> bytes | None:
        """The audit chain key (None while sealed)."""
        return self._chain_key

    def forget_key(self) -> None:
        """Drops the chain key (the vault was sealed): every later append is refused."""
        self._chain_key = None

    def start(self) -> None:
        """Starts the writer task on the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="keyvault-audit-writer")

    async def close(self) -> None:
        """Writes what is queued, then stops."""
        if self._task is None:
            return
        self._queue.put_nowait(None)
        try:
            await asyncio.wait_for(self._task, 10)
        except (TimeoutError, asyncio.CancelledError):
            self._task.cancel()
        self._task = None
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def append(
        self, draft: AuditDraft, action: Action | None = None
    ) -> tuple[AuditRecord | None, Any]:
        """Queues a record (and optional in-transaction action); returns once committed.

        Raises ``Unavailable(AUDIT_UNAVAILABLE)`` if the batch could not be committed, or the
        action's own ``IgwError`` (after its denial record was committed).
        """
        if self._task is None or self._task.done() or self._chain_key is None:
            raise audit_unavailable()
        fut: asyncio.Future[tuple[AuditRecord | None, Any]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Item(draft, action, fut))
        # Shield: a caller that goes away must not cancel a batch other callers share.
        return await asyncio.shield(fut)

    async def append_many(self, drafts: list[AuditDraft]) -> None:
        """Queues several records at once (so they share one batch) and returns once all are
        committed; raises ``Unavailable(AUDIT_UNAVAILABLE)`` as :meth:`append` does."""
        if self._task is None or self._task.done() or self._chain_key is None:
            raise audit_unavailable()
        loop = asyncio.get_running_loop()
        futs: list[asyncio.Future[tuple[AuditRecord | None, Any]]] = []
        for draft in drafts:
            fut: asyncio.Future[tuple[AuditRecord | None, Any]] = loop.create_future()
            self._queue.put_nowait(_Item(draft, None, fut))
            futs.append(fut)
        # Shield: a caller that goes away must not cancel a batch other callers share.
        await asyncio.shield(asyncio.gather(*futs))

    async def _run(self) -> None:
        stop = False
        while not stop:
            first = await self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            try:
                await self._write(batch)
            except Exception:  # the writer must outlive any one failure
                _LOGGER.exception("audit writer failed unexpectedly")
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(audit_unavailable())

    async def _fast_write(self, batch: list[_Item]) -> list[AuditRecord] | None:
        """Leases only (no admin action): one INSERT, one round trip, after the cached head.

        Sequence is the primary key, so if another replica appended since this writer last
        saw the head, the INSERT fails as a whole and the locked path takes over: every
        record still chains onto the true previous one. Returns None to ask for that path.
        """
        key = self._chain_key
        if self._head is None or key is None:
            return None
        records = build_records([item.draft for item in batch], self._head, self._clock(), key)
        rows = [r.as_row() for r in records]
        cols = list(rows[0])
        values = ", ".join("(" + ", ".join(["%s"] * len(cols)) + ")" for _ in rows)
        names = ", ".join(cols)
        # The chain lock is taken by the statement itself, so writers on the locked path
        # (admin actions, other replicas) and this one never interleave within the chain.
        sql = (
            f"INSERT INTO audit_events ({names}) SELECT v.* FROM (VALUES {values}) AS v({names}),"  # noqa: S608
            " (SELECT pg_advisory_xact_lock(%s)) AS chain_lock"
        )
        params = [row[c] for row in rows for c in cols] + [self._params["lock_id"]]
        try:
            if self._conn is None or self._conn.closed:
                conn = await psycopg.AsyncConnection.connect(self._dsn, autocommit=True)
                self._conn = conn
                # Session-wide, once per connection: every autocommitted INSERT on it waits for
                # its WAL flush even if the database or role default turns synchronous_commit off.
                await conn.execute(
                    "SELECT set_config('statement_timeout', %s, false), set_config('synchronous_commit', 'on', false)",
                    [str(int(self._statement_timeout_ms))],
                )
            await self._conn.execute(sql, params)  # autocommit: durable when it returns
        except psycopg.errors.UniqueViolation:
            self._head = None
            return None
        except psycopg.Error:
            self._head = None
            if self._conn is not None:
                await self._conn.close()
            self._conn = None
            raise
        self._set_head(records[-1].sequence, records[-1].hash)
        return records

    def _set_head(self, sequence: int, hash_: str) -> None:
        self._head = (sequence, hash_)
        self._metrics.head_sequence.set(sequence)

    async def _write(self, batch: list[_Item]) -> None:
        start = time.perf_counter()
        if all(item.action is None for item in batch):
            try:
                fast = await self._fast_write(batch)
            except Exception as exc:
                self._fail(batch, exc)
                return
            if fast is not None:
                self._done(batch, fast, [(None, None, True)] * len(batch), start)
                return
        results: list[tuple[Any, BaseException | None, bool]] = []
        key = self._chain_key
        if key is None:
            self._fail(batch, RuntimeError("no audit chain key"))
            return
        try:
            async with self._engine.connect() as conn:
                async with conn.begin():
                    await conn.execute(_LOCK, self._params)
                    row = (await conn.execute(_HEAD)).first()
                    drafts: list[AuditDraft] = []
                    for item in batch:
                        result, err, write = await self._run_action(conn, item)
                        results.append((result, err, write))
                        if write:
                            drafts.append(item.draft)
                    now = self._clock()
                    records = build_records(drafts, (row[0], row[1]) if row else None, now, key)
                    if records:
                        await conn.execute(insert(audit_events), [r.as_row() for r in records])
        except Exception as exc:
            self._head = None
            self._fail(batch, exc)
            return
        if records:
            self._set_head(records[-1].sequence, records[-1].hash)
        elif row is not None:
            self._set_head(row[0], row[1])
        self._done(batch, records, results, start)

    def _fail(self, batch: list[_Item], exc: BaseException) -> None:
        self._metrics.write_failures.inc()
        _LOGGER.error(
            "audit batch could not be committed; refusing the calls waiting on it",
            extra={"batch_size": len(batch), "error_type": type(exc).__name__},
        )
        for item in batch:
            if not item.future.done():
                item.future.set_exception(audit_unavailable())

    def _done(
        self, batch: list[_Item], records: list[AuditRecord],
        results: list[tuple[Any, BaseException | None, bool]], start: float,
    ) -> None:
        elapsed = time.perf_counter() - start
        self._metrics.write_seconds.observe(elapsed)
        self._metrics.batch_size.observe(len(records))
        it = iter(records)
        for item, (result, err, write) in zip(batch, results, strict=True):
            rec = next(it) if write else None
            if item.future.done():
                continue
            if err is not None:
                item.future.set_exception(err)
            else:
                item.future.set_result((rec, result))

    async def _run_action(self, conn: AsyncConnection, item: _Item) -> tuple[Any, BaseException | None, bool]:
        if item.action is None:
            return None, None, True
        savepoint = await conn.begin_nested()
        try:
            result = await item.action(conn, item.draft)
        except Replay as replay:
            await savepoint.rollback()
            return replay.result, None, False
        except E.IgwError as err:
            await savepoint.rollback()
            item.draft.outcome = AuditOutcome.DENIED
            item.draft.reason = err.reason
            return None, err, True
        except Exception:
            await savepoint.rollback()
            _LOGGER.exception("admin action failed")
            item.draft.outcome = AuditOutcome.DENIED
            item.draft.reason = "INTERNAL"
            return None, E.Internal("INTERNAL", "internal error"), True
        await savepoint.commit()
        return result, None, True

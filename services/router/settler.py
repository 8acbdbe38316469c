"""Settles, batched: the settles ready at about the same time go to the ledger in one
``SettleBatch`` call (group commit of settles), retried until acknowledged.

Every settle is sent after the agent has its answer, so a few tens of milliseconds of linger
cost the agent nothing; under load they save the router and the ledger one RPC per call, and
the ledger writes a whole batch in one transaction. If the router dies with settles queued,
nothing served goes unrecorded: a per-call hold expires and the ledger captures it under its
own request id; a call drawn from a budget slice was answered only once its draw was recorded
(services/router/draw_notes.py), and the ledger's capture of the expired slice writes it an
entry under its own request id. Either way one spend entry per call, flagged unsettled.

Settle is idempotent per request id, so a batch that may or may not have landed is simply sent
again; every try picks the next healthy ledger replica (the pool's round-robin), so a dead
replica costs a retry, not the settle.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable

import grpc
from opentelemetry.trace import SpanContext

from igw.keyvault.v1 import keyvault_pb2, keyvault_pb2_grpc
from igw.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from services.common.tracing import current_span_context, linked_span
from services.router.metrics import RouterMetrics

_LOGGER = logging.getLogger(__name__)

# Refusals that another try cannot change (the ledger said no to this payload).
FINAL_CODES = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT.value[0], grpc.StatusCode.ABORTED.value[0],
    grpc.StatusCode.FAILED_PRECONDITION.value[0], grpc.StatusCode.NOT_FOUND.value[0],
    grpc.StatusCode.PERMISSION_DENIED.value[0],
})
_GIVE_UP_AFTER_S = 600.0
# Told whether the settle was acknowledged (False: given up or refused).
OnDone = Callable[[bool], None] | None
# A queued settle: the request, when to give up on it, the span of the call it settles (or None),
# and who to tell when it is done.
_Item = tuple[ledger_pb2.SettleRequest, float, SpanContext | None, OnDone]


async def with_retries(call: Callable[[], Awaitable[object]]) -> bool:
    """Runs one idempotent RPC until acknowledged, a few times over about 8 s; False when it
    never was (or was refused: another try cannot change a refusal)."""
    for delay in (0.05, 0.2, 1.0, 2.0, 5.0):
        try:
            await call()
            return True
        except grpc.RpcError as err:
            if err.code().value[0] in FINAL_CODES:
                _LOGGER.error("background call refused", extra={"code": err.code().name})
                return False
            await asyncio.sleep(delay)
    return False


async def release_hold(ledger: ledger_pb2_grpc.LedgerServiceStub, reservation_id: str, reason: str) -> bool:
    """Frees a hold (a call's, or a budget slice), retried a few times; False when the ledger never
    acknowledged it (the hold then expires and is captured: erring towards never overspending)."""
    req = ledger_pb2.ReleaseRequest(reservation_id=reservation_id, reason=reason)
    return await with_retries(lambda: ledger.Release(req, timeout=5))


async def release_request(ledger: ledger_pb2_grpc.LedgerServiceStub, request_id: str, reason: str) -> bool:
    """Frees every hold of a call that ended early, including one its Reserve places later (the
    ledger then refuses that Reserve); retried like :func:`release_hold`."""
    req = ledger_pb2.ReleaseRequest(request_id=request_id, reason=reason)
    return await with_retries(lambda: ledger.Release(req, timeout=5))


class Settler:
    """Queues settles and sends them in batches; ``drain`` waits for all to be acknowledged."""

    def __init__(
        self, ledger: ledger_pb2_grpc.LedgerServiceStub, metrics: RouterMetrics, *,
        max_batch: int = 64, linger_s: float = 0.03, max_in_flight: int = 4,
    ) -> None:
        self._ledger = ledger
        self._metrics = metrics
        self._max_batch = max_batch
        self._linger_s = linger_s
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._pump: asyncio.Task[None] | None = None
        self._pending = 0
        self._idle = asyncio.Event()
        self._idle.set()
        metrics.settles_pending.set_function(lambda: self._pending)

    def submit(self, req: ledger_pb2.SettleRequest, on_done: OnDone = None) -> None:
        """Queues one settle; returns at once. ``on_done(acknowledged)`` runs when it is done."""
        if self._pump is None or self._pump.done():
            # A fresh context: the pump must not carry the first caller's span, request id or identity.
            self._pump = asyncio.get_running_loop().create_task(
                self._run(), name="router-settler", context=contextvars.Context())
        self._pending += 1
        self._idle.clear()
        self._queue.put_nowait((req, time.monotonic() + _GIVE_UP_AFTER_S, current_span_context(), on_done))

    async def drain(self, timeout: float) -> bool:
        """Waits until every queued settle was acknowledged (or given up); True when all were."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            _LOGGER.error("settles still pending at shutdown; their holds will be captured",
                          extra={"pending": self._pending})
            return False

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            # Settles linger briefly so the settles of concurrent calls share one round trip.
            deadline = time.monotonic() + self._linger_s
            while len(batch) < self._max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except asyncio.QueueEmpty:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    try:
                        batch.append(await asyncio.wait_for(self._queue.get(), left))
                    except TimeoutError:
                        break
            await self._slots.acquire()
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _done(self, items: list[_Item], acknowledged: bool) -> None:
        for item in items:
            if item[3] is not None:
                try:
                    item[3](acknowledged)
                except Exception:  # a callback's bug must not stall the settler
                    _LOGGER.exception("settle callback failed")
        self._pending -= len(items)
        if self._pending <= 0:
            self._pending = 0
            self._idle.set()

    async def _send(self, batch: list[_Item]) -> None:
        pending = list(batch)
        try:
            delay = 0.05
            while pending:
                pending = await self._send_once(pending)
                now = time.monotonic()
                expired = [b for b in pending if b[1] <= now]
                if expired:
                    _LOGGER.error("settle not acknowledged in time; the hold will be captured",
                                  extra={"count": len(expired)})
                    self._done(expired, False)
                pending = [b for b in pending if b[1] > now]
                if pending:
                    self._metrics.settle_retries.inc(len(pending))
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
        except Exception:  # a bug must not leave drain() waiting for settles nobody sends
            _LOGGER.exception("settle batch failed unexpectedly; its holds will be captured")
            self._done(pending, False)
        finally:
            self._slots.release()

    async def _send_once(
        self, batch: list[_Item],
    ) -> list[_Item]:
        """Sends one batch; returns the settles to try again."""
        # Only each item's code is used: the ledger need not build the spend entries.
        req = ledger_pb2.SettleBatchRequest(settles=[item[0] for item in batch], codes_only=True)
        try:
            # Traced calls: the batch is its own trace, linked to the trace of every call it settles.
            with linked_span("igw.router.SettleBatch", [item[2] for item in batch], {"igw.batch_size": len(batch)}):
                resp = await self._ledger.SettleBatch(req, timeout=10)
        except grpc.RpcError as err:
            code = err.code()
            if code.value[0] in FINAL_CODES:  # the batch itself was refused: a bug, not a fault
                _LOGGER.error("settle batch refused", extra={"code": code.name, "size": len(batch)})
                self._done(batch, False)
                return []
            return batch
        if len(resp.results) != len(batch):
            raise RuntimeError("the ledger answered a settle batch with the wrong number of results")
        retry = []
        for item, result in zip(batch, resp.results, strict=True):
            if result.code == 0:
                self._done([item], True)
            elif result.code in FINAL_CODES:
                _LOGGER.error("settle refused", extra={"reason": result.reason})
                self._done([item], False)
            else:
                retry.append(item)
        return retry


class LeaseEnder:
    """Groups the vault lease ends (``EndLeaseBatch``) of calls that end at about the same time:
    one RPC and one audit group commit for many leases, off the agent's path (the agent has its
    answer before its lease ends). Each batch is retried until acknowledged (an end is audited
    at least once, so every lease ends visibly); a vault without ``EndLeaseBatch`` (older, mid
    rolling upgrade) gets the ends one by one. If the router dies with ends queued, the leases
    still expire at their TTL: the audit then shows an issue without an end.

    The linger is long (250 ms) because nothing waits for an end: the agent has its answer, the
    lease is dead to the provider call either way, and the audit shows the end a quarter second
    later. Measured (bench/analysis.md), a 20 ms linger sent about one ``EndLeaseBatch`` per call at
    50 calls/s, costing the vault as much as its ``IssueCredential``; at 250 ms a batch carries
    every end of a quarter second."""

    def __init__(
        self, vault: keyvault_pb2_grpc.KeyVaultServiceStub, metrics: RouterMetrics, *, max_batch: int = 256,
        linger_s: float = 0.25,
    ) -> None:
        self._vault = vault
        self._metrics = metrics
        self._max_batch = max_batch
        self._linger_s = linger_s
        self._queue: list[keyvault_pb2.EndLeaseRequest] = []
        self._flush: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._batch_ok = True

    def submit(self, req: keyvault_pb2.EndLeaseRequest) -> None:
        """Queues one lease end; returns at once."""
        self._queue.append(req)
        if len(self._queue) >= self._max_batch:
            self._send_now()
        elif self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(self._linger_s, self._send_now)

    def _send_now(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        batch, self._queue = self._queue, []
        if batch:
            # A fresh context: the batch must not carry one caller's span, request id or identity.
            task = asyncio.get_running_loop().create_task(self._send(batch), context=contextvars.Context())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _count(self, ends: list[keyvault_pb2.EndLeaseRequest], acknowledged: bool) -> None:
        if not acknowledged:
            self._metrics.lease_ends.labels("unacknowledged").inc(len(ends))
            return
        used = sum(1 for e in ends if e.end == keyvault_pb2.LEASE_END_USED)
        if used:
            self._metrics.lease_ends.labels("used").inc(used)
        if len(ends) - used:
            self._metrics.lease_ends.labels("returned").inc(len(ends) - used)

    async def _send(self, batch: list[keyvault_pb2.EndLeaseRequest]) -> None:
        if self._batch_ok:
            req = keyvault_pb2.EndLeaseBatchRequest(items=batch)
            try:
                await self._vault.EndLeaseBatch(req, timeout=5)
                self._count(batch, True)
                return
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                    self._batch_ok = False
            if self._batch_ok:
                ok = await with_retries(lambda: self._vault.EndLeaseBatch(req, timeout=5))
                self._count(batch, ok)
                if not ok:
                    _LOGGER.warning("lease ends not acknowledged by the vault", extra={"count": len(batch)})
                return
        for one in batch:
            ok = await with_retries(lambda one=one: self._vault.EndLease(one, timeout=5))  # type: ignore[misc]
            self._count([one], ok)
            if not ok:
                _LOGGER.warning("lease end not acknowledged by the vault", extra={"lease_end_reason": one.reason})

    async def drain(self, timeout: float) -> None:
        """Sends what is queued and waits (up to ``timeout``) for every batch (graceful shutdown)."""
        self._send_now()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

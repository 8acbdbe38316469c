"""Draw notes: the router tells the ledger which calls it drew from its budget slices
(``NoteSliceDraws``), batched, while the provider calls run.

A call whose hold was drawn from a slice is answered once its draw is recorded (or its settle
acknowledged, whichever comes first): if the router dies, the ledger's capture of the expired
slice writes one spend entry per recorded, unsettled draw under the call's own request id, so
every answered call has exactly one entry while its settle goes in the background, batched
like a per-call hold's (services/router/settler.py).

Batching: a note lingers up to ``linger_s`` (10 ms) so that the notes of calls starting close
together share one round trip, and goes at once when a call it carries is ready to answer
(:meth:`hurry`, from the call's settle): a provider call slower than the linger and one round
trip (every real model call) never waits for its note. The router lets a note linger only for a
deployment whose recent provider calls took that long (:meth:`worth_lingering`); other notes
go at once, recorded while the provider call runs. A ripe batch goes while fewer than ``pipeline`` (2) batches
are in flight, else as soon as one returns (group commit; at most ``max_batch``, 1024, each).
Faults (UNAVAILABLE, DEADLINE_EXCEEDED, ...) are retried with backoff, each try on the next
ledger replica (the stub is the pool's round-robin); a note is idempotent per (slice, request
id). A note not acknowledged within ``give_up_s`` resolves False. A call given back to its
slice withdraws its draw once its note was answered, so a withdrawal never overtakes its note
on another replica; more generally every note or withdrawal of one (slice, request id) waits for
the one before it (a retried attempt draws the same request id from the same slice again).

A note answered ``over_limit`` (recorded, but a budget the slice counts against is over a limit
lowered since the slice was granted) hands the slice's id to ``on_over_limit``: the router gives
the team's slices back, so its next calls take exact per-call holds.

A ledger without ``NoteSliceDraws`` (an older one, mid rolling upgrade) answers UNIMPLEMENTED:
for the next ``_UNSUPPORTED_S`` notes resolve False at once (nothing is sent), and such calls
wait for their settle's acknowledgement instead, as before draw notes existed.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from opentelemetry.trace import SpanContext

from igw.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from services.common.tracing import current_span_context, linked_span
from services.router.metrics import RouterMetrics
from services.router.settler import FINAL_CODES

_LOGGER = logging.getLogger(__name__)
# How long notes are not sent after a ledger answered UNIMPLEMENTED (then asked again).
_UNSUPPORTED_S = 60.0
_RPC_TIMEOUT_S = 5.0
# A note lingers only for a call whose provider takes at least its linger and this much longer
# (about one NoteSliceDraws round trip).
_LINGER_MARGIN_S = 0.005


@dataclass(eq=False, slots=True)
class _Item:
    draw: ledger_pb2.SliceDraw
    done: asyncio.Future[bool]
    span: SpanContext | None  # of the call it is about (None: not traced)
    give_up_at: float = 0.0
    delay: float = 0.05  # before its next try


class DrawNotes:
    """Sends draw notes and withdrawals in batches; ``drain`` waits for all to be answered."""

    def __init__(
        self, ledger: ledger_pb2_grpc.LedgerServiceStub, metrics: RouterMetrics, *, max_batch: int = 1024,
        pipeline: int = 2, give_up_s: float = 60.0, linger_s: float = 0.01,
        clock: Callable[[], float] = time.monotonic, on_over_limit: Callable[[str], None] | None = None,
    ) -> None:
        self._ledger = ledger
        self._metrics = metrics
        self._max_batch = max_batch
        self._pipeline = pipeline
        self._give_up_s = give_up_s
        self._clock = clock
        self._linger_s = linger_s
        # Called with a slice's reservation id when the ledger says its team is over a lowered limit.
        self._on_over_limit = on_over_limit
        self._queue: deque[_Item] = deque()
        # The queue may go (its linger is over, or a call it carries is waiting for its answer).
        self._ripe = linger_s <= 0
        self._timer: asyncio.TimerHandle | None = None
        # Notes hurried before they could be queued (behind the one before them of the same call).
        self._hurried: set[asyncio.Future[bool]] = set()
        # Notes and withdrawals waiting for the one before them of the same call.
        self._behind: set[asyncio.Future[bool]] = set()
        self._sending = 0  # batches in flight
        self._pending = 0  # notes and withdrawals not yet answered (queued, waiting, in flight)
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[None]] = set()
        # The last note or withdrawal of each (slice, request id) not yet answered.
        self._tail: dict[tuple[str, str], asyncio.Future[bool]] = {}
        self._unsupported_until = float("-inf")

    def worth_lingering(self, upstream_s: float) -> bool:
        """Whether a call whose provider answers in about ``upstream_s`` should let its note
        linger: only when the linger and a round trip end before the provider answers (else the
        note goes at once, so that it is recorded while the provider call runs)."""
        return self._linger_s > 0 and upstream_s >= self._linger_s + _LINGER_MARGIN_S

    def note(
        self, reservation_id: str, request_id: str, held_nanos: int, *, linger: bool = True,
    ) -> asyncio.Future[bool]:
        """Records that the call ``request_id`` drew ``held_nanos`` from the slice; the future
        says whether the ledger recorded it (False: refused, or not acknowledged in time).
        ``linger=False``: it goes at once (with what is queued)."""
        if self._clock() < self._unsupported_until:
            self._metrics.slice_draw_notes.labels("draw", "unsupported").inc()
            answered: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            answered.set_result(False)
            return answered
        draw = ledger_pb2.SliceDraw(reservation_id=reservation_id, request_id=request_id, held_nanos=held_nanos)
        return self._add(draw, None, urgent=not linger)

    def withdraw(self, reservation_id: str, request_id: str, after: asyncio.Future[bool]) -> None:
        """The call ended without spending: its draw is forgotten (in the background), once
        ``after`` (its note) was answered."""
        self._add(ledger_pb2.SliceDraw(reservation_id=reservation_id, request_id=request_id, withdrawn=True), after)

    def hurry(self, note: asyncio.Future[bool]) -> None:
        """The call of ``note`` is ready to answer and waits for it: if it is still queued, the
        queue goes now (as soon as the pipeline allows), without waiting for the rest of its linger."""
        if note.done():
            return
        queued = any(item.done is note for item in self._queue)
        if not queued:
            # In flight, waiting for a retry, or behind the note or withdrawal of the same call
            # before it: it goes as soon as it is queued (again).
            self._hurried.add(note)
        if (queued or note in self._behind) and self._queue and not self._ripe:
            self._ripen()  # it, or the one it waits behind, is queued

    async def drain(self, timeout: float) -> bool:
        """Waits until every note and withdrawal was answered (or given up); True when all were."""
        if self._queue:
            self._ripen()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            _LOGGER.error("slice draw notes still pending at shutdown", extra={"pending": self._pending})
            return False

    def _add(
        self, draw: ledger_pb2.SliceDraw, after: asyncio.Future[bool] | None, urgent: bool = False,
    ) -> asyncio.Future[bool]:
        """Queues ``draw`` (after the one before it of the same call); ``urgent``: it does not linger."""
        loop = asyncio.get_running_loop()
        item = _Item(draw, loop.create_future(), current_span_context())
        if urgent:
            self._hurried.add(item.done)  # ripens the queue when it is queued
        key = (draw.reservation_id, draw.request_id)
        before = self._tail.get(key, after)
        self._tail[key] = item.done
        self._pending += 1
        self._idle.clear()
        item.done.add_done_callback(lambda fut: self._answered(key, fut))
        if before is None or before.done():
            self._enqueue([item])
        else:
            self._behind.add(item.done)
            before.add_done_callback(lambda _fut: self._enqueue([item]))
            if urgent and self._queue and not self._ripe:
                self._ripen()  # the one it waits behind may be queued
        return item.done

    def _answered(self, key: tuple[str, str], fut: asyncio.Future[bool]) -> None:
        self._hurried.discard(fut)
        if self._tail.get(key) is fut:
            del self._tail[key]
        self._pending -= 1
        if self._pending <= 0:
            self._pending = 0
            self._idle.set()

    def _enqueue(self, items: list[_Item]) -> None:
        now = self._clock()
        for item in items:
            if not item.give_up_at:
                item.give_up_at = now + self._give_up_s
            self._queue.append(item)
            self._behind.discard(item.done)
            if item.done in self._hurried:
                self._ripe = True
        self._kick()

    def _ripen(self) -> None:
        self._ripe = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._kick()

    def _kick(self) -> None:
        """Starts batches while the queue is ripe (or holds a full batch) and fewer than
        ``pipeline`` are in flight (else the queue waits for one to return)."""
        loop = asyncio.get_running_loop()
        while self._queue and self._sending < self._pipeline and (self._ripe or len(self._queue) >= self._max_batch):
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), self._max_batch))]
            self._sending += 1
            # A fresh context: the batch must not carry one caller's span, request id or identity.
            task = loop.create_task(self._send(batch), context=contextvars.Context())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if not self._queue and self._linger_s > 0:
            self._ripe = False  # the next note starts a linger of its own
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        elif self._queue and not self._ripe and self._timer is None:
            self._timer = loop.call_later(self._linger_s, self._ripen)

    def _finish(self, items: list[_Item], acknowledged: bool, result: str) -> None:
        for item in items:
            kind = "withdrawal" if item.draw.withdrawn else "draw"
            self._metrics.slice_draw_notes.labels(kind, result).inc()
            if not item.done.done():
                item.done.set_result(acknowledged)

    async def _send(self, batch: list[_Item]) -> None:
        retry: list[_Item] = []
        try:
            retry = await self._send_once(batch)
        except Exception:  # a bug must not leave calls or drain() waiting for notes nobody sends
            _LOGGER.exception("draw note batch failed unexpectedly")
            self._finish(batch, False, "unacknowledged")
        finally:
            self._sending -= 1
        now = self._clock()
        expired = [item for item in retry if item.give_up_at <= now]
        if expired:
            _LOGGER.error("slice draw notes not acknowledged in time", extra={"count": len(expired)})
            self._finish(expired, False, "unacknowledged")
        retry = [item for item in retry if item.give_up_at > now]
        if retry:
            delay = min(item.delay for item in retry)
            for item in retry:
                item.delay = min(item.delay * 2, 5.0)
            self._metrics.slice_draw_note_retries.inc(len(retry))
            asyncio.get_running_loop().call_later(delay, self._enqueue, retry)
        self._kick()

    async def _send_once(self, batch: list[_Item]) -> list[_Item]:
        """Sends one batch; returns the items to try again."""
        if self._clock() < self._unsupported_until:
            self._finish(batch, False, "unsupported")
            return []
        req = ledger_pb2.NoteSliceDrawsRequest(draws=[item.draw for item in batch])
        self._metrics.slice_draw_note_batches.inc()
        try:
            # Traced calls: the batch is its own trace, linked to the trace of every call it notes.
            spans = [item.span for item in batch]
            with linked_span("igw.router.NoteSliceDraws", spans, {"igw.batch_size": len(batch)}):
                resp = await self._ledger.NoteSliceDraws(req, timeout=_RPC_TIMEOUT_S)
        except grpc.RpcError as err:
            code = err.code()
            if code == grpc.StatusCode.UNIMPLEMENTED:
                _LOGGER.warning("the ledger cannot record slice draws (older version); sliced calls wait for "
                                "their settles for a while")
                self._unsupported_until = self._clock() + _UNSUPPORTED_S
                self._finish(batch, False, "unsupported")
                return []
            if code.value[0] in FINAL_CODES:  # the batch itself was refused: a bug, not a fault
                _LOGGER.error("draw note batch refused", extra={"code": code.name, "size": len(batch)})
                self._finish(batch, False, "refused")
                return []
            return batch
        if len(resp.results) != len(batch):
            raise RuntimeError("the ledger answered a draw note batch with the wrong number of results")
        retry = []
        for item, result in zip(batch, resp.results, strict=True):
            if result.code == 0:
                self._finish([item], True, "acknowledged")
                if result.over_limit and self._on_over_limit is not None:
                    self._on_over_limit(item.draw.reservation_id)
            elif result.code in FINAL_CODES:
                _LOGGER.warning("draw note refused", extra={"reason": result.reason})
                self._finish([item], False, "refused")
            else:
                retry.append(item)
        return retry

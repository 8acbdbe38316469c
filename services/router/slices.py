"""Budget slices, the router's side of the sliced hold path (routing config ``budget_slices``).

On by default, for a busy key (``busy_calls`` calls of one team, agent and price key within
``busy_window_ms``, ``busy_in_flight`` of them at once); other calls take per-call holds (``Reserve``).
The ledger sizes each slice (``ledger_hold``: at most a quarter of what is free, none near the
limit). A ``Reserve`` refused while this router holds the team's slices, or a draw note saying
the team is over a lowered limit, gives them back (:meth:`SliceBook.reserve`, :meth:`SliceBook.over_limit`),
so a team is refused where per-call holds would refuse it.

A slice is one ledger hold covering up to N calls of one key (``AcquireSlice``). The router places
each call's hold (priced exactly as the ledger prices a ``Reserve``) against it locally, notes the
draw in the ledger while the provider call runs (the call is answered once it is recorded:
services/router/draw_notes.py) and settles each call by its own request id against the slice, in
the background. One spend entry per request id; ``spent + held <= limit`` still holds in Postgres.

Life of a slice: acquired when a call finds no slice with room (one acquisition per key at a
time, in a task of its own so that a caller hanging up cannot orphan it); drawn from for
``draw_window_ms``, or until it has no room for the next call; then retired, and released (what
is left goes back) once every call drawn from it gave its hold back or had its settle
acknowledged. Settles are not refunded into the slice (which errs towards the budget). It lives
``draw window + the longest call + 60 s``; if the router dies, the ledger captures each recorded,
unsettled draw under its call's request id and the rest under the slice's id at expiry; a slice
with a settle given up is never released: budgets err on the side of never overspending.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from google.protobuf import duration_pb2

from igw.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from services.common.money import call_cost
from services.router.metrics import RouterMetrics
from services.router.routing import RoutingConfig
from services.router.settler import release_hold

_LOGGER = logging.getLogger(__name__)

# After a denied acquisition, calls of that key take per-call holds (exact answers) for this long.
_DENIED_BACKOFF_S = 1.0
_SLACK_S = 60.0
_ROUNDS = 8
Key = tuple[str, str, str]  # team, agent, price key


@dataclass(eq=False, slots=True)
class Slice:
    """One leased slice, as this router sees it."""

    key: Key
    reservation_id: str
    price_version: int
    granted: int
    draw_until: float
    # The slice covers at most this many calls of at most this many tokens in all (its grant
    # counted that many against the team's rate limits in the ledger).
    calls_left: int = 1 << 30
    tokens_left: int = 1 << 62
    used: int = 0
    open_calls: int = 0
    retired: bool = False
    keep: bool = False  # a settle was not acknowledged: leave the slice to be captured
    released: bool = False
    # Done once what is left of the slice went back to the budget (or was left to be captured).
    gone: asyncio.Future[None] | None = None
    # The hold as the call path sees it, by amount: built once per slice, not per call (read-only).
    answers: dict[int, ledger_pb2.ReserveResponse] | None = None


@dataclass(slots=True)
class SliceHold:
    """One call's hold, drawn from a slice."""

    slice: Slice
    amount: int
    done: bool = False
    tokens: int = 0
    request_id: str = ""
    noted: asyncio.Future[bool] | None = None  # the ledger recorded the draw (DrawNotes.note)

    def response(self) -> ledger_pb2.ReserveResponse:
        """The hold as the call path sees a Reserve answer (settles go to the slice); shared by
        the slice's calls of the same amount, so never to be modified."""
        s = self.slice
        if s.answers is None:
            s.answers = {}
        answer = s.answers.get(self.amount)
        if answer is None:
            answer = s.answers[self.amount] = ledger_pb2.ReserveResponse(
                reservation_id=s.reservation_id, held_nanos=self.amount, price_version=s.price_version)
        return answer


class Prices(Protocol):
    """Price catalogue versions by number (the router's PriceBook)."""

    async def get(self, version: int) -> dict[str, ledger_pb2.ModelPrice]: ...


class SliceBook:
    """The slices of one router process."""

    def __init__(
        self, ledger: ledger_pb2_grpc.LedgerServiceStub, prices: Prices, metrics: RouterMetrics, *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ledger = ledger
        self._prices = prices
        self._metrics = metrics
        self._clock = clock
        self._active: dict[Key, Slice] = {}
        self._acquiring: dict[Key, asyncio.Task[Slice | None]] = {}
        self._denied_until: dict[Key, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._timers: dict[int, asyncio.TimerHandle] = {}
        # Every slice not yet released, by team (active and retired ones).
        self._held: dict[str, set[Slice]] = {}
        # Per key: when its current busy window started and how many calls it made in it.
        self._busy: dict[Key, tuple[float, int]] = {}
        # Per key: calls between ``enter`` and ``leave`` (placing a hold, or holding one).
        self._in_flight: dict[Key, int] = {}

    def enter(self, key: Key) -> None:
        """A call of ``key`` is about to place a hold (counted until :meth:`leave`)."""
        self._in_flight[key] = self._in_flight.get(key, 0) + 1

    def leave(self, key: Key) -> None:
        """The call's hold was settled or freed (or never placed)."""
        n = self._in_flight.get(key, 0) - 1
        if n > 0:
            self._in_flight[key] = n
        else:
            self._in_flight.pop(key, None)

    # ------------------------------------------------------------------ the call path

    async def draw(
        self, team: str, agent: str, price_key: str, prompt_tokens: int, max_output_tokens: int,
        cfg: RoutingConfig, timeout: float, provider: str = "",
    ) -> SliceHold | None:
        """A call hold from this key's slice (acquiring one when needed); None: use ``Reserve``."""
        key = (team, agent, price_key)
        now = self._clock()
        sc = cfg.budget_slices
        window_s = sc.busy_window_ms / 1000
        start, n = self._busy.get(key, (now, 0))
        if now - start > window_s:
            start, n = now, 0
        self._busy[key] = (start, n + 1)
        at_once = max(self._in_flight.get(key, 0), 1)  # this call counts even if not entered
        if (n + 1 < sc.busy_calls and key not in self._active) or at_once < sc.busy_in_flight:
            # Not busy (fewer than busy_calls calls in busy_window_ms and no slice, or fewer than
            # busy_in_flight calls at once): an exact per-call hold. Only a busy key leases a
            # slice, so an occasional caller holds nothing extra.
            if len(self._busy) > 100_000:
                self._forget_idle(now, window_s)
            return None
        if self._denied_until.get(key, 0.0) > now:
            return None
        # A burst larger than one slice waits for the next acquisition (each one answers up to
        # ``calls`` of the waiting calls); after a few rounds the rest take per-call holds.
        for _ in range(_ROUNDS):
            s = self._active.get(key)
            if s is not None and self._clock() >= s.draw_until:
                self._retire(s)
                s = None
            if s is not None:
                amount = await self._amount(s.price_version, price_key, prompt_tokens, max_output_tokens)
                if amount is None:
                    return None
                tokens = prompt_tokens + max_output_tokens
                if not s.retired and s.granted - s.used >= amount and s.calls_left >= 1 and s.tokens_left >= tokens:
                    s.used += amount
                    s.calls_left -= 1
                    s.tokens_left -= tokens
                    s.open_calls += 1
                    self._metrics.slice_draws.inc()
                    return SliceHold(s, amount, tokens=tokens)
                if not s.retired:
                    self._retire(s)  # no room for this call: the next acquisition replaces it
            if await self._acquire(key, prompt_tokens, max_output_tokens, cfg, timeout, provider) is None:
                return None
        return None

    async def reserve(
        self, team: str, call: Callable[[], Awaitable[ledger_pb2.ReserveResponse]], timeout: float,
    ) -> ledger_pb2.ReserveResponse:
        """A per-call hold (``call`` is the Reserve), exact at the limit: a Reserve refused for
        budget while this router still holds slices of the team gives them back (waiting, up to
        ``timeout``, for their in-flight calls to settle) and is asked once more, so the refusal
        comes where per-call holds alone would refuse."""
        try:
            return await call()
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or not await self.give_back_team(team, timeout):
                raise
        self._metrics.slices.labels("returned_at_limit").inc()
        return await call()

    async def give_back_team(self, team: str, timeout: float) -> bool:
        """Retires every slice of ``team`` and waits (up to ``timeout``) until what is left of
        each went back to the budget; False when there was none."""
        held = self._held.get(team)
        if not held:
            return False
        loop = asyncio.get_running_loop()
        for s in held:
            s.gone = s.gone or loop.create_future()
        waits = [s.gone for s in held if s.gone is not None]
        self._retire_all(held)
        await asyncio.wait(waits, timeout=max(timeout, 0.001))
        return True

    def over_limit(self, reservation_id: str) -> None:
        """A draw note said a budget this slice counts against is over its (lowered) limit: the
        team's slices are retired, so its next calls take exact per-call holds."""
        for held in self._held.values():
            if any(s.reservation_id == reservation_id for s in held):
                self._metrics.slices.labels("returned_over_limit").inc()
                return self._retire_all(held)

    def _retire_all(self, held: set[Slice]) -> None:
        for s in list(held):
            if not s.retired:
                self._retire(s)

    def _forget_idle(self, now: float, window_s: float) -> None:
        for k in [k for k, (t, _n) in self._busy.items() if now - t > window_s]:
            del self._busy[k]

    def give_back(self, hold: SliceHold) -> None:
        """The call will not be settled (it failed before spending, or was cancelled)."""
        if hold.done:
            return
        hold.done = True
        s = hold.slice
        s.used -= hold.amount
        s.calls_left += 1
        s.tokens_left += hold.tokens
        s.open_calls -= 1
        self._maybe_release(s)

    def settled(self, hold: SliceHold, acknowledged: bool) -> None:
        """The call's settle was acknowledged (or, ``acknowledged`` False, given up)."""
        if hold.done:
            return
        hold.done = True
        s = hold.slice
        s.open_calls -= 1
        if not acknowledged:
            s.keep = True
        self._maybe_release(s)

    async def _amount(self, version: int, price_key: str, prompt: int, max_out: int) -> int | None:
        try:
            prices = await self._prices.get(version)
        except grpc.RpcError:
            return None
        p = prices.get(price_key)
        if p is None:
            return None
        # As ledger_cost prices a Reserve: every component rounded up.
        return call_cost(prompt, max_out, 0, p.input_per_mtok_nanos, p.output_per_mtok_nanos, 0)

    # ------------------------------------------------------------------ acquisition

    async def _acquire(
        self, key: Key, prompt: int, max_out: int, cfg: RoutingConfig, timeout: float, provider: str,
    ) -> Slice | None:
        task = self._acquiring.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._acquire_now(key, prompt, max_out, cfg, timeout, provider))
            self._acquiring[key] = task
            task.add_done_callback(lambda _task: self._acquiring.pop(key, None))
        # shield: a caller that hangs up must not cancel an acquisition others wait for.
        return await asyncio.shield(task)

    async def _acquire_now(
        self, key: Key, prompt: int, max_out: int, cfg: RoutingConfig, timeout: float, provider: str,
    ) -> Slice | None:
        sc = cfg.budget_slices
        draw_s = sc.draw_window_ms / 1000
        ttl_s = int(draw_s + cfg.timeouts.total_ms / 1000 + _SLACK_S) + 1
        req = ledger_pb2.AcquireSliceRequest(
            slice_id=f"slice-{uuid.uuid4().hex}", team=key[0], agent=key[1], model=key[2],
            prompt_tokens_upper_bound=prompt, max_output_tokens=max_out, calls=sc.calls,
            hold_ttl=duration_pb2.Duration(seconds=ttl_s), provider=provider,
        )
        try:
            resp = await self._ledger.AcquireSlice(req, timeout=max(timeout, 1.0))
        except grpc.RpcError as err:
            if err.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION):
                # Refused (over budget, no budget, not priced): nothing was placed. The calls take
                # per-call holds for a while, which give the agent the ledger's exact answer.
                self._metrics.slices.labels("denied").inc()
                self._denied_until[key] = self._clock() + _DENIED_BACKOFF_S
            else:
                self._metrics.slices.labels("failed").inc()
                # The ledger may have placed it: find it again by its id and give it back.
                self._background(self._reclaim(req))
            return None
        self._denied_until.pop(key, None)
        self._metrics.slices.labels("acquired").inc()
        if 0 < resp.calls < sc.calls:
            # A smaller grant (the budget nears its limit): drawn from for a shorter while too, so
            # an idle router gives what it holds back sooner.
            draw_s *= resp.calls / sc.calls
        s = Slice(key, resp.reservation_id, resp.price_version, resp.held_nanos, self._clock() + draw_s,
                  calls_left=resp.calls, tokens_left=resp.calls * (prompt + max_out))
        old = self._active.get(key)
        if old is not None:
            self._retire(old)
        self._active[key] = s
        self._held.setdefault(key[0], set()).add(s)
        self._timers[id(s)] = asyncio.get_running_loop().call_later(draw_s, self._retire, s)
        return s

    async def _reclaim(self, req: ledger_pb2.AcquireSliceRequest) -> None:
        for delay in (0.2, 1.0, 5.0):
            await asyncio.sleep(delay)
            try:
                resp = await self._ledger.AcquireSlice(req, timeout=5)
            except grpc.RpcError as err:
                if err.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT,
                                  grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED):
                    return  # never placed (or already closed): nothing to give back
                continue
            await self._release_now(resp.reservation_id)
            return

    # ------------------------------------------------------------------ retirement

    def _retire(self, s: Slice) -> None:
        timer = self._timers.pop(id(s), None)
        if timer is not None:
            timer.cancel()
        if self._active.get(s.key) is s:
            del self._active[s.key]
        s.retired = True
        self._maybe_release(s)

    def _maybe_release(self, s: Slice) -> None:
        if not s.retired or s.open_calls > 0 or s.released:
            return
        s.released = True
        if s.keep:
            self._metrics.slices.labels("kept").inc()
            _LOGGER.warning("a budget slice is left to expire: one of its settles was not acknowledged")
            self._gone(s)
            return
        self._background(self._release_slice(s))

    async def _release_slice(self, s: Slice) -> None:
        try:
            await self._release_now(s.reservation_id)
        finally:
            self._gone(s)

    def _gone(self, s: Slice) -> None:
        held = self._held.get(s.key[0])
        if held is not None:
            held.discard(s)
            if not held:
                del self._held[s.key[0]]
        if s.gone is not None and not s.gone.done():
            s.gone.set_result(None)

    async def _release_now(self, reservation_id: str) -> None:
        if await release_hold(self._ledger, reservation_id, "slice_retired"):
            self._metrics.slices.labels("released").inc()
        else:
            _LOGGER.warning("slice release not acknowledged; what is left of it will be captured at expiry")

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self, timeout: float) -> None:
        """Retires every slice and waits (up to ``timeout``) for their releases (graceful shutdown)."""
        for task in list(self._acquiring.values()):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(task), timeout)
        for s in list(self._active.values()):
            self._retire(s)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    def stats(self) -> dict[str, int]:  # active slices and their open calls (tests, debugging)
        return {"active": len(self._active), "open_calls": sum(s.open_calls for s in self._active.values())}

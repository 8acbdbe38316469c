"""The ledger's data plane: Reserve (a call's hold or a slice), Settle, Release, and the
sweeper's capture of expired holds. The rules themselves are in ``services/ledger/sql``; this
turns their typed results (:mod:`services.ledger.results`) into domain values or errors."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Sequence

import psycopg

from services.common import errors as E
from services.ledger import domain as D
from services.ledger.config import MAX_HOLD_TTL_SECONDS, MAX_SLICE_CALLS
from services.ledger.ledger_metrics import Clock, LedgerMetrics, record_crossings, update_remaining
from services.ledger.pricing import MAX_VALUE
from services.ledger.repository import Repository, SettleArgs
from services.ledger.results import HoldOutcome, HoldResult, SettleOutcome, SettleResult

_LOGGER = logging.getLogger("services.ledger.service")

_MISMATCH = "IDEMPOTENCY_MISMATCH"
# How long a request-release record refuses late Reserves of its request id.
RELEASE_RECORD_DAYS = 1


class HoldUseCases:
    """Reserve / Settle / Release / capture (mixed into :class:`~services.ledger.service.LedgerService`)."""

    repo: Repository
    metrics: LedgerMetrics
    now: Clock
    hold_ttl_us: int

    async def reserve(
        self,
        *,
        request_id: str,
        attempt: int,
        team: str,
        agent: str,
        model: str,
        prompt_tokens_upper_bound: int,
        max_output_tokens: int,
        hold_ttl: dt.timedelta | None = None,
        provider: str = "",
        run_id: str = "",
        run_cap_nanos: int = 0,
    ) -> D.ReserveResult:
        """Places a hold sized to the most the call can cost, or raises BUDGET_EXCEEDED /
        RATE_LIMITED. A run (``run_id``) with a cap gets its budget on its first request."""
        if attempt < 0:
            raise E.InvalidArgument("INVALID_ATTEMPT", "attempt must be >= 0", {"field": "attempt"})
        D.check_name("run_id", run_id, required=False)
        D.check_amount("run_cap_nanos", run_cap_nanos)
        if run_cap_nanos and not run_id:
            raise E.InvalidArgument("MISSING_FIELD", "run_cap_nanos needs a run_id", {"field": "run_id"})
        return await self._place(
            request_id, attempt, team, agent, model, prompt_tokens_upper_bound, max_output_tokens,
            0, hold_ttl, provider, run_id=run_id, run_cap_nanos=run_cap_nanos,
        )

    async def acquire_slice(
        self,
        *,
        slice_id: str,
        team: str,
        agent: str,
        model: str,
        prompt_tokens_upper_bound: int,
        max_output_tokens: int,
        calls: int,
        hold_ttl: dt.timedelta | None = None,
        provider: str = "",
    ) -> D.ReserveResult:
        """Places a budget slice for up to ``calls`` calls of the given bounds (adaptive: at most a
        quarter of what every budget and rate limit has free), or raises BUDGET_EXCEEDED, or
        SLICE_NOT_GRANTED when that is fewer than two calls (per-call holds then)."""
        if not 1 <= calls <= MAX_SLICE_CALLS:
            raise E.InvalidArgument(
                "INVALID_SLICE_CALLS", f"calls must be 1 to {MAX_SLICE_CALLS}", {"field": "calls"})
        return await self._place(
            slice_id, 0, team, agent, model, prompt_tokens_upper_bound, max_output_tokens,
            calls, hold_ttl, provider, what="slice_id",
        )

    async def _place(
        self, request_id: str, attempt: int, team: str, agent: str, model: str, prompt_tokens: int,
        max_output_tokens: int, calls: int, hold_ttl: dt.timedelta | None, provider: str,
        *, what: str = "request_id", run_id: str = "", run_cap_nanos: int = 0,
    ) -> D.ReserveResult:
        D.check_request_id(request_id, what)
        D.check_principal("team", team)
        D.check_principal("agent", agent)
        D.check_name("model", model)
        D.check_name("provider", provider, required=False)
        D.check_tokens("prompt_tokens_upper_bound", prompt_tokens)
        D.check_tokens("max_output_tokens", max_output_tokens)
        ttl_us = self.hold_ttl_us
        if hold_ttl is not None and hold_ttl != dt.timedelta(0):
            if hold_ttl < dt.timedelta(0):
                raise E.InvalidArgument("INVALID_TTL", "hold_ttl must be positive", {"field": "hold_ttl"})
            ttl_us = min(hold_ttl // dt.timedelta(microseconds=1), MAX_HOLD_TTL_SECONDS * 1_000_000)
        held = await self.repo.reserve(
            uuid.uuid4(), request_id, attempt, team, agent, model, provider,
            prompt_tokens, max_output_tokens, ttl_us, self.now(), calls, run_id, run_cap_nanos,
        )
        kind = "slice_" if calls else ""
        if held.outcome is HoldOutcome.GRANTED:
            assert held.hold is not None
            out = D.ReserveResult(held.hold, list(held.budgets), held.replayed)
            self.metrics.reserves.labels(kind + ("replayed" if out.replayed else "ok")).inc()
            update_remaining(self.metrics, team, out.budgets)
            return out
        self.metrics.reserves.labels(kind + held.outcome.value.lower()).inc()
        raise self._refusal(held, request_id, attempt, team, agent, model, what)

    def _refusal(
        self, held: HoldResult, request_id: str, attempt: int, team: str, agent: str, model: str, what: str
    ) -> E.IgwError:
        """The error for a hold ``ledger_hold`` did not grant (and its metrics)."""
        outcome = held.outcome
        if outcome is HoldOutcome.DENIED:
            assert held.denied_by is not None
            self.metrics.denials.labels(team).inc()
            self.metrics.remaining.labels(team).set(held.denied_by.remaining_nanos)
            return D.budget_exceeded(held.denied_by, held.amount_nanos)
        if outcome is HoldOutcome.NO_SLICE:
            return E.FailedPrecondition(
                "SLICE_NOT_GRANTED",
                "the budget is too near its limit for a slice: place per-call holds (Reserve)",
                {"team": team, "amount": held.amount_nanos},
            )
        if outcome is HoldOutcome.RATE_LIMITED:
            assert held.rate is not None
            rate = held.rate
            self.metrics.rate_limited.labels(team, rate.kind).inc()
            return D.rate_limited(
                team, rate.agent, requests_per_minute=rate.requests_per_minute,
                tokens_per_minute=rate.tokens_per_minute, requests=rate.requests, tokens=rate.tokens,
                retry_us=rate.retry_us,
            )
        if outcome is HoldOutcome.RATE_TOO_LARGE:
            assert held.rate is not None
            return E.FailedPrecondition(
                "CALL_EXCEEDS_RATE_LIMIT",
                "the call's token bound (prompt + max output) is above the tokens-per-minute limit",
                {"team": team, "agent": held.rate.agent, "tokens_per_minute": held.rate.tokens_per_minute,
                 "tokens": held.rate.tokens},
            )
        if outcome is HoldOutcome.NOT_PRICED:
            return E.FailedPrecondition(
                "MODEL_NOT_PRICED",
                f"model {model} has no price in catalogue version {held.price_version}",
                {"model": model, "price_version": held.price_version},
            )
        if outcome is HoldOutcome.MISMATCH:
            return E.Aborted(
                _MISMATCH,
                f"a hold with this {what} exists with a different payload",
                {what: request_id, "attempt": attempt},
            )
        if outcome is HoldOutcome.ALREADY_SETTLED:
            return E.FailedPrecondition("ALREADY_SETTLED", f"this {what} is already settled", {what: request_id})
        if outcome is HoldOutcome.COST_OVERFLOW:
            return E.InvalidArgument("INVALID_TOKENS", "the hold would exceed 2**62 nano-dollars", {"model": model})
        if outcome is HoldOutcome.NO_BUDGET:
            self.metrics.denials.labels(team).inc()
            return E.FailedPrecondition(
                "NO_BUDGET",
                f"no budget applies to team {team}"
                + (f" agent {agent}" if agent else "")
                + "; an operator must set one (or allow unbudgeted teams)",
                {"team": team, "agent": agent},
            )
        if outcome is HoldOutcome.REQUEST_RELEASED:
            return E.FailedPrecondition(
                "REQUEST_RELEASED",
                f"this {what}'s call ended and was released; use a new {what}",
                {what: request_id},
            )
        return E.Internal("INTERNAL", f"unexpected reserve result {outcome.value}")

    async def settle(
        self,
        *,
        request_id: str,
        reservation_id: str,
        usage: D.Usage,
        provider: str,
        provider_model: str,
        outcome: int = 0,
        latency: dt.timedelta | None = None,
        usage_estimated: bool = False,
    ) -> D.SettleResult:
        """Turns the hold into the request's one spend entry (idempotent on request_id).

        An empty ``reservation_id`` settles the request's open hold of its latest attempt.
        """
        args = self.settle_args(
            request_id=request_id, reservation_id=reservation_id, usage=usage, provider=provider,
            provider_model=provider_model, outcome=outcome, latency=latency, usage_estimated=usage_estimated,
        )
        return self._settled(args, await self.repo.settle(args, self.now()))

    async def settle_batch(self, items: Sequence[SettleArgs | E.IgwError]) -> list[D.SettleResult | E.IgwError]:
        """Settles many in one ledger transaction (one durable commit); one outcome per item.

        ``items`` are :meth:`settle_args` results, or the error their validation raised (passed
        through). Every item is a full settle, idempotent on its request id, so a batch that may
        or may not have committed is simply sent again.
        """
        valid = [a for a in items if not isinstance(a, E.IgwError)]
        now = self.now()
        try:
            rows: list[SettleResult | E.IgwError] = list(await self.repo.settle_batch(valid, now)) if valid else []
        except psycopg.Error:
            # Not a conflict or an outage (those are retried or raised as UNAVAILABLE), so
            # something in one item: settle them one by one, each getting its own outcome.
            _LOGGER.exception("settle batch failed in the database; settling its items one by one")
            rows = []
            for args in valid:
                try:
                    rows.append(await self.repo.settle(args, now))
                except psycopg.Error:
                    _LOGGER.exception("settle failed in the database")
                    rows.append(E.Internal("INTERNAL", "the settle failed in the database"))
        results = iter(rows)
        out: list[D.SettleResult | E.IgwError] = []
        for item in items:
            if isinstance(item, E.IgwError):
                out.append(item)
                continue
            row = next(results)
            if isinstance(row, E.IgwError):
                out.append(row)
                continue
            try:
                out.append(self._settled(item, row))
            except E.IgwError as err:
                out.append(err)
        return out

    def settle_args(
        self,
        *,
        request_id: str,
        reservation_id: str,
        usage: D.Usage,
        provider: str,
        provider_model: str,
        outcome: int = 0,
        latency: dt.timedelta | None = None,
        usage_estimated: bool = False,
    ) -> SettleArgs:
        """Validates one settle; returns it as the repository takes it (raises InvalidArgument)."""
        D.check_request_id(request_id)
        reservation_uuid = D.check_reservation_id(reservation_id) if reservation_id else None
        D.check_name("provider", provider)
        if not provider_model:
            raise E.InvalidArgument("MISSING_FIELD", "provider_model is required", {"field": "provider_model"})
        if len(provider_model) > 256 or not provider_model.isprintable():
            raise E.InvalidArgument("INVALID_NAME", "provider_model is malformed", {"field": "provider_model"})
        D.check_tokens("usage.input_tokens", usage.input_tokens)
        D.check_tokens("usage.output_tokens", usage.output_tokens)
        D.check_tokens("usage.cached_input_tokens", usage.cached_input_tokens)
        if usage.cached_input_tokens > usage.input_tokens:
            raise E.InvalidArgument(
                "INVALID_TOKENS", "cached_input_tokens cannot exceed input_tokens",
                {"field": "usage.cached_input_tokens"},
            )
        if outcome == 0:
            outcome = D.Outcome.SUCCESS
        if outcome not in (D.Outcome.SUCCESS, D.Outcome.CANCELLED, D.Outcome.PROVIDER_ERROR):
            raise E.InvalidArgument("INVALID_OUTCOME", "unknown outcome", {"field": "outcome"})
        latency_us = 0
        if latency is not None:
            latency_us = latency // dt.timedelta(microseconds=1)
            if latency_us < 0 or latency_us > MAX_VALUE:
                raise E.InvalidArgument("INVALID_LATENCY", "latency must be >= 0", {"field": "latency"})
        return SettleArgs(
            request_id, reservation_uuid, usage.input_tokens, usage.output_tokens, usage.cached_input_tokens,
            provider, provider_model, int(outcome), latency_us, usage_estimated,
        )

    def _settled(self, args: SettleArgs, settled: SettleResult) -> D.SettleResult:
        """Turns ``ledger_settle``'s result into the settle's outcome (or its error)."""
        if settled.outcome is SettleOutcome.SETTLED:
            assert settled.entry is not None
            entry = settled.entry
            budgets = list(settled.budgets)
            if settled.captured:
                _LOGGER.warning(
                    "settle arrived after the hold was captured; the captured entry stands",
                    extra={"reservation_id": str(entry.reservation_id), "captured_nanos": entry.cost_nanos},
                )
                self.metrics.settles.labels("after_capture").inc()
            elif settled.replayed:
                self.metrics.settles.labels("replayed").inc()
            else:
                self.metrics.settles.labels("over_hold" if D.Flag.OVER_HOLD in entry.flags else "ok").inc()
                self.metrics.spend.labels(entry.team).inc(entry.cost_nanos)
                if settled.was_released:
                    _LOGGER.warning(
                        "settled a hold that had been released", extra={"reservation_id": str(entry.reservation_id)}
                    )
                if D.Flag.OVER_HOLD in entry.flags:
                    _LOGGER.warning(
                        "actual cost above the hold; recorded in full",
                        extra={"cost_nanos": entry.cost_nanos, "held_nanos": entry.held_nanos},
                    )
                record_crossings(self.metrics, settled.crossings)
                update_remaining(self.metrics, entry.team, budgets)
            return D.SettleResult(entry, settled.replayed, budgets)
        outcome = settled.outcome
        self.metrics.settles.labels(outcome.value.lower()).inc()
        request_id, reservation_id = args.request_id, args.reservation_id
        if outcome is SettleOutcome.MISMATCH:
            raise E.Aborted(
                _MISMATCH,
                "this request_id was settled with a different payload",
                {"request_id": request_id},
            )
        if outcome is SettleOutcome.NOT_FOUND:
            raise E.NotFound(
                "RESERVATION_NOT_FOUND", "no such reservation", {"reservation_id": str(reservation_id)}
            )
        if outcome is SettleOutcome.NO_OPEN_HOLD:
            raise E.NotFound(
                "OPEN_HOLD_NOT_FOUND",
                "this request_id has no open hold to settle; pass the reservation_id",
                {"request_id": request_id},
            )
        if outcome is SettleOutcome.RESERVATION_MISMATCH:
            raise E.FailedPrecondition(
                "RESERVATION_MISMATCH",
                "the reservation belongs to another request_id",
                {"reservation_id": str(reservation_id), "request_id": request_id},
            )
        if outcome is SettleOutcome.COST_OVERFLOW:
            raise E.InvalidArgument("INVALID_TOKENS", "the cost would exceed 2**62 nano-dollars", {})
        if outcome is SettleOutcome.NOT_PRICED:
            raise E.FailedPrecondition(
                "MODEL_NOT_PRICED", "the hold's price version has no price for its model",
                {"price_version": settled.price_version},
            )
        raise E.Internal("INTERNAL", f"unexpected settle result {outcome.value}")

    async def release(self, *, reservation_id: str, reason: str = "") -> bool:
        """Frees an open hold; False when it was already released, settled or captured."""
        reservation_uuid = D.check_reservation_id(reservation_id)
        reason = reason[:200]
        release = await self.repo.release(reservation_uuid, reason, self.now())
        if not release.found:
            self.metrics.releases.labels("not_found").inc()
            raise E.NotFound(
                "RESERVATION_NOT_FOUND", "no such reservation", {"reservation_id": str(reservation_uuid)})
        released = release.released
        self.metrics.releases.labels("released" if released else "noop").inc()
        return released

    async def release_request(self, *, request_id: str, reason: str = "") -> bool:
        """Frees every open hold of a call that ended early, and refuses any later Reserve for
        its request id (one placed by a Reserve still in flight is never created). Idempotent;
        True when a hold was freed."""
        D.check_request_id(request_id)
        released = await self.repo.release_request(request_id, reason[:200], self.now()) > 0
        self.metrics.releases.labels("request_released" if released else "request_noop").inc()
        return released

    async def sweep_once(self, batch: int = 500) -> int:
        """Captures expired holds in batches until none is left; returns how many were captured.

        Also purges request-release records older than ``RELEASE_RECORD_DAYS`` (one batch).
        """
        await self.repo.purge_request_releases(self.now() - dt.timedelta(days=RELEASE_RECORD_DAYS), batch)
        total = 0
        while True:
            capture = await self.repo.capture(self.now(), batch)
            for hold in capture.captured:
                _LOGGER.warning(
                    "captured an expired hold at its full amount",
                    extra={"reservation_id": hold.reservation_id, "team": hold.team,
                           "captured_nanos": hold.amount_nanos, "hold_request_id": hold.request_id},
                )
                self.metrics.captured.inc()
                self.metrics.captured_nanos.inc(hold.amount_nanos)
                self.metrics.spend.labels(hold.team).inc(hold.amount_nanos)
            if capture.freed:
                _LOGGER.warning("freed %d expired holds of already-settled requests", capture.freed)
            record_crossings(self.metrics, capture.crossings)
            total += len(capture.captured)
            if len(capture.captured) + capture.freed < batch:
                return total

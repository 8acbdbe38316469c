"""The ledger's use cases: validate, call the repository, turn results into domain values.

Decisions where the issue is silent (also in the report):

- A team (and agent) that no budget applies to is refused: ``FAILED_PRECONDITION / NO_BUDGET``
  (an operator must act; waiting or retrying changes nothing, which is what FAILED_PRECONDITION
  says and RESOURCE_EXHAUSTED does not). ``IGW_LEDGER_ALLOW_UNBUDGETED=true`` lets such teams
  spend without limit; they still get holds, so their spend is exact and visible. A budget
  created later (mid-window) starts from what the team (or the
  agent) already spent in the current window, counting entries in the window of their
  reservation, and the team's holds still open in that window count in it too; all in SQL
  (``ledger_set_budget``), under the team's advisory lock that Reserve takes shared.
- Release by request id (a call that ended early) frees every open hold of the request and
  records the request as released; a later Reserve for it is ``FAILED_PRECONDITION /
  REQUEST_RELEASED`` and creates nothing. The record is kept a day (``RELEASE_RECORD_DAYS``),
  far longer than any Reserve can be in flight, then purged by the sweeper.
- Settle with an empty reservation_id settles the request's open hold of its latest attempt
  (``NOT_FOUND / OPEN_HOLD_NOT_FOUND`` when there is none); a replay without reservation_id
  is judged on the payload alone.
- Reserve is idempotent on (request_id, attempt); the same key with another team, agent,
  model or token bounds is ``ABORTED / IDEMPOTENCY_MISMATCH``. A Reserve for a request
  that already has a spend entry is ``FAILED_PRECONDITION / ALREADY_SETTLED``.
- Settle is idempotent on request_id. A different reservation, usage, provider, provider
  model, outcome or usage_estimated under the same id is ``ABORTED / IDEMPOTENCY_MISMATCH``
  (latency is reporting only and not compared). A Settle arriving after the sweeper
  captured the hold returns the captured entry (full hold amount, UNSETTLED_CAPTURE) as a
  replay and logs a warning: entries are append-only and one per request id, and the
  capture never undercharges.
- Settling a hold the router released earlier still records the spend (spend is never
  lost), in the hold's windows, flagged OVER_HOLD when above the hold.
- A captured hold's entry has outcome UNSPECIFIED (unknown) and zero tokens: the amount is
  charged, no usage is invented.
  An expired hold of a request that already has an entry (an earlier attempt that leaked)
  is freed rather than captured: one entry per request id wins.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry, Counter, Gauge

from services.common import errors as E
from services.ledger import domain as D
from services.ledger.config import MAX_HOLD_TTL_SECONDS, MAX_SLICE_CALLS
from services.ledger.pricing import MAX_VALUE, ModelPrice, default_prices
from services.ledger.repository import Repository, SettleArgs

_LOGGER = logging.getLogger(__name__)

Clock = Callable[[], dt.datetime]


def utcnow() -> dt.datetime:
    """The real clock."""
    return dt.datetime.now(dt.UTC)


class LedgerMetrics:
    """The ledger's own Prometheus metrics, on the runtime's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.reserves = Counter(
            "igw_ledger_reserves", "Reserve calls by outcome.", ["outcome"], registry=registry
        )
        self.settles = Counter("igw_ledger_settles", "Settle calls by outcome.", ["outcome"], registry=registry)
        self.releases = Counter(
            "igw_ledger_releases", "Release calls by outcome.", ["outcome"], registry=registry
        )
        self.denials = Counter(
            "igw_ledger_budget_denials", "Reserves refused for budget, by team.", ["team"], registry=registry
        )
        self.captured = Counter(
            "igw_ledger_holds_captured", "Expired holds captured at their full amount.", registry=registry
        )
        self.captured_nanos = Counter(
            "igw_ledger_holds_captured_nanodollars", "Nano-dollars captured from expired holds.", registry=registry
        )
        self.soft_crossings = Counter(
            "igw_ledger_soft_limit_crossings",
            "Soft limits crossed (once per budget window), by team.",
            ["team"],
            registry=registry,
        )
        self.remaining = Gauge(
            "igw_ledger_remaining_budget_nanodollars",
            "Smallest remaining team-wide budget in the current window, by team.",
            ["team"],
            registry=registry,
        )
        self.spend = Counter(
            "igw_ledger_spend_nanodollars", "Nano-dollars settled or captured, by team.", ["team"], registry=registry
        )
        self.rate_limited = Counter(
            "igw_ledger_rate_limited", "Holds refused by a rate limit, by team and limit kind.", ["team", "kind"],
            registry=registry,
        )
        self.rpm_limit = Gauge(
            "igw_ledger_rate_limit_requests_per_minute", "Configured requests-per-minute limit, by team and agent"
            " (agent empty: team-wide).", ["team", "agent"], registry=registry,
        )
        self.tpm_limit = Gauge(
            "igw_ledger_rate_limit_tokens_per_minute", "Configured input+output tokens-per-minute limit, by team and"
            " agent (agent empty: team-wide).", ["team", "agent"], registry=registry,
        )
        self.partitions = Gauge(
            "igw_ledger_spend_partitions", "Monthly spend-entry partitions attached.", registry=registry
        )


def _status(raw: dict[str, Any]) -> D.BudgetStatus:
    return D.BudgetStatus(
        team=raw["team"],
        agent=raw["agent"],
        run=raw.get("run", ""),
        window=D.Window(raw["window"]),
        limit_nanos=int(raw["limit"]),
        soft_limit_nanos=int(raw["soft"]),
        spent_nanos=int(raw["spent"]),
        held_nanos=int(raw["held"]),
        window_start=D.from_us(int(raw["start_us"])),
    )


def _hold(raw: dict[str, Any]) -> D.Hold:
    return D.Hold(
        reservation_id=uuid.UUID(raw["id"]),
        request_id=raw["request_id"],
        attempt=int(raw["attempt"]),
        team=raw["team"],
        agent=raw["agent"],
        model=raw["model"],
        amount_nanos=int(raw["amount"]),
        price_version=int(raw["price_version"]),
        state=raw["state"],
        slice_calls=int(raw.get("slice_calls", 0)),
        created_at=D.from_us(int(raw["created_us"])),
        expires_at=D.from_us(int(raw["expires_us"])),
    )


def entry_from_json(raw: dict[str, Any]) -> D.SpendEntry:
    """A spend entry from ``ledger_entry_json``."""
    return D.SpendEntry(
        id=int(raw["id"]),
        request_id=raw["request_id"],
        reservation_id=uuid.UUID(raw["reservation_id"]),
        team=raw["team"],
        agent=raw["agent"],
        model=raw["model"],
        provider=raw["provider"],
        provider_model=raw["provider_model"],
        usage=D.Usage(int(raw["input"]), int(raw["output"]), int(raw["cached"])),
        cost_nanos=int(raw["cost"]),
        held_nanos=int(raw["held"]),
        price_version=int(raw["price_version"]),
        outcome=D.Outcome(int(raw["outcome"])),
        flags=D.Flag(int(raw["flags"])),
        latency_us=int(raw["latency_us"]),
        created_at=D.from_us(int(raw["created_us"])),
        reserve_time=D.from_us(int(raw["reserve_us"])),
        run_id=raw.get("run_id", ""),
    )


_MISMATCH = "IDEMPOTENCY_MISMATCH"
# How long a request-release record refuses late Reserves of its request id.
RELEASE_RECORD_DAYS = 1


class LedgerService:
    """Reserve / Settle / Release / capture and the operator reads, over one repository."""

    def __init__(
        self,
        repo: Repository,
        metrics: LedgerMetrics,
        *,
        now: Clock = utcnow,
        hold_ttl_seconds: int = 300,
        partitions_ahead_months: int = 3,
        retention_days: int = 0,
    ) -> None:
        self.repo = repo
        self.metrics = metrics
        self.now = now
        self.hold_ttl_us = hold_ttl_seconds * 1_000_000
        self.partitions_ahead_months = partitions_ahead_months
        self.retention_days = retention_days

    # ------------------------------------------------------------ startup

    async def seed_default_prices(self) -> bool:
        """Loads the shipped catalogue as version 1 when the catalogue is empty."""
        seeded = await self.repo.seed_prices(default_prices(), self.now())
        if seeded:
            _LOGGER.info("loaded the default price catalogue as version 1")
        return seeded

    # ------------------------------------------------------------ data plane

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
        res = await self.repo.reserve(
            uuid.uuid4(), request_id, attempt, team, agent, model, provider,
            prompt_tokens, max_output_tokens, ttl_us, self.now(), calls, run_id, run_cap_nanos,
        )
        kind = "slice_" if calls else ""
        result = res["result"]
        if result == "OK":
            out = D.ReserveResult(_hold(res["hold"]), [_status(b) for b in res["budgets"]], bool(res["replayed"]))
            self.metrics.reserves.labels(kind + ("replayed" if out.replayed else "ok")).inc()
            self._update_remaining(team, out.budgets)
            return out
        self.metrics.reserves.labels(kind + result.lower()).inc()
        if result == "DENIED":
            status = _status(res["budget"])
            self.metrics.denials.labels(team).inc()
            self.metrics.remaining.labels(team).set(status.remaining_nanos)
            raise D.budget_exceeded(status, int(res["amount"]))
        if result == "NO_SLICE":
            raise E.FailedPrecondition(
                "SLICE_NOT_GRANTED",
                "the budget is too near its limit for a slice: place per-call holds (Reserve)",
                {"team": team, "amount": int(res["amount"])},
            )
        if result == "RATE_LIMITED":
            kind = "requests" if int(res["rpm"]) and int(res["requests"]) >= int(res["rpm"]) else "tokens"
            self.metrics.rate_limited.labels(team, kind).inc()
            raise D.rate_limited(team, res)
        if result == "RATE_TOO_LARGE":
            raise E.FailedPrecondition(
                "CALL_EXCEEDS_RATE_LIMIT",
                "the call's token bound (prompt + max output) is above the tokens-per-minute limit",
                {"team": team, "agent": res["agent"], "tokens_per_minute": res["tpm"], "tokens": res["tokens"]},
            )
        if result == "NOT_PRICED":
            raise E.FailedPrecondition(
                "MODEL_NOT_PRICED",
                f"model {model} has no price in catalogue version {res['price_version']}",
                {"model": model, "price_version": res["price_version"]},
            )
        if result == "MISMATCH":
            raise E.Aborted(
                _MISMATCH,
                f"a hold with this {what} exists with a different payload",
                {what: request_id, "attempt": attempt},
            )
        if result == "ALREADY_SETTLED":
            raise E.FailedPrecondition(
                "ALREADY_SETTLED", f"this {what} is already settled", {what: request_id}
            )
        if result == "COST_OVERFLOW":
            raise E.InvalidArgument(
                "INVALID_TOKENS", "the hold would exceed 2**62 nano-dollars", {"model": model}
            )
        if result == "NO_BUDGET":
            self.metrics.denials.labels(team).inc()
            raise E.FailedPrecondition(
                "NO_BUDGET",
                f"no budget applies to team {team}"
                + (f" agent {agent}" if agent else "")
                + "; an operator must set one (or allow unbudgeted teams)",
                {"team": team, "agent": agent},
            )
        if result == "REQUEST_RELEASED":
            raise E.FailedPrecondition(
                "REQUEST_RELEASED",
                f"this {what}'s call ended and was released; use a new {what}",
                {what: request_id},
            )
        raise E.Internal("INTERNAL", f"unexpected reserve result {result}")

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
        return self._settled(args, await self.repo.settle(*args, self.now()))

    async def settle_batch(self, items: Sequence[SettleArgs | E.IgwError]) -> list[D.SettleResult | E.IgwError]:
        """Settles many in one ledger transaction (one durable commit); one outcome per item.

        ``items`` are :meth:`settle_args` results, or the error their validation raised (passed
        through). Every item is a full settle, idempotent on its request id, so a batch that may
        or may not have committed is simply sent again.
        """
        valid = [a for a in items if not isinstance(a, E.IgwError)]
        now = self.now()
        try:
            rows: list[dict[str, Any] | E.IgwError] = list(await self.repo.settle_batch(valid, now)) if valid else []
        except psycopg.Error:
            # Not a conflict or an outage (those are retried or raised as UNAVAILABLE), so
            # something in one item: settle them one by one, each getting its own outcome.
            _LOGGER.exception("settle batch failed in the database; settling its items one by one")
            rows = []
            for args in valid:
                try:
                    rows.append(await self.repo.settle(*args, now))
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
        rid = D.check_reservation_id(reservation_id) if reservation_id else None
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
        return (
            request_id, rid, usage.input_tokens, usage.output_tokens, usage.cached_input_tokens,
            provider, provider_model, int(outcome), latency_us, usage_estimated,
        )

    def _settled(self, args: SettleArgs, res: dict[str, Any]) -> D.SettleResult:
        """Turns ``ledger_settle``'s JSON result into the settle's outcome (or its error)."""
        request_id, rid = args[0], args[1]
        result = res["result"]
        if result == "OK":
            entry = entry_from_json(res["entry"])
            budgets = [_status(b) for b in res.get("budgets", [])]
            if res.get("captured"):
                _LOGGER.warning(
                    "settle arrived after the hold was captured; the captured entry stands",
                    extra={"reservation_id": str(entry.reservation_id), "captured_nanos": entry.cost_nanos},
                )
                self.metrics.settles.labels("after_capture").inc()
            elif res["replayed"]:
                self.metrics.settles.labels("replayed").inc()
            else:
                self.metrics.settles.labels("over_hold" if D.Flag.OVER_HOLD in entry.flags else "ok").inc()
                self.metrics.spend.labels(entry.team).inc(entry.cost_nanos)
                if res.get("was_state") == "RELEASED":
                    _LOGGER.warning(
                        "settled a hold that had been released", extra={"reservation_id": str(entry.reservation_id)}
                    )
                if D.Flag.OVER_HOLD in entry.flags:
                    _LOGGER.warning(
                        "actual cost above the hold; recorded in full",
                        extra={"cost_nanos": entry.cost_nanos, "held_nanos": entry.held_nanos},
                    )
                self._crossings(res.get("crossings", []))
                self._update_remaining(entry.team, budgets)
            return D.SettleResult(entry, bool(res["replayed"]), budgets)
        self.metrics.settles.labels(result.lower()).inc()
        if result == "MISMATCH":
            raise E.Aborted(
                _MISMATCH,
                "this request_id was settled with a different payload",
                {"request_id": request_id},
            )
        if result == "NOT_FOUND":
            raise E.NotFound(
                "RESERVATION_NOT_FOUND", "no such reservation", {"reservation_id": str(rid)}
            )
        if result == "NO_OPEN_HOLD":
            raise E.NotFound(
                "OPEN_HOLD_NOT_FOUND",
                "this request_id has no open hold to settle; pass the reservation_id",
                {"request_id": request_id},
            )
        if result == "RESERVATION_MISMATCH":
            raise E.FailedPrecondition(
                "RESERVATION_MISMATCH",
                "the reservation belongs to another request_id",
                {"reservation_id": str(rid), "request_id": request_id},
            )
        if result == "COST_OVERFLOW":
            raise E.InvalidArgument("INVALID_TOKENS", "the cost would exceed 2**62 nano-dollars", {})
        if result == "NOT_PRICED":
            raise E.FailedPrecondition(
                "MODEL_NOT_PRICED", "the hold's price version has no price for its model",
                {"price_version": res["price_version"]},
            )
        raise E.Internal("INTERNAL", f"unexpected settle result {result}")

    async def release(self, *, reservation_id: str, reason: str = "") -> bool:
        """Frees an open hold; False when it was already released, settled or captured."""
        rid = D.check_reservation_id(reservation_id)
        reason = reason[:200]
        res = await self.repo.release(rid, reason, self.now())
        if res["result"] == "NOT_FOUND":
            self.metrics.releases.labels("not_found").inc()
            raise E.NotFound("RESERVATION_NOT_FOUND", "no such reservation", {"reservation_id": str(rid)})
        released = bool(res["released"])
        self.metrics.releases.labels("released" if released else "noop").inc()
        return released

    async def release_request(self, *, request_id: str, reason: str = "") -> bool:
        """Frees every open hold of a call that ended early, and refuses any later Reserve for
        its request id (one placed by a Reserve still in flight is never created). Idempotent;
        True when a hold was freed."""
        D.check_request_id(request_id)
        res = await self.repo.release_request(request_id, reason[:200], self.now())
        released = int(res["released"]) > 0
        self.metrics.releases.labels("request_released" if released else "request_noop").inc()
        return released

    async def sweep_once(self, batch: int = 500) -> int:
        """Captures expired holds in batches until none is left; returns how many were captured.

        Also purges request-release records older than ``RELEASE_RECORD_DAYS`` (one batch).
        """
        await self.repo.purge_request_releases(self.now() - dt.timedelta(days=RELEASE_RECORD_DAYS), batch)
        total = 0
        while True:
            res = await self.repo.capture(self.now(), batch)
            captured = res["captured"]
            for item in captured:
                _LOGGER.warning(
                    "captured an expired hold at its full amount",
                    extra={"reservation_id": item["id"], "team": item["team"], "captured_nanos": item["amount"],
                           "hold_request_id": item["request_id"]},
                )
                self.metrics.captured.inc()
                self.metrics.captured_nanos.inc(int(item["amount"]))
                self.metrics.spend.labels(item["team"]).inc(int(item["amount"]))
            if res["freed"]:
                _LOGGER.warning("freed %d expired holds of already-settled requests", res["freed"])
            self._crossings(res["crossings"])
            total += len(captured)
            if len(captured) + int(res["freed"]) < batch:
                return total

    async def get_budget(self, *, team: str, agent: str = "") -> list[D.BudgetStatus]:
        """Every budget that applies to the team (and agent), in its current window."""
        D.check_principal("team", team)
        D.check_principal("agent", agent, required=False)
        return [_status(b) for b in await self.repo.budgets(team, agent, self.now())]

    # ------------------------------------------------------------ administration

    async def set_budget(
        self, *, team: str, agent: str, window: int, limit_nanos: int, soft_limit_nanos: int = 0, run: str = ""
    ) -> D.BudgetConfig:
        """Creates or replaces a budget (of a team, an agent, or a run: TOTAL window, no agent)."""
        D.check_principal("team", team)
        D.check_principal("agent", agent, required=False)
        D.check_name("run", run, required=False)
        if run and window == 0:
            window = D.Window.TOTAL
        if run and (agent or window != D.Window.TOTAL):
            raise E.InvalidArgument(
                "INVALID_RUN_BUDGET", "a run budget has no agent and the TOTAL window", {"field": "run"})
        if window not in (1, 2, 3, 4):
            raise E.InvalidArgument("INVALID_WINDOW", "window is required", {"field": "window"})
        D.check_amount("limit_nanos", limit_nanos)
        D.check_amount("soft_limit_nanos", soft_limit_nanos)
        if soft_limit_nanos > limit_nanos:
            raise E.InvalidArgument(
                "INVALID_AMOUNT", "soft_limit_nanos cannot exceed limit_nanos", {"field": "soft_limit_nanos"}
            )
        row = await self.repo.set_budget(team, agent, window, limit_nanos, soft_limit_nanos, self.now(), run)
        _LOGGER.info(
            "budget set",
            extra={"team": team, "agent": agent, "run": run, "window": D.Window(window).name,
                   "limit_nanos": limit_nanos},
        )
        return D.BudgetConfig(
            row["team"], row["agent"], D.Window(row["window"]), int(row["limit"]), int(row["soft"]),
            row["updated_at"], row.get("run", ""),
        )

    async def list_budgets(
        self, *, team: str = "", include_runs: bool = False, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[D.BudgetConfig], str]:
        """Configured budgets ordered by (team, run, agent, window), paged; (budgets, next token)."""
        D.check_principal("team", team, required=False)
        size = _page_size(page_size, 100, 1000)
        after: tuple[str, str, str, int] | None = None
        if page_token:
            parts = _decode_parts(page_token, 4)
            try:
                after = (parts[0], parts[1], parts[2], int(parts[3]))
            except ValueError:
                raise _bad_token() from None
        rows = await self.repo.list_budgets(team, include_runs, size + 1, after)
        out = [
            D.BudgetConfig(r["team"], r["agent"], D.Window(r["window"]), int(r["limit_nanos"]),
                           int(r["soft_limit_nanos"]), r["updated_at"], r["run"])
            for r in rows[:size]
        ]
        token = ""
        if len(rows) > size:
            last = out[-1]
            token = _encode_parts(last.team, last.run, last.agent, str(int(last.window)))
        return out, token

    async def delete_budget(self, *, team: str, agent: str = "", window: int, run: str = "") -> D.BudgetConfig:
        """Deletes one budget; NOT_FOUND / BUDGET_NOT_FOUND when there is none."""
        D.check_principal("team", team)
        D.check_principal("agent", agent, required=False)
        D.check_name("run", run, required=False)
        if run and window == 0:
            window = D.Window.TOTAL
        if window not in (1, 2, 3, 4):
            raise E.InvalidArgument("INVALID_WINDOW", "window is required", {"field": "window"})
        row = await self.repo.delete_budget(team, agent, run, window)
        if row is None:
            raise E.NotFound(
                "BUDGET_NOT_FOUND", "no such budget",
                {"team": team, "agent": agent, "run": run, "window": D.Window(window).name},
            )
        _LOGGER.info("budget deleted", extra={"team": team, "agent": agent, "run": run,
                                              "window": D.Window(window).name})
        return D.BudgetConfig(row["team"], row["agent"], D.Window(row["window"]), int(row["limit_nanos"]),
                              int(row["soft_limit_nanos"]), row["updated_at"], row["run"])

    async def set_rate_limit(
        self, *, team: str, agent: str = "", requests_per_minute: int = 0, tokens_per_minute: int = 0
    ) -> D.RateLimit:
        """Sets (or, both 0, clears) a team's or agent's rate limits."""
        D.check_principal("team", team)
        D.check_principal("agent", agent, required=False)
        D.check_amount("requests_per_minute", requests_per_minute)
        D.check_amount("tokens_per_minute", tokens_per_minute)
        row = await self.repo.set_rate_limit(team, agent, requests_per_minute, tokens_per_minute, self.now())
        self.metrics.rpm_limit.labels(team, agent).set(requests_per_minute)
        self.metrics.tpm_limit.labels(team, agent).set(tokens_per_minute)
        _LOGGER.info("rate limit set", extra={"team": team, "agent": agent, "requests_per_minute": requests_per_minute,
                                              "tokens_per_minute": tokens_per_minute})
        return D.RateLimit(team, agent, int(row["requests_per_minute"]), int(row["tokens_per_minute"]),
                           0, 0, row["updated_at"])

    async def get_rate_limits(self, *, team: str) -> list[D.RateLimit]:
        """The team's limits (team-wide first, then its agents') with the last 60 s's use."""
        D.check_principal("team", team)
        return [
            D.RateLimit(r["team"], r["agent"], int(r["rpm"]), int(r["tpm"]), int(r["requests"]),
                        int(Decimal(str(r["tokens"]))), D.from_us(int(r["updated_us"])))
            for r in await self.repo.rate_limits(team, self.now())
        ]

    async def refresh_limit_metrics(self) -> None:
        """Sets the limit gauges from the database (every replica shows every limit)."""
        for team, agent, rpm, tpm in await self.repo.all_rate_limits():
            self.metrics.rpm_limit.labels(team, agent).set(rpm)
            self.metrics.tpm_limit.labels(team, agent).set(tpm)

    async def maintain(self) -> D.Maintenance:
        """Creates the spend partitions due ahead; drops those past retention; prunes rate events."""
        now = self.now()
        cutoff = now - dt.timedelta(days=self.retention_days) if self.retention_days else None
        created, dropped, names = await self.repo.maintain_partitions(now, self.partitions_ahead_months, cutoff)
        for name in created:
            _LOGGER.info("spend partition created", extra={"partition": name})
        for name in dropped:
            _LOGGER.warning("spend partition dropped (retention)", extra={"partition": name,
                                                                          "retention_days": self.retention_days})
        self.metrics.partitions.set(len(names))
        await self.repo.prune_rate_events(now)
        await self.refresh_limit_metrics()
        return D.Maintenance(created, dropped, names)

    async def list_spend(
        self,
        *,
        start: dt.datetime | None,
        end: dt.datetime | None,
        group_by: Sequence[str],
        team: str = "",
        run: str = "",
    ) -> list[D.SpendTotal]:
        """The first page (up to 10,000 groups) of :meth:`list_spend_page`."""
        totals, _ = await self.list_spend_page(
            start=start, end=end, group_by=group_by, team=team, run=run, page_size=10000)
        return totals

    async def list_spend_page(
        self,
        *,
        start: dt.datetime | None,
        end: dt.datetime | None,
        group_by: Sequence[str],
        team: str = "",
        run: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[D.SpendTotal], str]:
        """Totals grouped by team/agent/model/provider/day/run over [start, end), paged; returns
        (totals, next_page_token). Whole hours are read from the hourly rollup."""
        D.check_principal("team", team, required=False)
        D.check_name("run", run, required=False)
        if run and not team:
            raise E.InvalidArgument("MISSING_FIELD", "a run filter needs the team", {"field": "team"})
        size = _page_size(page_size, 1000, 10000)
        offset = 0
        if page_token:
            try:
                offset = int(_decode_parts(page_token, 1)[0])
            except ValueError:
                raise _bad_token() from None
            if offset < 0:
                raise _bad_token()
        now = self.now()
        end = end or now
        start = start or (end - dt.timedelta(days=30))
        if start > end:
            raise E.InvalidArgument("INVALID_TIME_RANGE", "start_time is after end_time", {})
        rows = await self.repo.list_spend(start, end, list(dict.fromkeys(group_by)), team, run, size + 1, offset)
        token = _encode_parts(str(offset + size)) if len(rows) > size else ""
        rows = rows[:size]
        out = []
        for r in rows:
            day = r.get("day")
            out.append(
                D.SpendTotal(
                    team=r.get("team") or "",
                    agent=r.get("agent") or "",
                    model=r.get("model") or "",
                    provider=r.get("provider") or "",
                    run=r.get("run_id") or "",
                    day=day.replace(tzinfo=dt.UTC) if day is not None else None,
                    request_count=int(r["n"]),
                    usage=D.Usage(int(r["input"]), int(r["output"]), int(r["cached"])),
                    cost_nanos=int(r["cost"]),
                )
            )
        return out, token

    async def list_entries(
        self,
        *,
        team: str = "",
        start: dt.datetime | None = None,
        end: dt.datetime | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[D.SpendEntry], str]:
        """Entries newest first; returns (entries, next_page_token)."""
        D.check_principal("team", team, required=False)
        if page_size < 0:
            raise E.InvalidArgument("INVALID_PAGE_SIZE", "page_size must be >= 0", {"field": "page_size"})
        size = min(page_size or 100, 1000)
        before = _decode_token(page_token) if page_token else None
        rows = await self.repo.list_entries(team, start, end, size + 1, before)
        entries = [entry_from_json(r) for r in rows[:size]]
        token = ""
        if len(rows) > size and entries:
            last = rows[size - 1]
            token = f"{int(last['created_us'])}.{int(last['id'])}"
        return entries, token

    async def set_prices(
        self, *, request_id: str, prices: Sequence[ModelPrice], remove_models: Sequence[str]
    ) -> int:
        """Creates a new catalogue version from the current one plus the changes."""
        D.check_request_id(request_id)
        seen: set[str] = set()
        for p in prices:
            D.check_name("model", p.model)
            if p.model in seen:
                raise E.InvalidArgument("DUPLICATE_MODEL", f"model {p.model} appears twice", {"model": p.model})
            seen.add(p.model)
            D.check_amount("input_per_mtok_nanos", p.input_per_mtok)
            D.check_amount("output_per_mtok_nanos", p.output_per_mtok)
            D.check_amount("cached_input_per_mtok_nanos", p.cached_input_per_mtok)
        for m in remove_models:
            D.check_name("remove_models", m)
            if m in seen:
                raise E.InvalidArgument("DUPLICATE_MODEL", f"model {m} is both set and removed", {"model": m})
        if not prices and not remove_models:
            raise E.InvalidArgument("MISSING_FIELD", "prices or remove_models is required", {"field": "prices"})
        digest = hashlib.sha256(
            repr(
                (
                    sorted((p.model, p.input_per_mtok, p.output_per_mtok, p.cached_input_per_mtok) for p in prices),
                    sorted(remove_models),
                )
            ).encode()
        ).hexdigest()
        res = await self.repo.set_prices(request_id, digest, list(prices), list(remove_models), self.now())
        if res is None:
            raise E.Aborted(_MISMATCH, "this request_id created a different price version", {"request_id": request_id})
        version, replayed = res
        if not replayed:
            _LOGGER.info("price catalogue version %d created", version)
        return version

    async def list_prices(self, *, version: int = 0, page_size: int = 0, page_token: str = "") -> D.PriceList:
        """One catalogue version (0 = current), by model name; paged when ``page_size`` is set."""
        if version < 0:
            raise E.InvalidArgument("INVALID_VERSION", "version must be >= 0", {"field": "version"})
        if page_size < 0:
            raise E.InvalidArgument("INVALID_PAGE_SIZE", "page_size must be >= 0", {"field": "page_size"})
        after = _decode_parts(page_token, 1)[0] if page_token else None
        res = await self.repo.list_prices(version)
        if res is None:
            raise E.NotFound("PRICE_VERSION_NOT_FOUND", "no such price catalogue version", {"version": version})
        prices = [p for p in res[2] if after is None or p[0] > after]
        size = min(page_size, 10000) if page_size else len(prices)
        token = _encode_parts(prices[size - 1][0]) if len(prices) > size else ""
        return D.PriceList(res[0], res[1], prices[:size], token)

    # ------------------------------------------------------------ helpers

    def _crossings(self, crossings: list[dict[str, Any]]) -> None:
        for c in crossings:
            self.metrics.soft_crossings.labels(c["team"]).inc()
            _LOGGER.warning(
                "soft budget limit crossed",
                extra={"event": "soft_limit_crossed", "team": c["team"], "agent": c["agent"],
                       "window": D.Window(c["window"]).name, "soft_limit_nanos": c["soft"],
                       "spent_nanos": c["spent"]},
            )

    def _update_remaining(self, team: str, budgets: list[D.BudgetStatus]) -> None:
        team_wide = [b.remaining_nanos for b in budgets if not b.agent and not b.run]
        if team_wide:
            self.metrics.remaining.labels(team).set(min(team_wide))


def _page_size(page_size: int, default: int, most: int) -> int:
    if page_size < 0:
        raise E.InvalidArgument("INVALID_PAGE_SIZE", "page_size must be >= 0", {"field": "page_size"})
    return min(page_size or default, most)


def _bad_token() -> E.InvalidArgument:
    return E.InvalidArgument("INVALID_PAGE_TOKEN", "page_token is malformed", {"field": "page_token"})


def _encode_parts(*parts: str) -> str:
    """An opaque page token: the keyset values, urlsafe base64 of their JSON."""
    return base64.urlsafe_b64encode(json.dumps(list(parts)).encode()).decode().rstrip("=")


def _decode_parts(token: str, n: int) -> list[str]:
    try:
        parts = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, TypeError):
        raise _bad_token() from None
    if not isinstance(parts, list) or len(parts) != n or not all(isinstance(p, str) for p in parts):
        raise _bad_token()
    return parts


def _decode_token(token: str) -> tuple[dt.datetime, int]:
    try:
        us, _, ident = token.partition(".")
        return D.from_us(int(us)), int(ident)
    except (ValueError, OverflowError):
        raise E.InvalidArgument("INVALID_PAGE_TOKEN", "page_token is malformed", {"field": "page_token"}) from None

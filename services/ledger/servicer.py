"""Proto <-> domain for the two ledger services; no SQL and no business rules here."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2

from igw.ledger.v1 import ledger_pb2 as pb
from igw.ledger.v1 import ledger_pb2_grpc
from services.common import errors as E
from services.ledger import domain as D
from services.ledger.draws import MAX_DRAWS
from services.ledger.pricing import ModelPrice
from services.ledger.repository import DrawArgs, SettleArgs
from services.ledger.service import LedgerService

_LOGGER = logging.getLogger(__name__)
# Settles per SettleBatch call: enough to amortise the RPC, small enough to bound its latency.
MAX_SETTLE_BATCH = 256

_GROUP = {
    pb.SPEND_GROUP_BY_TEAM: "team",
    pb.SPEND_GROUP_BY_AGENT: "agent",
    pb.SPEND_GROUP_BY_MODEL: "model",
    pb.SPEND_GROUP_BY_PROVIDER: "provider",
    pb.SPEND_GROUP_BY_DAY: "day",
    pb.SPEND_GROUP_BY_RUN: "run",
}


def _group(value: int) -> str:
    """A group-by dimension; an unknown value is refused, never dropped (it would widen the answer)."""
    dims: dict[int, str] = {int(k): v for k, v in _GROUP.items()}
    dim = dims.get(value)
    if dim is None:
        raise E.InvalidArgument("UNKNOWN_ENUM_VALUE", f"group_by has an unknown value {int(value)}",
                                {"field": "group_by", "value": int(value)})
    return dim


_FLAGS = (
    (D.Flag.OVER_HOLD, pb.SPEND_FLAG_OVER_HOLD),
    (D.Flag.UNSETTLED_CAPTURE, pb.SPEND_FLAG_UNSETTLED_CAPTURE),
    (D.Flag.USAGE_ESTIMATED, pb.SPEND_FLAG_USAGE_ESTIMATED),
)


def _ts(value: dt.datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def _opt_dt(msg: Any, field: str) -> dt.datetime | None:
    if not msg.HasField(field):
        return None
    return getattr(msg, field).ToDatetime(tzinfo=dt.UTC)  # type: ignore[no-any-return]


def budget_status_pb(s: D.BudgetStatus) -> pb.BudgetStatus:
    """A domain budget status as its proto."""
    out = pb.BudgetStatus(
        team=s.team,
        agent=s.agent,
        window=pb.BudgetWindow.ValueType(s.window),
        limit_nanos=s.limit_nanos,
        soft_limit_nanos=s.soft_limit_nanos,
        spent_nanos=s.spent_nanos,
        held_nanos=s.held_nanos,
        remaining_nanos=s.remaining_nanos,
        run=s.run,
    )
    end = s.window_end
    if end is not None:
        out.window_start.CopyFrom(_ts(s.window_start))
        out.window_end.CopyFrom(_ts(end))
    return out


def _settle_fields(request: pb.SettleRequest) -> dict[str, Any]:
    """A SettleRequest as the keyword arguments of ``LedgerService.settle``."""
    return {
        "request_id": request.request_id,
        "reservation_id": request.reservation_id,
        "usage": D.Usage(request.usage.input_tokens, request.usage.output_tokens, request.usage.cached_input_tokens),
        "provider": request.provider,
        "provider_model": request.provider_model,
        "outcome": request.outcome,
        "latency": request.latency.ToTimedelta() if request.HasField("latency") else None,
        "usage_estimated": request.usage_estimated,
    }


def spend_entry_pb(e: D.SpendEntry) -> pb.SpendEntry:
    """A domain spend entry as its proto."""
    return pb.SpendEntry(
        request_id=e.request_id,
        team=e.team,
        agent=e.agent,
        model=e.model,
        provider=e.provider,
        provider_model=e.provider_model,
        usage=pb.TokenUsage(
            input_tokens=e.usage.input_tokens,
            output_tokens=e.usage.output_tokens,
            cached_input_tokens=e.usage.cached_input_tokens,
        ),
        cost_nanos=e.cost_nanos,
        held_nanos=e.held_nanos,
        price_version=e.price_version,
        outcome=pb.CallOutcome.ValueType(e.outcome),
        flags=[p for f, p in _FLAGS if f in e.flags],
        create_time=_ts(e.created_at),
        reserve_time=_ts(e.reserve_time),
        latency=duration_pb2.Duration(seconds=e.latency_us // 1_000_000, nanos=(e.latency_us % 1_000_000) * 1000),
        run_id=e.run_id,
    )


def budget_pb(b: D.BudgetConfig) -> pb.Budget:
    """A configured budget as its proto."""
    return pb.Budget(
        team=b.team, agent=b.agent, window=pb.BudgetWindow.ValueType(b.window), limit_nanos=b.limit_nanos,
        soft_limit_nanos=b.soft_limit_nanos, update_time=_ts(b.updated_at), run=b.run,
    )


def rate_limit_pb(r: D.RateLimit) -> pb.RateLimit:
    """A rate limit as its proto."""
    return pb.RateLimit(
        team=r.team, agent=r.agent, requests_per_minute=r.requests_per_minute,
        tokens_per_minute=r.tokens_per_minute, requests_used=r.requests_used, tokens_used=r.tokens_used,
        update_time=_ts(r.updated_at),
    )


class LedgerServicer(ledger_pb2_grpc.LedgerServiceServicer):  # type: ignore[misc]
    """igw.ledger.v1.LedgerService."""

    def __init__(self, service: LedgerService) -> None:
        self._svc = service

    async def Reserve(self, request: pb.ReserveRequest, context: Any) -> pb.ReserveResponse:
        reserved = await self._svc.reserve(
            request_id=request.request_id,
            attempt=request.attempt,
            team=request.team,
            agent=request.agent,
            model=request.model,
            prompt_tokens_upper_bound=request.prompt_tokens_upper_bound,
            max_output_tokens=request.max_output_tokens,
            hold_ttl=request.hold_ttl.ToTimedelta() if request.HasField("hold_ttl") else None,
            provider=request.provider,
            run_id=request.run_id,
            run_cap_nanos=request.run_cap_nanos,
        )
        return pb.ReserveResponse(
            reservation_id=str(reserved.hold.reservation_id),
            held_nanos=reserved.hold.amount_nanos,
            price_version=reserved.hold.price_version,
            expire_time=_ts(reserved.hold.expires_at),
            budgets=[budget_status_pb(b) for b in reserved.budgets],
        )

    async def AcquireSlice(self, request: pb.AcquireSliceRequest, context: Any) -> pb.AcquireSliceResponse:
        acquired = await self._svc.acquire_slice(
            slice_id=request.slice_id,
            team=request.team,
            agent=request.agent,
            model=request.model,
            prompt_tokens_upper_bound=request.prompt_tokens_upper_bound,
            max_output_tokens=request.max_output_tokens,
            calls=request.calls,
            hold_ttl=request.hold_ttl.ToTimedelta() if request.HasField("hold_ttl") else None,
            provider=request.provider,
        )
        hold = acquired.hold
        calls = max(hold.slice_calls, 1)
        return pb.AcquireSliceResponse(
            reservation_id=str(hold.reservation_id),
            held_nanos=hold.amount_nanos,
            calls=hold.slice_calls,
            per_call_nanos=hold.amount_nanos // calls if not acquired.replayed else 0,
            price_version=hold.price_version,
            expire_time=_ts(hold.expires_at),
            budgets=[budget_status_pb(b) for b in acquired.budgets],
        )

    async def NoteSliceDraws(self, request: pb.NoteSliceDrawsRequest, context: Any) -> pb.NoteSliceDrawsResponse:
        if not 1 <= len(request.draws) <= MAX_DRAWS:
            raise E.InvalidArgument("INVALID_BATCH", f"a batch holds 1 to {MAX_DRAWS} draws", {"field": "draws"})
        items: list[DrawArgs | E.IgwError] = []
        for d in request.draws:
            try:
                items.append(self._svc.draw_args(d.reservation_id, d.request_id, d.held_nanos, d.withdrawn))
            except E.IgwError as err:
                items.append(err)
        out = pb.NoteSliceDrawsResponse()
        for result in await self._svc.note_draws(items):
            if isinstance(result, bool):
                out.results.add(over_limit=result)
            else:
                out.results.add(code=result.code.value[0], reason=result.reason)
        return out

    async def Settle(self, request: pb.SettleRequest, context: Any) -> pb.SettleResponse:
        return await self._settle(request)

    async def SettleBatch(self, request: pb.SettleBatchRequest, context: Any) -> pb.SettleBatchResponse:
        if not 1 <= len(request.settles) <= MAX_SETTLE_BATCH:
            raise E.InvalidArgument(
                "INVALID_BATCH", f"a batch holds 1 to {MAX_SETTLE_BATCH} settles", {"field": "settles"}
            )
        items: list[SettleArgs | E.IgwError] = []
        for req in request.settles:
            try:
                items.append(self._svc.settle_args(**_settle_fields(req)))
            except E.IgwError as err:
                items.append(err)
        out = pb.SettleBatchResponse()
        for item in await self._svc.settle_batch(items):
            if isinstance(item, E.IgwError):
                out.results.add(code=item.code.value[0], reason=item.reason)
            elif request.codes_only:
                out.results.add()  # settled: code 0, no entry built
            else:
                out.results.add(response=pb.SettleResponse(entry=spend_entry_pb(item.entry), replayed=item.replayed))
        return out

    async def _settle(self, request: pb.SettleRequest) -> pb.SettleResponse:
        settled = await self._svc.settle(**_settle_fields(request))
        return pb.SettleResponse(entry=spend_entry_pb(settled.entry), replayed=settled.replayed)

    async def Release(self, request: pb.ReleaseRequest, context: Any) -> pb.ReleaseResponse:
        if request.request_id:
            if request.reservation_id:
                raise E.InvalidArgument(
                    "AMBIGUOUS_RELEASE", "set reservation_id or request_id, not both", {"field": "request_id"}
                )
            released = await self._svc.release_request(request_id=request.request_id, reason=request.reason)
            return pb.ReleaseResponse(released=released)
        released = await self._svc.release(reservation_id=request.reservation_id, reason=request.reason)
        return pb.ReleaseResponse(released=released)

    async def GetBudget(self, request: pb.GetBudgetRequest, context: Any) -> pb.GetBudgetResponse:
        budgets = await self._svc.get_budget(team=request.team, agent=request.agent)
        return pb.GetBudgetResponse(budgets=[budget_status_pb(b) for b in budgets])


class LedgerAdminServicer(ledger_pb2_grpc.LedgerAdminServiceServicer):  # type: ignore[misc]
    """igw.ledger.v1.LedgerAdminService (operators only)."""

    def __init__(self, service: LedgerService) -> None:
        self._svc = service

    async def SetBudget(self, request: pb.SetBudgetRequest, context: Any) -> pb.Budget:
        b = await self._svc.set_budget(
            team=request.team,
            agent=request.agent,
            window=request.window,
            limit_nanos=request.limit_nanos,
            soft_limit_nanos=request.soft_limit_nanos,
            run=request.run,
        )
        return budget_pb(b)

    async def ListBudgets(self, request: pb.ListBudgetsRequest, context: Any) -> pb.ListBudgetsResponse:
        budgets, token = await self._svc.list_budgets(
            team=request.team, include_runs=request.include_runs, page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListBudgetsResponse(budgets=[budget_pb(b) for b in budgets], next_page_token=token)

    async def DeleteBudget(self, request: pb.DeleteBudgetRequest, context: Any) -> pb.DeleteBudgetResponse:
        b = await self._svc.delete_budget(team=request.team, agent=request.agent, window=request.window,
                                          run=request.run)
        return pb.DeleteBudgetResponse(budget=budget_pb(b))

    async def SetRateLimit(self, request: pb.SetRateLimitRequest, context: Any) -> pb.RateLimit:
        r = await self._svc.set_rate_limit(
            team=request.team, agent=request.agent, requests_per_minute=request.requests_per_minute,
            tokens_per_minute=request.tokens_per_minute,
        )
        return rate_limit_pb(r)

    async def GetRateLimits(self, request: pb.GetRateLimitsRequest, context: Any) -> pb.GetRateLimitsResponse:
        return pb.GetRateLimitsResponse(limits=[rate_limit_pb(r) for r in await self._svc.get_rate_limits(
            team=request.team)])

    async def MaintainPartitions(
        self, request: pb.MaintainPartitionsRequest, context: Any
    ) -> pb.MaintainPartitionsResponse:
        m = await self._svc.maintain()
        return pb.MaintainPartitionsResponse(created=m.created, dropped=m.dropped, partitions=m.partitions)

    async def ListSpend(self, request: pb.ListSpendRequest, context: Any) -> pb.ListSpendResponse:
        totals, token = await self._svc.list_spend_page(
            start=_opt_dt(request, "start_time"),
            end=_opt_dt(request, "end_time"),
            group_by=[_group(g) for g in request.group_by],
            team=request.team,
            run=request.run,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        out = pb.ListSpendResponse(next_page_token=token)
        for t in totals:
            row = out.totals.add(
                team=t.team, agent=t.agent, model=t.model, provider=t.provider, run=t.run,
                request_count=t.request_count, cost_nanos=t.cost_nanos,
                usage=pb.TokenUsage(
                    input_tokens=t.usage.input_tokens, output_tokens=t.usage.output_tokens,
                    cached_input_tokens=t.usage.cached_input_tokens,
                ),
            )
            if t.day is not None:
                row.day.CopyFrom(_ts(t.day))
        return out

    async def ListSpendEntries(
        self, request: pb.ListSpendEntriesRequest, context: Any
    ) -> pb.ListSpendEntriesResponse:
        entries, token = await self._svc.list_entries(
            team=request.team,
            start=_opt_dt(request, "start_time"),
            end=_opt_dt(request, "end_time"),
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListSpendEntriesResponse(entries=[spend_entry_pb(e) for e in entries], next_page_token=token)

    async def SetPrices(self, request: pb.SetPricesRequest, context: Any) -> pb.SetPricesResponse:
        version = await self._svc.set_prices(
            request_id=request.request_id,
            prices=[
                ModelPrice(p.model, p.input_per_mtok_nanos, p.output_per_mtok_nanos, p.cached_input_per_mtok_nanos)
                for p in request.prices
            ],
            remove_models=list(request.remove_models),
        )
        return pb.SetPricesResponse(version=version)

    async def ListPrices(self, request: pb.ListPricesRequest, context: Any) -> pb.ListPricesResponse:
        pl = await self._svc.list_prices(
            version=request.version, page_size=request.page_size, page_token=request.page_token)
        return pb.ListPricesResponse(
            version=pl.version,
            next_page_token=pl.next_page_token,
            create_time=_ts(pl.created_at),
            prices=[
                pb.ModelPrice(model=m, input_per_mtok_nanos=i, output_per_mtok_nanos=o, cached_input_per_mtok_nanos=c)
                for m, i, o, c in pl.prices
            ],
        )

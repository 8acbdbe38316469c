"""Operator commands on the ledger: budgets, rate limits, spend and prices."""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Iterable
from typing import Any

from igw.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from services.cli.admin_common import (
    GROUP_BY,
    WINDOWS,
    _enum_name,
    _ts,
    check_range,
)
from services.cli.output import (
    format_timestamp,
    message_to_dict,
    print_json,
    print_table,
)
from services.cli.parsing import CliError, nanos_to_dollars
from services.cli.session import Session

# --------------------------------------------------------------------------- budgets


def _budget_rows(budgets: Iterable[ledger_pb2.BudgetStatus]) -> list[tuple[str, ...]]:
    return [
        (
            b.team,
            b.agent or "*",
            _enum_name(ledger_pb2.BudgetWindow, b.window, "BUDGET_WINDOW_"),
            nanos_to_dollars(b.limit_nanos),
            nanos_to_dollars(b.soft_limit_nanos) if b.soft_limit_nanos else "-",
            nanos_to_dollars(b.spent_nanos),
            nanos_to_dollars(b.held_nanos),
            nanos_to_dollars(b.remaining_nanos),
            format_timestamp(b.window_end),
        )
        for b in budgets
    ]


BUDGET_HEADERS = ["team", "agent", "window", "limit", "soft", "spent", "held", "remaining", "resets"]


def cmd_budgets_set(args: argparse.Namespace) -> int:
    """`igw budgets set --team T [--agent A] --window W --limit $ [--soft $]`."""
    if args.soft and args.soft > args.limit:
        raise CliError("--soft must not exceed --limit")
    window = _window(args)
    session = Session(args)
    stub = ledger_pb2_grpc.LedgerAdminServiceStub(session.channel("ledger"))  # type: ignore[no-untyped-call]
    budget = stub.SetBudget(
        ledger_pb2.SetBudgetRequest(
            team=args.team,
            agent=args.agent,
            window=window,
            limit_nanos=args.limit,
            soft_limit_nanos=args.soft or 0,
            run=args.run,
        ),
        timeout=session.timeout,
    )
    if session.json:
        print_json(budget)
        return 0
    who = f"{budget.team}/{budget.agent}" if budget.agent else budget.team
    if budget.run:
        who = f"{budget.team} run {budget.run}"
    soft = f", soft {nanos_to_dollars(budget.soft_limit_nanos)}" if budget.soft_limit_nanos else ""
    window_name = _enum_name(ledger_pb2.BudgetWindow, budget.window, "BUDGET_WINDOW_")
    print(f"budget set: {who} {window_name} limit {nanos_to_dollars(budget.limit_nanos)}{soft}")
    return 0


def cmd_budgets_get(args: argparse.Namespace) -> int:
    """`igw budgets get --team T [--agent A]`."""
    session = Session(args)
    stub = ledger_pb2_grpc.LedgerServiceStub(session.channel("ledger"))  # type: ignore[no-untyped-call]
    response = stub.GetBudget(ledger_pb2.GetBudgetRequest(team=args.team, agent=args.agent), timeout=session.timeout)
    if session.json:
        print_json(response)
    else:
        print_table(BUDGET_HEADERS, _budget_rows(response.budgets), empty=f"no budget set for {args.team}")
    return 0


def _window(args: argparse.Namespace) -> Any:
    if args.run:
        if args.agent or (args.window and args.window != "total"):
            raise CliError("a run budget has no --agent and the total window")
        return ledger_pb2.BUDGET_WINDOW_TOTAL
    if not args.window:
        raise CliError("--window is required")
    return WINDOWS[args.window]


def cmd_budgets_list(args: argparse.Namespace) -> int:
    """`igw budgets list [--team T] [--runs]`: every page of ListBudgets."""
    session = Session(args)
    stub = _ledger_admin(session)
    budgets: list[Any] = []
    token = ""
    while True:
        page = stub.ListBudgets(
            ledger_pb2.ListBudgetsRequest(team=args.team, include_runs=args.runs, page_size=1000, page_token=token),
            timeout=session.timeout,
        )
        budgets.extend(page.budgets)
        token = page.next_page_token
        if not token:
            break
    if session.json:
        print_json(ledger_pb2.ListBudgetsResponse(budgets=budgets))
        return 0
    rows = [
        [b.team, b.agent or "-", b.run or "-", _enum_name(ledger_pb2.BudgetWindow, b.window, "BUDGET_WINDOW_"),
         nanos_to_dollars(b.limit_nanos), nanos_to_dollars(b.soft_limit_nanos) if b.soft_limit_nanos else "-"]
        for b in budgets
    ]
    print_table(["team", "agent", "run", "window", "limit", "soft"], rows, empty="no budgets")
    return 0


def cmd_budgets_delete(args: argparse.Namespace) -> int:
    """`igw budgets delete --team T [--agent A] [--run R] --window W`."""
    window = _window(args)
    session = Session(args)
    gone = _ledger_admin(session).DeleteBudget(
        ledger_pb2.DeleteBudgetRequest(team=args.team, agent=args.agent, run=args.run, window=window),
        timeout=session.timeout,
    )
    if session.json:
        print_json(gone)
        return 0
    print(f"budget deleted: {args.team}" + (f"/{args.agent}" if args.agent else "")
          + (f" run {args.run}" if args.run else "") + f" (limit was {nanos_to_dollars(gone.budget.limit_nanos)})")
    return 0


# --------------------------------------------------------------------------- rate limits


def cmd_limits_set(args: argparse.Namespace) -> int:
    """`igw limits set --team T [--agent A] [--rpm N] [--tpm N]`: a limit not given keeps its value."""
    if args.rpm is None and args.tpm is None:
        raise CliError("give --rpm and/or --tpm (0 clears that limit)")
    if (args.rpm or 0) < 0 or (args.tpm or 0) < 0:
        raise CliError("--rpm and --tpm must be >= 0")
    session = Session(args)
    stub = _ledger_admin(session)
    rpm, tpm = args.rpm, args.tpm
    if rpm is None or tpm is None:
        current = {r.agent: r for r in stub.GetRateLimits(
            ledger_pb2.GetRateLimitsRequest(team=args.team), timeout=session.timeout).limits}
        mine = current.get(args.agent)
        rpm = rpm if rpm is not None else (mine.requests_per_minute if mine else 0)
        tpm = tpm if tpm is not None else (mine.tokens_per_minute if mine else 0)
    limit = stub.SetRateLimit(
        ledger_pb2.SetRateLimitRequest(team=args.team, agent=args.agent, requests_per_minute=rpm,
                                       tokens_per_minute=tpm),
        timeout=session.timeout,
    )
    if session.json:
        print_json(limit)
        return 0
    who = f"{limit.team}/{limit.agent}" if limit.agent else limit.team
    if not limit.requests_per_minute and not limit.tokens_per_minute:
        print(f"rate limits cleared: {who}")
    else:
        print(f"rate limits set: {who} rpm {limit.requests_per_minute or 'none'}"
              f" tpm {limit.tokens_per_minute or 'none'}")
    return 0


def cmd_limits_get(args: argparse.Namespace) -> int:
    """`igw limits get --team T`: the team's and its agents' limits with the last minute's use."""
    session = Session(args)
    response = _ledger_admin(session).GetRateLimits(
        ledger_pb2.GetRateLimitsRequest(team=args.team), timeout=session.timeout)
    if session.json:
        print_json(response)
        return 0
    rows = [
        [r.agent or "(team)", f"{r.requests_per_minute:,}" if r.requests_per_minute else "-",
         f"{r.requests_used:,}", f"{r.tokens_per_minute:,}" if r.tokens_per_minute else "-", f"{r.tokens_used:,}"]
        for r in response.limits
    ]
    print_table(["agent", "rpm", "requests (60s)", "tpm", "tokens (60s)"], rows,
                empty=f"no rate limits for {args.team}")
    return 0


# --------------------------------------------------------------------------- spend


def _ledger_admin(session: Session) -> ledger_pb2_grpc.LedgerAdminServiceStub:
    return ledger_pb2_grpc.LedgerAdminServiceStub(session.channel("ledger"))  # type: ignore[no-untyped-call]


def cmd_spend(args: argparse.Namespace) -> int:
    """`igw spend [--by dims] [--team T] [--since ..] [--until ..]`."""
    check_range(args.since, args.until)
    session = Session(args)
    request = ledger_pb2.ListSpendRequest(
        start_time=_ts(args.since),
        end_time=_ts(args.until),
        group_by=[GROUP_BY[d] for d in args.by],
        team=args.team,
        run=args.run,
        page_size=10000,
    )
    stub = _ledger_admin(session)
    response = stub.ListSpend(request, timeout=session.timeout)
    while response.next_page_token:
        request.page_token = response.next_page_token
        more = stub.ListSpend(request, timeout=session.timeout)
        response.totals.extend(more.totals)
        response.next_page_token = more.next_page_token
    if session.json:
        print_json(response)
        return 0
    if args.run and not args.team:
        raise CliError("--run needs --team")
    dims = list(args.by)
    for d in ("agent", "run"):
        if d in dims and "team" not in dims:
            dims.insert(dims.index(d), "team")
    headers = [*dims, "requests", "input tok", "output tok", "cached tok", "cost"]
    rows: list[list[str]] = []
    totals = [0, 0, 0, 0, 0]
    for t in response.totals:
        cells = []
        for d in dims:
            cells.append(format_timestamp(t.day, date_only=True) if d == "day" else getattr(t, d) or "-")
        numbers = [t.request_count, t.usage.input_tokens, t.usage.output_tokens, t.usage.cached_input_tokens]
        totals = [a + b for a, b in zip(totals, [*numbers, t.cost_nanos], strict=True)]
        rows.append([*cells, *(f"{n:,}" for n in numbers), nanos_to_dollars(t.cost_nanos)])
    if len(rows) > 1 and dims:
        rows.append(["TOTAL", *([""] * (len(dims) - 1)), *(f"{n:,}" for n in totals[:4]), nanos_to_dollars(totals[4])])
    print_table(headers, rows, empty="no spend in this range")
    return 0


def cmd_spend_entries(args: argparse.Namespace) -> int:
    """`igw spend entries [--team T] [--limit N]`."""
    if args.limit < 1:
        raise CliError("--limit must be at least 1")
    check_range(args.since, args.until)
    session = Session(args)
    stub = _ledger_admin(session)
    entries: list[Any] = []
    token = ""
    while len(entries) < args.limit:
        page = stub.ListSpendEntries(
            ledger_pb2.ListSpendEntriesRequest(
                team=args.team,
                start_time=_ts(args.since),
                end_time=_ts(args.until),
                page_size=min(args.limit - len(entries), 1000),
                page_token=token,
            ),
            timeout=session.timeout,
        )
        entries.extend(page.entries)
        token = page.next_page_token
        if not token or not page.entries:
            break
    entries = entries[: args.limit]
    if session.json:
        print_json({"entries": [message_to_dict(e) for e in entries]})
        return 0
    rows = [
        (
            format_timestamp(e.create_time),
            e.request_id,
            e.team,
            e.agent,
            e.model,
            e.provider,
            f"{e.usage.input_tokens:,}",
            f"{e.usage.output_tokens:,}",
            nanos_to_dollars(e.cost_nanos),
            _enum_name(ledger_pb2.CallOutcome, e.outcome, "CALL_OUTCOME_"),
            ",".join(_enum_name(ledger_pb2.SpendFlag, f, "SPEND_FLAG_") for f in e.flags),
        )
        for e in entries
    ]
    print_table(
        ["time", "request", "team", "agent", "model", "provider", "in", "out", "cost", "outcome", "flags"],
        rows,
        empty="no spend entries",
    )
    return 0



# --------------------------------------------------------------------------- prices


def cmd_prices_list(args: argparse.Namespace) -> int:
    """`igw prices list [--version N]`."""
    session = Session(args)
    response = _ledger_admin(session).ListPrices(
        ledger_pb2.ListPricesRequest(version=args.version), timeout=session.timeout
    )
    if session.json:
        print_json(response)
        return 0
    rows = [
        (
            p.model,
            nanos_to_dollars(p.input_per_mtok_nanos),
            nanos_to_dollars(p.output_per_mtok_nanos),
            nanos_to_dollars(p.cached_input_per_mtok_nanos) if p.cached_input_per_mtok_nanos else "-",
        )
        for p in response.prices
    ]
    print(f"price catalogue version {response.version} ({format_timestamp(response.create_time)})")
    print_table(["model", "input $/Mtok", "output $/Mtok", "cached $/Mtok"], rows, empty="no prices")
    return 0


def cmd_prices_set(args: argparse.Namespace) -> int:
    """`igw prices set MODEL --input $ --output $ [--cached $]` (dollars per million tokens)."""
    session = Session(args)
    price = ledger_pb2.ModelPrice(
        model=args.model,
        input_per_mtok_nanos=args.input,
        output_per_mtok_nanos=args.output,
        cached_input_per_mtok_nanos=args.cached or 0,
    )
    response = _ledger_admin(session).SetPrices(
        ledger_pb2.SetPricesRequest(request_id=uuid.uuid4().hex, prices=[price]), timeout=session.timeout
    )
    if session.json:
        print_json({"version": int(response.version), "price": message_to_dict(price)})
        return 0
    cached = f", cached {nanos_to_dollars(args.cached)}" if args.cached else ""
    print(
        f"prices set for {args.model}: input {nanos_to_dollars(args.input)}, "
        f"output {nanos_to_dollars(args.output)}{cached} per 1M tokens (catalogue version {response.version})"
    )
    return 0

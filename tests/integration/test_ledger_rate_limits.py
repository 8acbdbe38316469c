"""Rate limits, run budgets and the admin verbs, in the ledger's own transaction (real Postgres)."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import grpc
import pytest

from igw.ledger.v1 import ledger_pb2 as pb
from igw.ledger.v1 import ledger_pb2_grpc
from services.common import errors as E
from services.common.errors import error_info_from_rpc_error, retry_delay_from_rpc_error
from services.common.tls import secure_channel
from services.ledger import domain as D
from services.ledger.service import LedgerService
from tests.integration.ledger_support import FakeClock, check_invariants, grpc_server, ledger_service, sql

BOUNDS = {"prompt_tokens_upper_bound": 300, "max_output_tokens": 200}


async def _reserve(svc: LedgerService, rid: str, team: str = "rt", agent: str = "a", **kw: object) -> D.ReserveResult:
    args: dict[str, object] = {"request_id": rid, "attempt": 0, "team": team, "agent": agent, "model": "fake-small",
                               **BOUNDS, **kw}
    return await svc.reserve(**args)  # type: ignore[arg-type]


async def _settle(svc: LedgerService, rid: str, res: D.ReserveResult, inp: int = 10, out: int = 10) -> None:
    await svc.settle(request_id=rid, reservation_id=str(res.hold.reservation_id), usage=D.Usage(inp, out, 0),
                     provider="p", provider_model="m")


async def test_requests_per_minute_is_exact_across_two_ledger_replicas_and_says_when_to_retry(
    fresh_database: str,
) -> None:
    clock = FakeClock()
    async with ledger_service(fresh_database, clock=clock, allow_unbudgeted=True) as one, \
            ledger_service(fresh_database, clock=clock, migrate=False, allow_unbudgeted=True) as two:
        await one.set_rate_limit(team="rt", requests_per_minute=10)
        outcomes = await asyncio.gather(
            *[_reserve(one if i % 2 else two, f"r{i}", agent=f"a{i % 3}") for i in range(20)],
            return_exceptions=True,
        )
        ok = [o for o in outcomes if isinstance(o, D.ReserveResult)]
        refused = [o for o in outcomes if not isinstance(o, D.ReserveResult)]
        assert len(ok) == 10 and len(refused) == 10
        for err in refused:
            assert isinstance(err, E.ResourceExhausted) and err.reason == "RATE_LIMITED", err
            assert err.retry_delay_s is not None and 0 < err.retry_delay_s <= 60
            assert err.metadata["requests_per_minute"] == "10"
        # The window slides: 30 s later still full, 61 s later the first admissions have left it.
        clock.advance(seconds=30)
        with pytest.raises(E.ResourceExhausted) as late:
            await _reserve(one, "late")
        assert late.value.retry_delay_s is not None and 29 <= late.value.retry_delay_s <= 31
        clock.advance(seconds=31)
        await _reserve(two, "after-window")
        [limit] = await one.get_rate_limits(team="rt")
        assert (limit.requests_per_minute, limit.requests_used) == (10, 1)
    check_invariants(fresh_database)


async def test_tokens_per_minute_counts_the_worst_case_until_settle_trues_it_up(fresh_database: str) -> None:
    async with ledger_service(fresh_database, allow_unbudgeted=True) as svc:
        await svc.set_rate_limit(team="rt", tokens_per_minute=1100)
        a = await _reserve(svc, "t1")
        await _reserve(svc, "t2")
        with pytest.raises(E.ResourceExhausted) as full:
            await _reserve(svc, "t3")  # 500 + 500 + 500 > 1100
        assert full.value.reason == "RATE_LIMITED"
        await _settle(svc, "t1", a, 10, 10)  # t1 now counts 20 tokens, not 500
        await _reserve(svc, "t3")
        [limit] = await svc.get_rate_limits(team="rt")
        assert limit.tokens_used == 20 + 500 + 500
        # A call larger than the whole limit can never pass: a clear precondition, not a retry.
        with pytest.raises(E.FailedPrecondition) as big:
            await svc.reserve(request_id="huge", attempt=0, team="rt", agent="a", model="fake-small",
                              prompt_tokens_upper_bound=2000, max_output_tokens=10)
        assert big.value.reason == "CALL_EXCEEDS_RATE_LIMIT"
    check_invariants(fresh_database)


async def test_a_released_call_stops_counting_and_a_later_attempt_replaces_the_first(fresh_database: str) -> None:
    async with ledger_service(fresh_database, allow_unbudgeted=True) as svc:
        await svc.set_rate_limit(team="rt", requests_per_minute=2)
        first = await _reserve(svc, "c1")
        await svc.reserve(request_id="c1", attempt=1, team="rt", agent="a", model="fake-small", **BOUNDS)
        await _reserve(svc, "c2")  # c1 counts once although it has two holds
        with pytest.raises(E.ResourceExhausted):
            await _reserve(svc, "c3")
        # Releasing attempt 0 late does not uncount attempt 1 (the event belongs to the newer hold).
        await svc.release(reservation_id=str(first.hold.reservation_id))
        with pytest.raises(E.ResourceExhausted):
            await _reserve(svc, "c3")
        holds = sql(fresh_database, "SELECT id FROM holds WHERE request_id = 'c1' AND attempt = 1")
        await svc.release(reservation_id=str(holds[0][0]))
        await _reserve(svc, "c3")


async def test_agent_limits_apply_next_to_the_team_limit(fresh_database: str) -> None:
    async with ledger_service(fresh_database, allow_unbudgeted=True) as svc:
        await svc.set_rate_limit(team="rt", requests_per_minute=10)
        await svc.set_rate_limit(team="rt", agent="busy", requests_per_minute=2)
        await _reserve(svc, "b1", agent="busy")
        await _reserve(svc, "b2", agent="busy")
        with pytest.raises(E.ResourceExhausted) as err:
            await _reserve(svc, "b3", agent="busy")
        assert err.value.metadata["agent"] == "busy"
        for i in range(8):
            await _reserve(svc, f"o{i}", agent="other")
        with pytest.raises(E.ResourceExhausted) as team:
            await _reserve(svc, "o9", agent="other")
        assert team.value.metadata["agent"] == ""
        limits = await svc.get_rate_limits(team="rt")
        assert [(r.agent, r.requests_per_minute, r.requests_used) for r in limits] == [("", 10, 10), ("busy", 2, 2)]
        # Both zero clears a limit.
        await svc.set_rate_limit(team="rt", agent="busy")
        assert [r.agent for r in await svc.get_rate_limits(team="rt")] == [""]


async def test_a_slice_is_granted_a_quarter_of_the_calls_the_rate_limit_has_room_for(fresh_database: str) -> None:
    async with ledger_service(fresh_database, allow_unbudgeted=True) as svc:
        await svc.set_rate_limit(team="rt", requests_per_minute=20)
        await _reserve(svc, "before")
        grants = []
        for n in range(4):  # 19, 15, 12 and 9 requests free: a quarter of each
            s = await svc.acquire_slice(slice_id=f"s{n}", team="rt", agent="a", model="fake-small", calls=10,
                                        **BOUNDS)
            grants.append(s)
        assert [g.hold.slice_calls for g in grants] == [4, 3, 3, 2]
        # 7 free: a quarter is one call, so no slice; per-call holds take the rest, exactly.
        with pytest.raises(E.FailedPrecondition) as none:
            await svc.acquire_slice(slice_id="s9", team="rt", agent="a", model="fake-small", calls=10, **BOUNDS)
        assert none.value.reason == "SLICE_NOT_GRANTED"
        for i in range(7):
            await _reserve(svc, f"r{i}")
        with pytest.raises(E.ResourceExhausted) as err:
            await _reserve(svc, "x")
        assert err.value.reason == "RATE_LIMITED"
        with pytest.raises(E.ResourceExhausted):
            await svc.acquire_slice(slice_id="s10", team="rt", agent="a", model="fake-small", calls=10, **BOUNDS)
        # Two calls of the first slice settle; it is returned: its two unused calls stop counting.
        first = grants[0]
        for rid in ("sc1", "sc2"):
            await svc.settle(request_id=rid, reservation_id=str(first.hold.reservation_id), usage=D.Usage(5, 5, 0),
                             provider="p", provider_model="m")
        await svc.release(reservation_id=str(first.hold.reservation_id))
        [limit] = await svc.get_rate_limits(team="rt")
        assert limit.requests_used == 18
        assert limit.tokens_used == 500 + 10 + 10 + (3 + 3 + 2) * 500 + 7 * 500


async def test_rate_limited_is_resource_exhausted_with_retry_info_over_grpc(fresh_database: str, pki: Path) -> None:
    async with ledger_service(fresh_database, allow_unbudgeted=True) as svc, grpc_server(svc, pki) as rt:
        await svc.set_rate_limit(team="rg", requests_per_minute=1)
        channel = secure_channel(f"127.0.0.1:{rt.port}", pki / "router.pem", pki / "router-key.pem", pki / "ca.pem")
        async with channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            req = {"attempt": 0, "team": "rg", "agent": "a", "model": "fake-small", **BOUNDS}
            await stub.Reserve(pb.ReserveRequest(request_id="g1", **req))  # type: ignore[arg-type]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Reserve(pb.ReserveRequest(request_id="g2", **req))  # type: ignore[arg-type]
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            info = error_info_from_rpc_error(err.value)
            assert info is not None and info.reason == "RATE_LIMITED"
            delay = retry_delay_from_rpc_error(err.value)
            assert delay is not None and 0 < delay <= 60


async def test_a_run_cap_is_never_exceeded_by_concurrent_agents(fresh_database: str) -> None:
    async with ledger_service(fresh_database, allow_unbudgeted=True) as one, \
            ledger_service(fresh_database, migrate=False, allow_unbudgeted=True) as two:
        await one.set_budget(team="rr", agent="", window=3, limit_nanos=10**12)
        probe = await _reserve(one, "probe", team="probe")
        unit = probe.hold.amount_nanos
        cap = unit * 7 + unit // 2  # room for 7 worst-case calls

        async def call(i: int) -> bool:
            svc = one if i % 2 else two
            rid = f"run-{i}"
            try:
                res = await _reserve(svc, rid, team="rr", agent=f"agent{i % 4}", run_id="task-1", run_cap_nanos=cap)
            except E.ResourceExhausted as err:
                assert err.reason == "BUDGET_EXCEEDED" and err.metadata["agent"] == ""
                return False
            # Every call uses its whole bound: the worst case for the cap.
            await _settle(svc, rid, res, BOUNDS["prompt_tokens_upper_bound"], BOUNDS["max_output_tokens"])
            return True

        results = await asyncio.gather(*[call(i) for i in range(32)])
        assert sum(results) == 7
        statuses = await one.get_budget(team="rr")
        assert all(not s.run for s in statuses)  # team view leaves run budgets out
    [(spent, n, limit, counter)] = sql(
        fresh_database,
        "SELECT sum(e.cost_nanos), count(*), b.limit_nanos, c.spent_nanos FROM spend_entries e"
        " JOIN budgets b ON b.team = e.team AND b.run = e.run_id JOIN budget_counters c ON c.budget_id = b.id"
        " WHERE e.run_id = 'task-1' GROUP BY b.limit_nanos, c.spent_nanos",
    )
    assert n == 7 and spent <= limit == cap and counter == spent
    check_invariants(fresh_database)


async def test_an_operator_made_run_budget_applies_and_spend_reports_by_run(fresh_database: str) -> None:
    async with ledger_service(fresh_database, allow_unbudgeted=True) as svc:
        made = await svc.set_budget(team="rr", agent="", window=0, limit_nanos=10**9, run="nightly")
        assert made.run == "nightly" and made.window is D.Window.TOTAL
        with pytest.raises(E.InvalidArgument):
            await svc.set_budget(team="rr", agent="a", window=4, limit_nanos=1, run="bad")
        res = await _reserve(svc, "n1", team="rr", run_id="nightly", run_cap_nanos=5)  # cap ignored: it exists
        assert [b.run for b in res.budgets] == ["nightly"] and res.budgets[0].limit_nanos == 10**9
        await _settle(svc, "n1", res)
        other = await _reserve(svc, "n2", team="rr", run_id="adhoc")  # no cap: reported only
        await _settle(svc, "n2", other)
        totals = await svc.list_spend(start=None, end=None, group_by=["run"], team="rr")
        assert {(t.team, t.run, t.request_count) for t in totals} == {("rr", "adhoc", 1), ("rr", "nightly", 1)}
        only = await svc.list_spend(start=None, end=None, group_by=[], team="rr", run="nightly")
        assert [t.request_count for t in only] == [1]
        entries, _ = await svc.list_entries(team="rr")
        assert {e.run_id for e in entries} == {"nightly", "adhoc"}


async def test_list_budgets_pages_and_delete_budget_removes_one(fresh_database: str) -> None:
    async with ledger_service(fresh_database, allow_unbudgeted=True) as svc:
        for team in ("b1", "b2", "b3"):
            await svc.set_budget(team=team, agent="", window=1, limit_nanos=100)
            await svc.set_budget(team=team, agent="x", window=3, limit_nanos=100)
        await svc.set_budget(team="b1", agent="", window=4, limit_nanos=100, run="r")
        seen: list[tuple[str, str, str, int]] = []
        token = ""
        while True:
            page, token = await svc.list_budgets(page_size=4, page_token=token)
            assert len(page) <= 4
            seen += [(b.team, b.run, b.agent, int(b.window)) for b in page]
            if not token:
                break
        assert seen == sorted(seen) and len(seen) == 6  # runs left out by default
        with_runs, _ = await svc.list_budgets(team="b1", include_runs=True)
        assert [b.run for b in with_runs] == ["", "", "r"]
        gone = await svc.delete_budget(team="b2", agent="x", window=3)
        assert gone.limit_nanos == 100
        with pytest.raises(E.NotFound) as nf:
            await svc.delete_budget(team="b2", agent="x", window=3)
        assert nf.value.reason == "BUDGET_NOT_FOUND"
        with pytest.raises(E.InvalidArgument):
            await svc.list_budgets(page_token="not-a-token")
        assert len((await svc.list_budgets())[0]) == 5


async def test_partitions_are_made_ahead_rows_move_out_of_default_and_retention_drops_whole_months(
    fresh_database: str,
) -> None:
    clock = FakeClock(dt.datetime(2025, 3, 10, 12, 0, tzinfo=dt.UTC))
    async with ledger_service(fresh_database, clock=clock, allow_unbudgeted=True) as svc:
        names = [r[0] for r in sql(fresh_database, "SELECT name FROM ledger_partitions() ORDER BY lo")]
        assert names == ["spend_entries_p202503", "spend_entries_p202504", "spend_entries_p202505",
                         "spend_entries_p202506"]
        res = await _reserve(svc, "p1")
        await _settle(svc, "p1", res)
        [(where,)] = sql(fresh_database, "SELECT tableoid::regclass::text FROM spend_entries WHERE request_id = 'p1'")
        assert where == "spend_entries_p202503"
        # A clock far ahead (no partition yet): the row lands in the default partition, and
        # moves into its month's partition when maintenance creates it.
        clock.t = dt.datetime(2025, 9, 2, tzinfo=dt.UTC)
        res = await _reserve(svc, "p2")
        await _settle(svc, "p2", res)
        assert sql(fresh_database, "SELECT tableoid::regclass::text FROM spend_entries WHERE request_id = 'p2'") == [
            ("spend_entries_default",)]
        m = await svc.maintain()
        assert "spend_entries_p202509" in m.created and "spend_entries_p202512" in m.created
        assert sql(fresh_database, "SELECT tableoid::regclass::text FROM spend_entries WHERE request_id = 'p2'") == [
            ("spend_entries_p202509",)]
        # The rollup is partitioned by month too; p2's hour moved with it.
        assert sql(fresh_database, "SELECT tableoid::regclass::text FROM spend_rollup_hourly"
                                   " WHERE hour >= '2025-09-01'") == [("spend_rollup_hourly_p202509",)]
        # Retention: whole months older than the cutoff go; the rollup keeps their totals.
        svc.retention_days = 90
        m = await svc.maintain()
        assert m.dropped == ["spend_entries_p202503", "spend_entries_p202504", "spend_entries_p202505"]
        assert sql(fresh_database, "SELECT count(*) FROM spend_entries WHERE request_id = 'p1'") == [(0,)]
        assert sql(fresh_database, "SELECT sum(request_count) FROM spend_rollup_hourly") == [(2,)]
        # The request id is still one entry: a replayed settle of p2 is a replay.
        again = await svc.settle(request_id="p2", reservation_id=str(res.hold.reservation_id),
                                 usage=D.Usage(10, 10, 0), provider="p", provider_model="m")
        assert again.replayed


async def test_list_spend_and_list_prices_page_through_everything(fresh_database: str) -> None:
    clock = FakeClock(dt.datetime(2025, 3, 10, 12, 30, tzinfo=dt.UTC))
    async with ledger_service(fresh_database, clock=clock, allow_unbudgeted=True) as svc:
        for i in range(7):
            res = await _reserve(svc, f"pg{i}", team=f"pt{i}")
            await _settle(svc, f"pg{i}", res)
            clock.advance(minutes=20)  # across hour boundaries: rollup hours and partial-hour edges
        everything = await svc.list_spend(start=dt.datetime(2025, 3, 10, tzinfo=dt.UTC), end=None, group_by=["team"])
        seen = []
        token = ""
        while True:
            page, token = await svc.list_spend_page(start=dt.datetime(2025, 3, 10, tzinfo=dt.UTC), end=None,
                                                    group_by=["team"], page_size=3, page_token=token)
            assert len(page) <= 3
            seen += page
            if not token:
                break
        assert seen == everything and [t.team for t in seen] == [f"pt{i}" for i in range(7)]
        assert all(t.request_count == 1 for t in seen)
        with pytest.raises(E.InvalidArgument):
            await svc.list_spend_page(start=None, end=None, group_by=[], page_token="garbage")
        full = await svc.list_prices()
        models: list[str] = []
        token = ""
        while True:
            pl = await svc.list_prices(page_size=2, page_token=token)
            models += [p[0] for p in pl.prices]
            token = pl.next_page_token
            if not token:
                break
        assert models == [p[0] for p in full.prices] and len(models) > 2


async def test_limits_show_in_metrics_on_every_replica(fresh_database: str) -> None:
    async with ledger_service(fresh_database, allow_unbudgeted=True) as one, \
            ledger_service(fresh_database, migrate=False, allow_unbudgeted=True) as two:
        await one.set_rate_limit(team="mt", agent="x", requests_per_minute=7, tokens_per_minute=900)
        await two.maintain()  # the other replica learns the limits on its maintenance tick
        for svc in (one, two):
            assert svc.metrics.rpm_limit.labels("mt", "x")._value.get() == 7
            assert svc.metrics.tpm_limit.labels("mt", "x")._value.get() == 900
        await one.set_rate_limit(team="mt", requests_per_minute=1)
        await _reserve(one, "m1", team="mt", agent="y")
        with pytest.raises(E.ResourceExhausted):
            await _reserve(one, "m2", team="mt", agent="y")
        assert one.metrics.rate_limited.labels("mt", "requests")._value.get() == 1

"""The router at the default settings (budget slices on, adaptive) against a real ledger: a team
driven to its limit is served exactly as many calls as per-call holds would serve it, one call
at a time and many at once, and is never overspent."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from services.common import errors as E
from services.router.routing import parse_config
from tests.integration.ledger_support import check_invariants, sql
from tests.integration.test_router_attempt_cleanup import BASE_URL
from tests.integration.test_router_slices import TEAM, _Adapter, _agent, _held_spent, _request, _router, adapter

__all__ = ["adapter"]  # the fixture, shared

DEFAULTS = f"""
providers:
  p: {{type: openai, base_url: "{BASE_URL}", local: true}}
deployments:
  d: {{provider: p, model: fake-small, price: fake-small}}
models:
  m: {{candidates: [d]}}
retries: {{max_attempts: 1}}
breaker: {{failure_threshold: 1000}}
"""
SLICES = DEFAULTS  # adaptive slices are the default (even one caller calling back to back)
# A caller calling back to back (one call in flight) keeps per-call holds.
ONE_IN_FLIGHT_PER_CALL = DEFAULTS + "budget_slices: {busy_in_flight: 2}\n"
PER_CALL = DEFAULTS + "budget_slices: {enabled: false}\n"  # per-call holds, a configuration choice
PER_CALL_TEAM = DEFAULTS + f"budget_slices: {{per_call_teams: [{TEAM}]}}\n"


async def _drive(
    database: str, pki: Path, adapter: _Adapter, config: str, concurrent: bool, sliced: bool,
) -> tuple[int, int]:
    """Drives TEAM to a limit of 40.5 calls; returns (calls served, calls refused for budget)."""
    adapter.full = True  # each call costs exactly its hold
    async with _router(database, pki, adapter) as (router, svc, _spy):
        probe = await router.generate(_agent("plain"), _request("probe"), 10.0)
        unit = probe.cost_nanos
        router.apply_config(parse_config(config.encode()))
        await svc.set_budget(team=TEAM, agent="", window=4, limit_nanos=unit * 81 // 2)

        async def one(i: int) -> bool:
            try:
                answer = await router.generate(_agent(), _request(f"lim-{i}"), 10.0)
            except E.IgwError as err:
                assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.reason == "BUDGET_EXCEEDED"
                return False
            assert answer.cost_nanos == unit
            return True

        if concurrent:
            results = await asyncio.gather(*(one(i) for i in range(60)))
        else:
            results = [await one(i) for i in range(60)]
        if sliced:
            assert router.metrics.slice_draws._value.get() >= 20  # far from the limit, drawn from slices
        else:
            assert router.metrics.slice_draws._value.get() == 0
        await router.drain(10)
    served = sum(results)
    assert _held_spent(database, TEAM) == (0, served * unit)
    entries = sql(database, "SELECT count(*), count(DISTINCT request_id) FROM spend_entries WHERE team = %s", (TEAM,))
    assert entries == [(served, served)]
    check_invariants(database)
    return served, len(results) - served


@pytest.mark.parametrize(("config", "concurrent"), [(SLICES, False), (SLICES, True)],
                         ids=["one-at-a-time", "sixty-at-once"])
async def test_with_adaptive_slices_a_team_is_refused_exactly_where_per_call_holds_refuse_it(
    fresh_database: str, pki: Path, adapter: _Adapter, config: str, concurrent: bool,
) -> None:
    assert parse_config(config.encode()).budget_slices.applies(TEAM)
    assert await _drive(fresh_database, pki, adapter, config, concurrent, sliced=True) == (40, 20)


async def test_with_busy_in_flight_2_one_caller_calling_back_to_back_takes_per_call_holds(
    fresh_database: str, pki: Path, adapter: _Adapter,
) -> None:
    # Busy by call count (60 calls in a few seconds) but one call in flight: no slice.
    assert parse_config(ONE_IN_FLIGHT_PER_CALL.encode()).budget_slices.applies(TEAM)
    assert await _drive(fresh_database, pki, adapter, ONE_IN_FLIGHT_PER_CALL, False, sliced=False) == (40, 20)


@pytest.mark.parametrize("config", [PER_CALL, PER_CALL_TEAM], ids=["disabled", "per_call_teams"])
async def test_per_call_holds_remain_a_configuration_choice(
    fresh_database: str, pki: Path, adapter: _Adapter, config: str,
) -> None:
    assert not parse_config(config.encode()).budget_slices.applies(TEAM)
    assert await _drive(fresh_database, pki, adapter, config, True, sliced=False) == (40, 20)


async def test_only_a_busy_key_leases_a_slice_so_a_lowered_budget_refuses_an_occasional_call_at_once(
    fresh_database: str, pki: Path, adapter: _Adapter,
) -> None:
    clock = [1000.0]  # the slice book's clock: how busy a key is
    async with _router(fresh_database, pki, adapter) as (router, svc, spy):
        router.slices._clock = lambda: clock[0]
        router.apply_config(parse_config(SLICES.encode()))
        for i in range(5):  # the 4th call within 5 s makes the key busy: a slice from then on
            await router.generate(_agent(), _request(f"busy-{i}"), 10.0)
        assert (spy.reserves, router.metrics.slice_draws._value.get()) == (3, 2)
        await router.drain(10)  # the slice goes back
        for i in range(2):  # occasional calls, seconds apart: per-call holds
            clock[0] += 6.0
            await router.generate(_agent(), _request(f"lone-{i}"), 10.0)
        assert (spy.reserves, router.metrics.slice_draws._value.get()) == (5, 2)
        # The operator lowers the budget to less than one more call: the next call is refused at once.
        await router.drain(10)
        await svc.set_budget(team=TEAM, agent="", window=4, limit_nanos=_held_spent(fresh_database, TEAM)[1] + 1)
        clock[0] += 6.0
        with pytest.raises(E.IgwError) as err:
            await router.generate(_agent(), _request("lone-2"), 10.0)
        assert err.value.reason == "BUDGET_EXCEEDED"
        await router.drain(10)
    assert _held_spent(fresh_database, TEAM)[0] == 0
    check_invariants(fresh_database)


@pytest.mark.parametrize("config", [SLICES, PER_CALL], ids=["defaults", "per-call"])
async def test_a_limit_lowered_under_open_slices_refuses_a_lone_caller_where_per_call_holds_do(
    fresh_database: str, pki: Path, adapter: _Adapter, config: str,
) -> None:
    # Far from the limit a busy key draws from a slice; the operator then lowers the limit to the
    # spend so far plus 5.5 calls while that slice is still open, and one caller calls one at a
    # time (which, at the defaults, draws from the open slice). The first draw note after the
    # lowering says the team is over its limit: the router gives the slice back, and the calls
    # after take exact per-call holds. Both configurations serve the same 5 calls, never overspend.
    adapter.full = True  # each call costs exactly its hold
    async with _router(fresh_database, pki, adapter) as (router, svc, _spy):
        router.apply_config(parse_config(config.encode()))
        unit = (await router.generate(_agent(), _request("probe"), 10.0)).cost_nanos
        await asyncio.gather(*(router.generate(_agent(), _request(f"far-{i}"), 10.0) for i in range(8)))
        sliced = router.metrics.slice_draws._value.get()
        assert sliced > 0 if config is SLICES else sliced == 0
        await router.settler.drain(10)
        spent = _held_spent(fresh_database, TEAM)[1]
        assert spent == 9 * unit
        limit = spent + unit * 11 // 2
        await svc.set_budget(team=TEAM, agent="", window=4, limit_nanos=limit)
        served = refused = 0
        for i in range(9):
            try:
                await router.generate(_agent(), _request(f"near-{i}"), 10.0)
                served += 1
            except E.IgwError as err:
                assert err.reason == "BUDGET_EXCEEDED"
                refused += 1
            await router.settler.drain(10)  # each settle lands before the next call asks
        await router.drain(10)
        held, spent_after = _held_spent(fresh_database, TEAM)
    assert (served, refused) == (5, 4)
    assert held == 0 and spent_after == spent + 5 * unit <= limit
    if config is SLICES:
        assert router.metrics.slices.labels("returned_over_limit")._value.get() >= 1
    check_invariants(fresh_database)

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
PER_CALL = DEFAULTS + "budget_slices: {enabled: false}\n"


async def _drive(database: str, pki: Path, adapter: _Adapter, config: str, concurrent: bool) -> tuple[int, int]:
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
        if config is DEFAULTS:
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


@pytest.mark.parametrize("concurrent", [False, True], ids=["one-at-a-time", "sixty-at-once"])
async def test_at_the_defaults_a_team_is_refused_exactly_where_per_call_holds_refuse_it(
    fresh_database: str, pki: Path, adapter: _Adapter, concurrent: bool,
) -> None:
    assert parse_config(DEFAULTS.encode()).budget_slices.applies(TEAM)  # slices are the default
    assert await _drive(fresh_database, pki, adapter, DEFAULTS, concurrent) == (40, 20)


async def test_per_call_holds_remain_a_configuration_choice(fresh_database: str, pki: Path, adapter: _Adapter) -> None:
    assert not parse_config(PER_CALL.encode()).budget_slices.applies(TEAM)
    assert await _drive(fresh_database, pki, adapter, PER_CALL, False) == (40, 20)

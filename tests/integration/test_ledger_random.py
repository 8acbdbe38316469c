# ruff: noqa: B023  (each closure is awaited within the loop iteration that defines it)
"""A seeded randomised run of reserve / settle / release / expire across many teams, with
every database connection killed several times midway. Afterwards the invariants hold."""

from __future__ import annotations

import asyncio
import datetime as dt
import random

from sqlalchemy.engine import make_url

from services.common import errors as E
from services.ledger import domain as D
from tests.integration.ledger_support import FakeClock, check_invariants, ledger_service, sql

TEAMS = 12
REQUESTS = 1500
WORKERS = 16


async def test_random_operations_with_killed_connections_never_overspend(fresh_database: str, pg) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(20250310)
    clock = FakeClock()
    dbname = make_url(fresh_database).database
    statuses: list[D.BudgetStatus] = []
    counts = {"killed": 0, "ok": 0, "denied": 0, "unavailable": 0, "settled": 0, "released": 0}
    async with ledger_service(fresh_database, clock=clock, pool_size=10) as svc:
        for t in range(TEAMS):
            await svc.set_budget(team=f"team{t}", agent="", window=rng.choice([1, 2, 3, 4]),
                                 limit_nanos=rng.randint(2, 40) * 1_000_000)
            if t % 3 == 0:
                await svc.set_budget(team=f"team{t}", agent="a1", window=4, limit_nanos=rng.randint(1, 10) * 1_000_000)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(REQUESTS):
            queue.put_nowait(i)

        async def retrying(fn):  # type: ignore[no-untyped-def]
            for _ in range(20):
                try:
                    return await fn()
                except E.Unavailable:
                    counts["unavailable"] += 1
                    await asyncio.sleep(0.02)
            raise AssertionError("database never came back")

        async def worker(seed: int) -> None:
            wrng = random.Random(seed)
            while not queue.empty():
                i = queue.get_nowait()
                team = f"team{wrng.randrange(TEAMS)}"
                agent = wrng.choice(["a1", "a2"])
                prompt, out = wrng.randint(0, 4000), wrng.randint(1, 4000)

                async def reserve() -> D.ReserveResult | None:
                    try:
                        return await svc.reserve(
                            request_id=f"req{i}", attempt=0, team=team, agent=agent,
                            model=wrng.choice(["fake-small", "gpt-4o-mini"]),
                            prompt_tokens_upper_bound=prompt, max_output_tokens=out,
                            hold_ttl=dt.timedelta(seconds=wrng.choice([5, 60, 300])),
                        )
                    except E.ResourceExhausted:
                        return None

                res = await retrying(reserve)
                if res is None:
                    counts["denied"] += 1
                    continue
                counts["ok"] += 1
                statuses.extend(res.budgets)
                action = wrng.random()
                usage = D.Usage(wrng.randint(0, prompt), wrng.randint(0, out), 0)
                for _ in range(wrng.choice([1, 1, 2])):  # sometimes the router retries
                    if action < 0.6:
                        async def settle() -> D.SettleResult:
                            return await svc.settle(request_id=f"req{i}", reservation_id=str(res.hold.reservation_id),
                                                    usage=usage, provider="fake", provider_model="m")
                        await retrying(settle)
                        counts["settled"] += 1
                    elif action < 0.85:
                        async def release() -> bool:
                            return await svc.release(reservation_id=str(res.hold.reservation_id))
                        await retrying(release)
                        counts["released"] += 1
                    # else: left to expire

        async def chaos() -> None:
            for _ in range(6):
                await asyncio.sleep(0.15)
                counts["killed"] += await asyncio.to_thread(pg.terminate_connections, dbname)
                clock.advance(seconds=20)
                try:
                    await svc.sweep_once()
                except E.Unavailable:
                    counts["unavailable"] += 1

        await asyncio.gather(chaos(), *[worker(s) for s in range(WORKERS)])
        clock.advance(hours=1)
        await svc.sweep_once()

    # Connections were really killed mid-run; the one reconnect-retry usually hides it.
    assert counts["ok"] > 100 and counts["denied"] > 0 and counts["killed"] > 0, counts
    for s in statuses:
        assert s.spent_nanos + s.held_nanos <= s.limit_nanos, s
    assert sql(fresh_database, "SELECT count(*) FROM holds WHERE state = 'OPEN'") == [(0,)]
    check_invariants(fresh_database)

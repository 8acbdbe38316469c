"""SetBudget and SetPrices: bad amounts are refused and write nothing; price versions are
recorded, new holds use the new prices, open holds settle at the version that reserved them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from igw.ledger.v1 import ledger_pb2 as pb
from igw.ledger.v1 import ledger_pb2_grpc
from services.common import errors as E
from services.common.tls import secure_channel
from services.ledger import domain as D
from services.ledger.pricing import MAX_VALUE, ModelPrice
from tests.integration.ledger_support import check_invariants, grpc_server, ledger_service, sql

# 2**62 is the largest amount the ledger accepts; 2**63 no longer fits a Postgres BIGINT.
BAD_AMOUNTS = [-1, MAX_VALUE + 1, 2**63]
HOLD = 500_000  # fake-small at version 1, 1000 in + 1000 out


def _budgets(url: str) -> list[tuple[Any, ...]]:
    return sql(url, 'SELECT team, agent, "window", limit_nanos, soft_limit_nanos, updated_at FROM budgets'
                    " ORDER BY id") + sql(url, "SELECT name FROM teams ORDER BY name")


def _catalogue(url: str) -> list[tuple[Any, ...]]:
    return sql(url, "SELECT version, model, input_per_mtok_nanos, output_per_mtok_nanos,"
                    " cached_input_per_mtok_nanos FROM prices ORDER BY version, model") + sql(
        url, "SELECT version, request_id FROM price_versions ORDER BY version")


@pytest.mark.parametrize("amount", BAD_AMOUNTS)
@pytest.mark.parametrize("field", ["limit_nanos", "soft_limit_nanos"])
async def test_set_budget_refuses_a_bad_amount_and_changes_nothing(fresh_database: str, field: str,
                                                                   amount: int) -> None:
    async with ledger_service(fresh_database) as svc:
        await svc.set_budget(team="t", agent="", window=1, limit_nanos=10**9, soft_limit_nanos=10**8)
        before = _budgets(fresh_database)
        for team in ("t", "new-team"):
            kw = {"limit_nanos": 10**9, "soft_limit_nanos": 0, field: amount}
            with pytest.raises(E.InvalidArgument) as err:
                await svc.set_budget(team=team, agent="", window=1, **kw)
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.reason == "INVALID_AMOUNT" and err.value.metadata["field"] == field
        assert _budgets(fresh_database) == before


async def test_set_budget_accepts_the_largest_amount(fresh_database: str) -> None:
    async with ledger_service(fresh_database) as svc:
        out = await svc.set_budget(team="t", agent="", window=4, limit_nanos=MAX_VALUE, soft_limit_nanos=MAX_VALUE)
        assert (out.limit_nanos, out.soft_limit_nanos) == (MAX_VALUE, MAX_VALUE)
        [status] = await svc.get_budget(team="t")
        assert status.remaining_nanos == MAX_VALUE


@pytest.mark.parametrize("amount", BAD_AMOUNTS)
@pytest.mark.parametrize("field", ["input_per_mtok", "output_per_mtok", "cached_input_per_mtok"])
async def test_set_prices_refuses_a_bad_amount_and_changes_nothing(fresh_database: str, field: str,
                                                                   amount: int) -> None:
    async with ledger_service(fresh_database) as svc:
        before = _catalogue(fresh_database)
        good = {"input_per_mtok": 1, "output_per_mtok": 2, "cached_input_per_mtok": 0}
        prices = [ModelPrice("fine-model", 1, 2), ModelPrice("bad-model", **{**good, field: amount})]
        with pytest.raises(E.InvalidArgument) as err:
            await svc.set_prices(request_id="p1", prices=prices, remove_models=[])
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.reason == "INVALID_AMOUNT" and err.value.metadata["field"] == f"{field}_nanos"
        assert _catalogue(fresh_database) == before
        assert (await svc.list_prices()).version == 1
        # The request id was not used up by the refused call.
        assert await svc.set_prices(request_id="p1", prices=[ModelPrice("fine-model", 1, 2)], remove_models=[]) == 2


async def test_set_prices_accepts_the_largest_amount(fresh_database: str) -> None:
    async with ledger_service(fresh_database) as svc:
        version = await svc.set_prices(request_id="p1", prices=[ModelPrice("dear", MAX_VALUE, MAX_VALUE, MAX_VALUE)],
                                       remove_models=[])
        assert ("dear", MAX_VALUE, MAX_VALUE, MAX_VALUE) in (await svc.list_prices(version=version)).prices


@pytest.mark.parametrize("amount", [-1, MAX_VALUE + 1])
async def test_grpc_set_budget_and_set_prices_refuse_bad_amounts(fresh_database: str, pki: Path,
                                                                 amount: int) -> None:
    async with ledger_service(fresh_database) as svc, grpc_server(svc, pki) as rt:
        before = (_budgets(fresh_database), _catalogue(fresh_database))
        channel = secure_channel(f"127.0.0.1:{rt.port}", pki / "operator-admin.pem", pki / "operator-admin-key.pem",
                                 pki / "ca.pem")
        async with channel:
            admin = ledger_pb2_grpc.LedgerAdminServiceStub(channel)
            calls = [
                admin.SetBudget(pb.SetBudgetRequest(team="t", window=pb.BUDGET_WINDOW_DAILY, limit_nanos=amount)),
                admin.SetPrices(pb.SetPricesRequest(request_id="p1", prices=[
                    pb.ModelPrice(model="m", input_per_mtok_nanos=amount, output_per_mtok_nanos=1)])),
            ]
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                info = E.error_info_from_rpc_error(err.value)
                assert info is not None and info.reason == "INVALID_AMOUNT"
        assert (_budgets(fresh_database), _catalogue(fresh_database)) == before


async def test_new_prices_apply_to_new_holds_and_open_holds_settle_at_their_version(fresh_database: str) -> None:
    async with ledger_service(fresh_database) as svc:
        await svc.set_budget(team="t", agent="", window=4, limit_nanos=10**12)
        kw: dict[str, Any] = dict(attempt=0, team="t", agent="a", model="fake-small",
                                  prompt_tokens_upper_bound=1000, max_output_tokens=1000)
        old = await svc.reserve(request_id="old", **kw)
        assert (old.hold.price_version, old.hold.amount_nanos) == (1, HOLD)
        # fake-small doubles: $0.20 in / $0.80 out per Mtok.
        v2 = await svc.set_prices(request_id="p2", prices=[ModelPrice("fake-small", 200_000_000, 800_000_000)],
                                  remove_models=[])
        assert v2 == 2
        new = await svc.reserve(request_id="new", **kw)
        assert (new.hold.price_version, new.hold.amount_nanos) == (2, 2 * HOLD)
        usage = D.Usage(800, 300, 0)
        settle_kw: dict[str, Any] = dict(usage=usage, provider="fake", provider_model="fake-small-v1")
        # The hold reserved before the change settles at the version that priced its hold.
        old_entry = (await svc.settle(request_id="old", reservation_id=str(old.hold.reservation_id),
                                      **settle_kw)).entry
        assert (old_entry.price_version, old_entry.cost_nanos) == (1, 80_000 + 120_000)
        new_entry = (await svc.settle(request_id="new", reservation_id=str(new.hold.reservation_id),
                                      **settle_kw)).entry
        assert (new_entry.price_version, new_entry.cost_nanos) == (2, 160_000 + 240_000)
        # Removed from the catalogue: refused, never free; a hold reserved before still settles.
        pending = await svc.reserve(request_id="pending", **kw)
        v3 = await svc.set_prices(request_id="p3", prices=[], remove_models=["fake-small"])
        with pytest.raises(E.FailedPrecondition) as err:
            await svc.reserve(request_id="refused", **kw)
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert err.value.reason == "MODEL_NOT_PRICED"
        assert err.value.metadata == {"model": "fake-small", "price_version": str(v3)}
        done = await svc.settle(request_id="pending", reservation_id=str(pending.hold.reservation_id), **settle_kw)
        assert (done.entry.price_version, done.entry.cost_nanos) == (2, 400_000)
        entries, _ = await svc.list_entries(team="t")
        assert {e.request_id: e.price_version for e in entries} == {"old": 1, "new": 2, "pending": 2}
    assert sql(fresh_database, "SELECT request_id, price_version FROM spend_entries ORDER BY id") == [
        ("old", 1), ("new", 2), ("pending", 2)
    ]
    assert sql(fresh_database, "SELECT count(*) FROM holds WHERE request_id = 'refused'") == [(0,)]
    check_invariants(fresh_database)


async def test_grpc_list_spend_refuses_an_unknown_group_by_value_naming_the_field(
    fresh_database: str, pki: Path
) -> None:
    async with ledger_service(fresh_database) as svc, grpc_server(svc, pki) as rt:
        channel = secure_channel(f"127.0.0.1:{rt.port}", pki / "operator-admin.pem", pki / "operator-admin-key.pem",
                                 pki / "ca.pem")
        async with channel:
            admin = ledger_pb2_grpc.LedgerAdminServiceStub(channel)
            await admin.ListSpend(pb.ListSpendRequest(group_by=[pb.SPEND_GROUP_BY_TEAM]))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await admin.ListSpend(pb.ListSpendRequest(group_by=[pb.SPEND_GROUP_BY_TEAM, 77]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = E.error_info_from_rpc_error(err.value)
    assert info is not None and info.reason == "UNKNOWN_ENUM_VALUE" and info.metadata["field"] == "group_by"

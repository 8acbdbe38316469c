"""SettleBatch: many settles in one round trip, each exactly as Settle would do it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from igw.ledger.v1 import ledger_pb2 as pb
from igw.ledger.v1 import ledger_pb2_grpc
from services.common.errors import error_info_from_rpc_error
from services.common.tls import secure_channel
from tests.integration.ledger_support import check_invariants, grpc_server, ledger_service, sql


def _settle(rid: str, reservation: str, out: int = 10) -> pb.SettleRequest:
    return pb.SettleRequest(request_id=rid, reservation_id=reservation,
                            usage=pb.TokenUsage(input_tokens=100, output_tokens=out),
                            provider="p", provider_model="m")


async def test_a_batch_settles_each_item_independently_and_exactly_once(fresh_database: str, pki: Path) -> None:
    async with ledger_service(fresh_database) as svc, grpc_server(svc, pki) as rt:
        await svc.set_budget(team="bt", agent="", window=4, limit_nanos=10**12)
        channel = secure_channel(f"127.0.0.1:{rt.port}", pki / "router.pem", pki / "router-key.pem", pki / "ca.pem")
        async with channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            holds = []
            for i in range(5):
                holds.append(await stub.Reserve(pb.ReserveRequest(
                    request_id=f"b{i}", attempt=1, team="bt", agent="a", model="fake-small",
                    prompt_tokens_upper_bound=1000, max_output_tokens=1000)))
            first = await stub.Settle(_settle("b0", holds[0].reservation_id))
            batch = pb.SettleBatchRequest(settles=[
                _settle("b0", holds[0].reservation_id),          # a replay of a settled one
                _settle("b1", holds[1].reservation_id),
                _settle("b2", holds[2].reservation_id),
                _settle("b1", holds[1].reservation_id),          # a duplicate inside the batch
                _settle("b3", holds[3].reservation_id, out=99),
                _settle("b4", "00000000-0000-0000-0000-000000000000"),  # no such hold
            ])
            resp, again = await asyncio.gather(stub.SettleBatch(batch), stub.SettleBatch(batch))
            for r in (resp, again):
                assert len(r.results) == 6
                assert r.results[0].code == 0 and r.results[0].response.replayed
                assert r.results[0].response.entry.cost_nanos == first.entry.cost_nanos
                assert r.results[1].code == 0 and r.results[2].code == 0 and r.results[3].code == 0
                assert r.results[4].code == 0
                assert r.results[5].code == grpc.StatusCode.NOT_FOUND.value[0]
                assert r.results[5].reason == "RESERVATION_NOT_FOUND"
            # A different payload under a settled request id is refused, the rest still lands.
            mixed = pb.SettleBatchRequest(settles=[_settle("b3", holds[3].reservation_id, out=5),
                                                   _settle("b4", holds[4].reservation_id)])
            res = await stub.SettleBatch(mixed)
            assert res.results[0].reason == "IDEMPOTENCY_MISMATCH" and res.results[0].code != 0
            assert res.results[1].code == 0
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.SettleBatch(pb.SettleBatchRequest())
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error_info_from_rpc_error(err.value).reason == "INVALID_BATCH"
    rows = sql(fresh_database, "SELECT request_id, count(*) FROM spend_entries GROUP BY 1 ORDER BY 1")
    assert rows == [(f"b{i}", 1) for i in range(5)]
    check_invariants(fresh_database)


async def test_a_batch_settles_by_request_id_alone_like_settle(fresh_database: str, pki: Path) -> None:
    async with ledger_service(fresh_database, allow_unbudgeted=True) as svc, grpc_server(svc, pki) as rt:
        channel = secure_channel(f"127.0.0.1:{rt.port}", pki / "router.pem", pki / "router-key.pem", pki / "ca.pem")
        async with channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            holds = [await stub.Reserve(pb.ReserveRequest(
                request_id="q", attempt=attempt, team="bt", agent="a", model="fake-small",
                prompt_tokens_upper_bound=1000, max_output_tokens=1000)) for attempt in (0, 1)]
            batch = pb.SettleBatchRequest(settles=[
                _settle("q", ""),            # the latest open attempt (1)
                _settle("q", ""),            # a duplicate inside the batch
                _settle("nothing", ""),      # no hold at all
            ])
            resp = await stub.SettleBatch(batch)
            assert [r.code for r in resp.results[:2]] == [0, 0]
            assert sorted(r.response.replayed for r in resp.results[:2]) == [False, True]
            assert resp.results[2].code == grpc.StatusCode.NOT_FOUND.value[0]
            assert resp.results[2].reason == "OPEN_HOLD_NOT_FOUND"
            replay = await stub.SettleBatch(pb.SettleBatchRequest(settles=[
                _settle("q", ""), _settle("q", holds[1].reservation_id), _settle("q", "", out=11)]))
            assert [r.code for r in replay.results[:2]] == [0, 0]
            assert all(r.response.replayed for r in replay.results[:2])
            assert replay.results[2].reason == "IDEMPOTENCY_MISMATCH"
            # The plain Settle RPC takes the same path.
            single = await stub.Settle(_settle("q", ""))
            assert single.replayed and single.entry.cost_nanos == resp.results[0].response.entry.cost_nanos
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Settle(_settle("nothing", ""))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert error_info_from_rpc_error(err.value).reason == "OPEN_HOLD_NOT_FOUND"
    assert sql(fresh_database, "SELECT request_id, reservation_id::text FROM spend_entries") == [
        ("q", holds[1].reservation_id)
    ]
    check_invariants(fresh_database)


async def test_a_batch_commits_once_and_crossed_batches_never_deadlock(fresh_database: str, pki: Path) -> None:
    """Group commit: a batch's entries share one transaction; batches whose items arrive in
    opposite orders (two routers settling the same teams) lock in one order, so none waits for
    the deadlock detector and every settle lands exactly once."""
    teams = [f"t{i}" for i in range(6)]
    async with ledger_service(fresh_database) as svc, grpc_server(svc, pki) as rt:
        for team in teams:
            await svc.set_budget(team=team, agent="", window=4, limit_nanos=10**12)
            await svc.set_budget(team=team, agent="a1", window=1, limit_nanos=10**12)
        channel = secure_channel(f"127.0.0.1:{rt.port}", pki / "router.pem", pki / "router-key.pem", pki / "ca.pem")
        async with channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            settles: list[pb.SettleRequest] = []
            for i in range(120):
                team, agent = teams[i % len(teams)], ("a1", "a2")[i % 4 // 2]
                hold = await stub.Reserve(pb.ReserveRequest(
                    request_id=f"x{i}", attempt=1, team=team, agent=agent, model="fake-small",
                    prompt_tokens_upper_bound=1000, max_output_tokens=1000))
                settles.append(_settle(f"x{i}", hold.reservation_id, out=i + 1))
            deadlocks = sql(fresh_database, "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
            # Each round: two batches over the same holds in opposite orders, at the same time.
            rounds = [settles[k:k + 30] for k in range(0, 120, 30)]
            results = await asyncio.gather(*(
                stub.SettleBatch(pb.SettleBatchRequest(settles=batch if j == 0 else batch[::-1]))
                for batch in rounds for j in (0, 1)
            ))
            for res in results:
                assert [r.code for r in res.results] == [0] * 30
            for k, batch in enumerate(rounds):
                fresh = [r.response.replayed for r in results[2 * k].results] + \
                        [r.response.replayed for r in results[2 * k + 1].results]
                assert fresh.count(False) == 30  # each settle landed once, the other was its replay
                ids = [s.request_id for s in batch]
                # One transaction wrote every entry of a batch (they share xmin).
                writers = sql(fresh_database, "SELECT count(DISTINCT xmin::text) FROM spend_entries"
                                              " WHERE request_id = ANY(%s)", (ids,))
                assert writers == [(1,)]
    assert sql(fresh_database, "SELECT count(*), count(DISTINCT request_id) FROM spend_entries") == [(120, 120)]
    # pg_stat counters are flushed lazily; a deadlock would also have shown as a slow or failed batch.
    after = sql(fresh_database, "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
    assert after == deadlocks
    check_invariants(fresh_database)


async def test_batches_of_one_racing_batches_of_many_settle_once_and_charge_the_same(
    fresh_database: str, pki: Path,
) -> None:
    """A batch of one (ledger 0011: no sorting, the same lock order) settles exactly as the same
    item inside a larger batch: racing each other over one team's holds, every settle lands once,
    none deadlocks, each entry's cost is the same whichever batch wrote it, the counters agree."""
    async with ledger_service(fresh_database) as svc, grpc_server(svc, pki) as rt:
        await svc.set_budget(team="one", agent="", window=4, limit_nanos=10**12)
        await svc.set_budget(team="one", agent="a1", window=1, limit_nanos=10**12)
        channel = secure_channel(f"127.0.0.1:{rt.port}", pki / "router.pem", pki / "router-key.pem", pki / "ca.pem")
        async with channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            settles: list[pb.SettleRequest] = []
            for i in range(40):
                hold = await stub.Reserve(pb.ReserveRequest(
                    request_id=f"o{i}", attempt=1, team="one", agent=("a1", "a2")[i % 2], model="fake-small",
                    prompt_tokens_upper_bound=1000, max_output_tokens=1000))
                # Half by reservation id, half by request id alone (the latest open attempt).
                settles.append(_settle(f"o{i}", hold.reservation_id if i % 4 < 2 else "", out=i + 1))
            deadlocks = sql(fresh_database, "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
            singles = [stub.SettleBatch(pb.SettleBatchRequest(settles=[s])) for s in settles]
            many = [stub.SettleBatch(pb.SettleBatchRequest(settles=settles[k:k + 10][::-1])) for k in range(0, 40, 10)]
            results = await asyncio.gather(*singles, *many)
            one = [r.results[0] for r in results[:40]]
            grouped = [item for r in results[40:] for item in r.results[::-1]]
            assert [r.code for r in one] == [0] * 40 and [r.code for r in grouped] == [0] * 40
            for a, b in zip(one, grouped, strict=True):
                assert sorted([a.response.replayed, b.response.replayed]) == [False, True]
                assert a.response.entry.cost_nanos == b.response.entry.cost_nanos > 0
                assert a.response.entry == b.response.entry
            # A lone settle after the fact is a replay with the same charge; one with no hold is refused.
            again = await stub.SettleBatch(pb.SettleBatchRequest(settles=[settles[7]]))
            assert again.results[0].response.replayed
            assert again.results[0].response.entry.cost_nanos == one[7].response.entry.cost_nanos
            missing = await stub.SettleBatch(pb.SettleBatchRequest(settles=[_settle("nobody", "")]))
            assert missing.results[0].reason == "OPEN_HOLD_NOT_FOUND"
            unknown = await stub.SettleBatch(pb.SettleBatchRequest(
                settles=[_settle("nobody", "00000000-0000-0000-0000-000000000000")]))
            assert unknown.results[0].reason == "RESERVATION_NOT_FOUND"
    assert sql(fresh_database, "SELECT count(*), count(DISTINCT request_id) FROM spend_entries") == [(40, 40)]
    assert sql(fresh_database, "SELECT count(*) FROM holds WHERE state = 'OPEN'") == [(0,)]
    after = sql(fresh_database, "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
    assert after == deadlocks
    check_invariants(fresh_database)


async def test_a_batch_the_database_refuses_is_settled_item_by_item(
    fresh_database: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An unexpected database error in the batch call (not a conflict, not an outage) does not
    fail every settle in it: each is retried alone and gets its own outcome."""
    import psycopg

    from services.ledger import domain as D

    async with ledger_service(fresh_database, allow_unbudgeted=True) as svc:
        holds = [await svc.reserve(request_id=f"f{i}", attempt=1, team="ft", agent="a", model="fake-small",
                                   prompt_tokens_upper_bound=100, max_output_tokens=100) for i in range(3)]

        async def refuse(*_: object) -> None:
            raise psycopg.errors.DataError("simulated")

        monkeypatch.setattr(svc.repo, "settle_batch", refuse)
        usage = D.Usage(10, 5, 0)
        items = [svc.settle_args(request_id=f"f{i}", reservation_id=str(h.hold.reservation_id), usage=usage,
                                 provider="p", provider_model="m") for i, h in enumerate(holds)]
        items.append(svc.settle_args(request_id="f9", reservation_id=str(holds[0].hold.reservation_id), usage=usage,
                                     provider="p", provider_model="m"))
        out = await svc.settle_batch(items)
        assert [type(o).__name__ for o in out[:3]] == ["SettleResult"] * 3
        assert getattr(out[3], "reason", None) == "RESERVATION_MISMATCH"
    assert sql(fresh_database, "SELECT request_id FROM spend_entries ORDER BY 1") == [("f0",), ("f1",), ("f2",)]
    check_invariants(fresh_database)


async def test_a_codes_only_batch_answers_codes_without_entries_and_settles_the_same(
    fresh_database: str, pki: Path,
) -> None:
    async with ledger_service(fresh_database) as svc, grpc_server(svc, pki) as rt:
        await svc.set_budget(team="bt", agent="", window=4, limit_nanos=10**12)
        channel = secure_channel(f"127.0.0.1:{rt.port}", pki / "router.pem", pki / "router-key.pem", pki / "ca.pem")
        async with channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            holds = [await stub.Reserve(pb.ReserveRequest(
                request_id=f"c{i}", attempt=1, team="bt", agent="a", model="fake-small",
                prompt_tokens_upper_bound=1000, max_output_tokens=1000)) for i in range(2)]
            batch = pb.SettleBatchRequest(codes_only=True, settles=[
                _settle("c0", holds[0].reservation_id), _settle("c1", holds[1].reservation_id),
                _settle("c2", "00000000-0000-0000-0000-000000000000")])
            for _ in range(2):  # the replay answers the same
                res = await stub.SettleBatch(batch)
                assert [(r.code, r.HasField("response")) for r in res.results[:2]] == [(0, False), (0, False)]
                assert res.results[2].reason == "RESERVATION_NOT_FOUND"
    assert sql(fresh_database, "SELECT request_id FROM spend_entries ORDER BY request_id") == [("c0",), ("c1",)]
    check_invariants(fresh_database)

"""The router's SliceBook against a scripted ledger: how slices are drawn from, shared, retired
and handed back (the money rules themselves are tested against Postgres in
tests/integration/test_*slices.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from igw.ledger.v1 import ledger_pb2
from services.common.money import call_cost
from services.router.metrics import RouterMetrics
from services.router.routing import parse_config
from services.router.slices import SliceBook

CFG = parse_config(b"""
providers: {p: {type: openai, base_url: "https://api.example.com/v1"}}
deployments: {d: {provider: p, model: m, price: px}}
models: {m: {candidates: [d]}}
budget_slices: {enabled: true, calls: 4, draw_window_ms: 200, busy_calls: 1, busy_in_flight: 1}
""")
PRICE = ledger_pb2.ModelPrice(model="px", input_per_mtok_nanos=3_000, output_per_mtok_nanos=15_000)
UNIT = call_cost(100, 50, 0, 3_000, 15_000, 0)


class _Denied(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode = grpc.StatusCode.RESOURCE_EXHAUSTED) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


class _Ledger:
    """Grants ``grant`` calls per slice (None: refuses), answering after ``delay`` seconds."""

    def __init__(self, grant: int | None = 4, delay: float = 0.0,
                 refusal: grpc.StatusCode = grpc.StatusCode.RESOURCE_EXHAUSTED) -> None:
        self.grant, self.delay, self.refusal = grant, delay, refusal
        self.acquired: list[ledger_pb2.AcquireSliceRequest] = []
        self.released: list[str] = []

    async def _acquire(self, req: ledger_pb2.AcquireSliceRequest) -> ledger_pb2.AcquireSliceResponse:
        await asyncio.sleep(self.delay)
        self.acquired.append(req)
        if self.grant is None:
            raise _Denied(self.refusal)
        return ledger_pb2.AcquireSliceResponse(
            reservation_id=f"s{len(self.acquired)}", held_nanos=self.grant * UNIT, calls=self.grant,
            per_call_nanos=UNIT, price_version=7)

    def AcquireSlice(self, req: Any, timeout: float) -> Any:
        return self._acquire(req)

    async def _release(self, req: ledger_pb2.ReleaseRequest) -> ledger_pb2.ReleaseResponse:
        self.released.append(req.reservation_id)
        return ledger_pb2.ReleaseResponse(released=True)

    def Release(self, req: Any, timeout: float) -> Any:
        return self._release(req)


class _Prices:
    async def get(self, version: int) -> dict[str, ledger_pb2.ModelPrice]:
        assert version == 7
        return {"px": PRICE}


def _book(ledger: _Ledger) -> SliceBook:
    return SliceBook(ledger, _Prices(), RouterMetrics(CollectorRegistry()))  # type: ignore[arg-type]


async def _draw(book: SliceBook) -> Any:
    return await book.draw("t", "a", "px", 100, 50, CFG, 5.0)


async def _settle_all() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_calls_draw_their_worst_case_until_the_slice_is_spent_then_a_new_one_is_leased() -> None:
    ledger = _Ledger(grant=4)
    book = _book(ledger)
    holds = [await _draw(book) for _ in range(5)]
    assert [h.amount for h in holds] == [UNIT] * 5
    assert [h.slice.reservation_id for h in holds] == ["s1"] * 4 + ["s2"]
    assert ledger.acquired[0].calls == 4 and ledger.acquired[0].team == "t" and ledger.acquired[0].model == "px"
    assert holds[0].response().reservation_id == "s1" and holds[0].response().held_nanos == UNIT
    # s1 is retired but has open calls: it goes back only once all four are done.
    for h in holds[:3]:
        book.settled(h, True)
    await _settle_all()
    assert ledger.released == []
    book.give_back(holds[3])
    book.give_back(holds[3])  # twice is harmless
    await _settle_all()
    assert ledger.released == ["s1"]
    # Shutdown retires s2, which still has a call open: it goes back when that call is settled.
    await book.close(1)
    assert ledger.released == ["s1"] and book.stats()["active"] == 0
    book.settled(holds[4], True)
    await _settle_all()
    assert ledger.released == ["s1", "s2"]


async def test_a_given_up_settle_leaves_its_slice_to_be_captured() -> None:
    ledger = _Ledger(grant=2)
    book = _book(ledger)
    a, b = await _draw(book), await _draw(book)
    await _draw(book)  # retires s1
    book.settled(a, True)
    book.settled(b, False)
    await _settle_all()
    assert "s1" not in ledger.released
    assert book._metrics.slices.labels("kept")._value.get() == 1


async def test_a_slice_is_retired_at_the_end_of_its_draw_window() -> None:
    ledger = _Ledger(grant=100)
    book = _book(ledger)
    h = await _draw(book)
    await asyncio.sleep(0.3)  # draw_window_ms: 200
    assert book.stats()["active"] == 0 and ledger.released == []  # retired, one call still open
    book.settled(h, True)
    await _settle_all()
    assert ledger.released == ["s1"]
    assert (await _draw(book)).slice.reservation_id == "s2"
    await book.close(1)


async def test_concurrent_calls_share_one_acquisition() -> None:
    ledger = _Ledger(grant=4, delay=0.05)
    book = _book(ledger)
    holds = await asyncio.gather(*(_draw(book) for _ in range(4)))
    assert len(ledger.acquired) == 1 and {h.slice.reservation_id for h in holds} == {"s1"}
    await book.close(1)


@pytest.mark.parametrize("refusal", [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION],
                         ids=["over_budget", "no_budget"])
async def test_a_refused_slice_sends_calls_to_reserve_for_a_while(refusal: grpc.StatusCode) -> None:
    ledger = _Ledger(grant=None, refusal=refusal)
    book = _book(ledger)
    assert await _draw(book) is None
    assert await _draw(book) is None
    assert len(ledger.acquired) == 1  # the second call did not ask again (backoff)
    assert book._metrics.slices.labels("denied")._value.get() == 1
    await asyncio.sleep(0.3)
    assert len(ledger.acquired) == 1  # a refusal placed nothing: no reclaim asks again


async def test_a_slice_never_covers_more_calls_or_tokens_than_it_was_granted() -> None:
    # The ledger counted the slice's calls (and their token bounds) against the team's rate
    # limits: smaller calls must not stretch its money into more calls than that.
    ledger = _Ledger(grant=2)
    book = _book(ledger)
    first = await _draw(book)  # acquires s1 for 2 calls of 100 + 50 tokens
    small = [await book.draw("t", "a", "px", 10, 5, CFG, 5.0) for _ in range(2)]
    assert first.slice.reservation_id == "s1"
    assert [h.slice.reservation_id for h in small] == ["s1", "s2"]  # the third call needs a new slice
    # A call with more tokens than the slice has left (though its money would fit) takes a new one.
    ledger2 = _Ledger(grant=2)
    book2 = _book(ledger2)
    a = await book2.draw("t", "a", "px", 100, 50, CFG, 5.0)
    b = await book2.draw("t", "a", "px", 10, 200, CFG, 5.0)  # 210 tokens > 150 left
    assert a.slice.reservation_id == "s1" and b.slice.reservation_id == "s2"
    # A call given back returns its call and tokens to the slice.
    book2.give_back(b)
    assert (b.slice.calls_left, b.slice.tokens_left) == (2, 2 * 210)  # s2 was sized for 10 + 200 tokens


async def test_at_the_defaults_a_keys_first_three_calls_in_a_window_take_per_call_holds() -> None:
    # busy_calls 4, busy_in_flight 1 (the defaults): the first three calls of a key within 5 s take
    # exact per-call holds; the fourth, even from one caller calling back to back, leases a slice
    # (its draw note lingers to share a round trip, so it saves the Reserve).
    cfg = parse_config(b"""
providers: {p: {type: openai, base_url: "https://api.example.com/v1"}}
deployments: {d: {provider: p, model: m, price: px}}
models: {m: {candidates: [d]}}
""")
    sc = cfg.budget_slices
    assert sc.enabled and (sc.busy_calls, sc.busy_in_flight, sc.busy_window_ms) == (4, 1, 5_000)
    ledger = _Ledger()
    book = _book(ledger)
    key = ("t", "a", "px")
    for _ in range(3):
        book.enter(key)
        assert await book.draw("t", "a", "px", 100, 50, cfg, 5.0) is None
        book.leave(key)
    assert ledger.acquired == []
    for _ in range(3):
        book.enter(key)
        assert await book.draw("t", "a", "px", 100, 50, cfg, 5.0) is not None
        book.leave(key)
    assert len(ledger.acquired) == 1
    # busy_in_flight 2 keeps a caller calling back to back on per-call holds.
    two = parse_config(b"""
providers: {p: {type: openai, base_url: "https://api.example.com/v1"}}
deployments: {d: {provider: p, model: m, price: px}}
models: {m: {candidates: [d]}}
budget_slices: {busy_in_flight: 2}
""")
    other = _book(_Ledger())
    k2 = ("t2", "a", "px")
    for _ in range(5):
        other.enter(k2)
        assert await other.draw("t2", "a", "px", 100, 50, two, 5.0) is None
        other.leave(k2)
    other.enter(k2)
    other.enter(k2)
    assert await other.draw("t2", "a", "px", 100, 50, two, 5.0) is not None
    other.leave(k2)
    other.leave(k2)
    other.leave(k2)  # one too many is harmless
    other.enter(k2)
    assert await other.draw("t2", "a", "px", 100, 50, two, 5.0) is None


async def test_a_draw_note_over_a_lowered_limit_retires_the_teams_slices() -> None:
    ledger = _Ledger(grant=100)
    book = _book(ledger)
    h = await _draw(book)
    other = await book.draw("t2", "a", "px", 100, 50, CFG, 5.0)  # another team: untouched
    assert h.slice.reservation_id == "s1" and other.slice.reservation_id == "s2"
    book.over_limit("no-such-slice")  # harmless
    book.over_limit("s1")
    assert h.slice.retired and not other.slice.retired
    assert book._metrics.slices.labels("returned_over_limit")._value.get() == 1
    # The team's next call leases a new slice (the ledger sizes it, or grants none at the limit);
    # s1 goes back once its open call is settled.
    h2 = await _draw(book)
    assert h2.slice.reservation_id == "s3"
    book.settled(h, True)
    await _settle_all()
    assert ledger.released == ["s1"]

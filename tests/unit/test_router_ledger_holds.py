"""The router's LedgerHolds port for holds drawn from a budget slice, over the real SliceBook,
Settler and DrawNotes and a scripted ledger: a sliced call's answer waits for its draw note (not
its settle), the settle goes in the background, a given-back call withdraws its draw after its
note. (The same path against real Postgres: tests/integration/test_router_adaptive_slices.py.)"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from igw.ledger.v1 import ledger_pb2 as pb
from services.common.money import call_cost
from services.router.call.domain import CallRequest, Settled
from services.router.call.grpc_ports import Background, LedgerHolds
from services.router.call.plan import resolve_alias
from services.router.draw_notes import DrawNotes
from services.router.metrics import RouterMetrics
from services.router.providers.domain import ChatRequest, ContentPart, Message, Usage
from services.router.routing import parse_config
from services.router.settler import Settler
from services.router.slices import SliceBook, SliceHold
from services.router.translate import Prepared

CFG = parse_config(b"""
providers: {p: {type: openai, base_url: "https://api.example.com/v1"}}
deployments: {d: {provider: p, model: m, price: px}}
models: {m: {candidates: [d]}}
budget_slices: {enabled: true, calls: 4, draw_window_ms: 5000, busy_calls: 1, busy_in_flight: 1}
""")
PRICE = pb.ModelPrice(model="px", input_per_mtok_nanos=3_000, output_per_mtok_nanos=15_000)
UNIT = call_cost(100, 16, 0, 3_000, 15_000, 0)


class _Unimplemented(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNIMPLEMENTED


class _Ledger:
    """Grants slices; records draw notes and settles, each answered once its gate is set."""

    def __init__(self, notes_supported: bool = True) -> None:
        self.notes_supported = notes_supported
        self.notes: list[tuple[str, str, int, bool]] = []
        self.settles: list[tuple[str, str]] = []
        self.released: list[str] = []
        self.notes_gate, self.settles_gate = asyncio.Event(), asyncio.Event()
        self.notes_gate.set()
        self.settles_gate.set()

    async def AcquireSlice(self, req: pb.AcquireSliceRequest, timeout: float) -> pb.AcquireSliceResponse:
        return pb.AcquireSliceResponse(reservation_id="slice-1", held_nanos=4 * UNIT, calls=4, per_call_nanos=UNIT,
                                       price_version=7)

    async def Release(self, req: pb.ReleaseRequest, timeout: float) -> pb.ReleaseResponse:
        self.released.append(req.reservation_id)
        return pb.ReleaseResponse(released=True)

    async def NoteSliceDraws(self, req: pb.NoteSliceDrawsRequest, timeout: float) -> pb.NoteSliceDrawsResponse:
        if not self.notes_supported:
            raise _Unimplemented()
        await self.notes_gate.wait()
        self.notes += [(d.reservation_id, d.request_id, d.held_nanos, d.withdrawn) for d in req.draws]
        return pb.NoteSliceDrawsResponse(results=[pb.NoteSliceDrawResult() for _ in req.draws])

    async def SettleBatch(self, req: pb.SettleBatchRequest, timeout: float) -> pb.SettleBatchResponse:
        await self.settles_gate.wait()
        self.settles += [(s.request_id, s.reservation_id) for s in req.settles]
        return pb.SettleBatchResponse(results=[pb.SettleBatchResult() for _ in req.settles])


class _Prices:
    async def get(self, version: int) -> dict[str, pb.ModelPrice]:
        return {"px": PRICE}


def _holds(ledger: _Ledger, note_linger_s: float = 0.01) -> tuple[LedgerHolds, RouterMetrics]:
    metrics = RouterMetrics(CollectorRegistry())
    lg: Any = ledger
    slices = SliceBook(lg, _Prices(), metrics)  # type: ignore[arg-type]
    notes = DrawNotes(lg, metrics, linger_s=note_linger_s)
    holds = LedgerHolds(lg, Settler(lg, metrics, linger_s=0.01), notes, slices,
                        _Prices(), metrics, Background())  # type: ignore[arg-type]
    return holds, metrics


def _call(request_id: str = "call-1") -> CallRequest:
    chat = ChatRequest("", (Message("user", (ContentPart("text", text="hello"),)),), 16)
    return CallRequest(request_id, "t", "a", "m", resolve_alias(CFG, "t", "m"), Prepared(chat, 100, False, False), CFG)


async def _place(holds: LedgerHolds, request_id: str = "call-1") -> Any:
    lease = await holds.place(_call(request_id), 1, CFG.deployments["d"], 5.0, lambda: None)
    assert isinstance(lease.drawn, SliceHold) and lease.hold.reservation_id == "slice-1"
    return lease


def _settle(holds: LedgerHolds, lease: Any, request_id: str = "call-1", upstream_s: float = 0.1) -> Any:
    return holds.settle(request_id, lease, CFG.deployments["d"], Usage(10, 5, 0, True), upstream_s, Settled.SUCCESS)


async def test_a_note_lingers_for_a_slow_provider_and_goes_at_once_for_a_fast_one() -> None:
    ledger = _Ledger()
    ledger.settles_gate.clear()  # answers come from the notes
    holds, _ = _holds(ledger, note_linger_s=0.5)
    # A deployment not called yet counts as slow: its note lingers until its call is ready to answer.
    first = await _place(holds, "call-1")
    await asyncio.sleep(0.05)
    assert ledger.notes == []
    answered = _settle(holds, first, "call-1", upstream_s=0.001)
    assert await asyncio.wait_for(answered, 0.3) is True  # hurried, not at the end of the linger
    assert [n[1] for n in ledger.notes] == ["call-1"]
    # Its provider answered in 1 ms, less than the linger: the next note goes at once.
    second = await _place(holds, "call-2")
    await asyncio.sleep(0.05)
    assert [n[1] for n in ledger.notes] == ["call-1", "call-2"]
    assert await asyncio.wait_for(_settle(holds, second, "call-2", upstream_s=0.001), 2) is True


async def test_a_sliced_call_is_answered_once_its_draw_is_noted_while_its_settle_is_still_queued() -> None:
    ledger = _Ledger()
    ledger.settles_gate.clear()  # the settle is never acknowledged during the call
    holds, metrics = _holds(ledger)
    lease = await _place(holds)
    answered = _settle(holds, lease)
    assert answered is not None
    assert await asyncio.wait_for(answered, 2) is True
    assert ledger.notes == [("slice-1", "call-1", UNIT, False)]
    assert ledger.settles == []  # answered before its settle was acknowledged
    assert metrics.registry.get_sample_value("igw_router_settles_pending") == 1  # queued in the background
    assert not lease.drawn.done  # the slice still counts the call open until its settle lands
    ledger.settles_gate.set()
    assert await holds.settler.drain(2)
    assert ledger.settles == [("call-1", "slice-1")] and lease.drawn.done


async def test_a_sliced_calls_answer_waits_for_its_draw_note() -> None:
    ledger = _Ledger()
    ledger.notes_gate.clear()
    holds, _ = _holds(ledger)
    lease = await _place(holds)
    ledger.settles_gate.clear()
    answered = _settle(holds, lease)
    await asyncio.sleep(0.05)
    assert not answered.done()
    ledger.notes_gate.set()
    assert await asyncio.wait_for(answered, 2) is True
    assert ledger.settles == []


async def test_with_a_ledger_that_cannot_note_draws_the_answer_waits_for_the_settle() -> None:
    ledger = _Ledger(notes_supported=False)
    ledger.settles_gate.clear()
    holds, metrics = _holds(ledger)
    lease = await _place(holds)
    answered = _settle(holds, lease)
    await asyncio.sleep(0.1)
    assert not answered.done()  # the note failed: only the settle can make the call safe now
    assert metrics.slice_draw_notes.labels("draw", "unsupported")._value.get() == 1
    ledger.settles_gate.set()
    assert await asyncio.wait_for(answered, 2) is True
    assert ledger.settles == [("call-1", "slice-1")]


async def test_a_given_back_call_withdraws_its_draw_after_its_note() -> None:
    ledger = _Ledger()
    ledger.notes_gate.clear()
    holds, _ = _holds(ledger)
    lease = await _place(holds)
    holds.free(lease, "provider_error")
    holds.free(lease, "provider_error")  # twice: one withdrawal
    assert lease.drawn.done and holds.slices.stats()["open_calls"] == 0
    await asyncio.sleep(0.05)
    assert ledger.notes == []  # the note is still in flight; the withdrawal waits for it
    ledger.notes_gate.set()
    assert await holds.notes.drain(2)
    assert ledger.notes == [("slice-1", "call-1", UNIT, False), ("slice-1", "call-1", 0, True)]
    assert ledger.settles == []


async def test_a_retried_attempt_on_the_same_slice_is_noted_again_after_the_first_is_withdrawn() -> None:
    ledger = _Ledger()
    ledger.notes_gate.clear()
    holds, _ = _holds(ledger)
    first = await _place(holds)
    holds.free(first, "provider_error")
    second = await _place(holds)
    answered = _settle(holds, second)
    ledger.notes_gate.set()
    assert await asyncio.wait_for(answered, 2) is True
    assert await holds.notes.drain(2)
    assert ledger.notes == [("slice-1", "call-1", UNIT, False), ("slice-1", "call-1", 0, True),
                            ("slice-1", "call-1", UNIT, False)]
    assert await holds.settler.drain(2)

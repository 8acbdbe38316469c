"""The router's draw notes (NoteSliceDraws) against a scripted ledger: batching (at once when
idle, group commit when two batches are in flight), retries, refusals, give-up, ordering of a
call's note and withdrawal, and a ledger without the RPC.

The ledger side (the slice_draws table, the capture of unsettled draws) runs against real
Postgres in tests/integration; here a stand-in answers the RPC so the rules can be driven exactly.
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from igw.ledger.v1 import ledger_pb2 as pb
from services.router.draw_notes import DrawNotes
from services.router.metrics import RouterMetrics

_CALLER = contextvars.ContextVar("caller", default="none")
_FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]


class _Error(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


class _Ledger:
    """Answers NoteSliceDraws from a script (a StatusCode to raise, or {request_id: code}), then
    'recorded' for ever; while ``gate`` is clear, every answer waits for it."""

    def __init__(self, script: list[object] | None = None) -> None:
        self.calls: list[list[tuple[str, str, int, bool]]] = []
        self.callers: list[str] = []
        self.script = list(script or [])
        self.gate = asyncio.Event()
        self.gate.set()

    async def NoteSliceDraws(self, req: pb.NoteSliceDrawsRequest, timeout: float) -> pb.NoteSliceDrawsResponse:
        self.calls.append([(d.reservation_id, d.request_id, d.held_nanos, d.withdrawn) for d in req.draws])
        self.callers.append(_CALLER.get())
        await self.gate.wait()
        step = self.script.pop(0) if self.script else "ok"
        if isinstance(step, grpc.StatusCode):
            raise _Error(step)
        codes = step if isinstance(step, dict) else {}
        return pb.NoteSliceDrawsResponse(
            results=[pb.NoteSliceDrawResult(code=codes.get(d.request_id, 0), reason="X" if codes.get(d.request_id)
                                            else "") for d in req.draws])


def _notes(ledger: _Ledger, **kw: Any) -> tuple[DrawNotes, RouterMetrics]:
    metrics = RouterMetrics(CollectorRegistry())
    kw.setdefault("linger_s", 0.0)  # sent at once unless a test asks for a linger
    return DrawNotes(ledger, metrics, **kw), metrics  # type: ignore[arg-type]


def _count(metrics: RouterMetrics, kind: str, result: str) -> float:
    return float(metrics.slice_draw_notes.labels(kind, result)._value.get())


async def _turns(n: int = 10) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_a_note_goes_at_once_when_nothing_is_in_flight() -> None:
    ledger = _Ledger()
    notes, metrics = _notes(ledger)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await asyncio.wait_for(notes.note("s1", "call-1", 1234), 2) is True
    assert loop.time() - t0 < 0.5  # no linger
    assert ledger.calls == [[("s1", "call-1", 1234, False)]]
    assert _count(metrics, "draw", "acknowledged") == 1
    assert await notes.drain(1)


async def test_notes_arriving_while_two_batches_are_in_flight_share_the_next_one() -> None:
    # Group commit: the first two go at once, each alone; the five that arrive while both are in
    # flight go together as soon as one returns (not one RPC each).
    ledger = _Ledger()
    ledger.gate.clear()
    notes, _ = _notes(ledger)
    first = notes.note("s1", "a", 1)
    await _turns()
    second = notes.note("s1", "b", 1)
    await _turns()
    rest = [notes.note("s1", f"c{i}", 1) for i in range(5)]
    await asyncio.sleep(0.05)
    assert [[d[1] for d in c] for c in ledger.calls] == [["a"], ["b"]]
    ledger.gate.set()
    assert await asyncio.wait_for(asyncio.gather(first, second, *rest), 2) == [True] * 7
    assert [[d[1] for d in c] for c in ledger.calls] == [["a"], ["b"], [f"c{i}" for i in range(5)]]


async def test_notes_of_calls_starting_within_the_linger_share_one_round_trip() -> None:
    ledger = _Ledger()
    notes, metrics = _notes(ledger, linger_s=0.05)
    first = notes.note("s1", "a", 1)
    await asyncio.sleep(0.01)
    assert ledger.calls == []  # lingering
    second = notes.note("s2", "b", 2)
    assert await asyncio.wait_for(asyncio.gather(first, second), 2) == [True, True]
    assert [[d[1] for d in c] for c in ledger.calls] == [["a", "b"]]
    assert metrics.slice_draw_note_batches._value.get() == 1
    # The next note starts a linger of its own.
    third = notes.note("s1", "c", 3)
    await asyncio.sleep(0.01)
    assert len(ledger.calls) == 1
    assert await asyncio.wait_for(third, 2) is True
    assert [[d[1] for d in c] for c in ledger.calls] == [["a", "b"], ["c"]]


async def test_a_call_ready_to_answer_hurries_its_lingering_note() -> None:
    ledger = _Ledger()
    notes, _ = _notes(ledger, linger_s=30.0)
    waiting = notes.note("s1", "a", 1)
    other = notes.note("s1", "b", 1)
    await _turns()
    assert ledger.calls == []
    notes.hurry(waiting)  # its provider answered: the queue goes now, not in 30 s
    assert await asyncio.wait_for(asyncio.gather(waiting, other), 2) == [True, True]
    assert [[d[1] for d in c] for c in ledger.calls] == [["a", "b"]]
    # Hurrying a note already answered sends nothing, and leaves the next note lingering.
    notes.hurry(waiting)
    late = notes.note("s1", "c", 1)
    await asyncio.sleep(0.05)
    assert len(ledger.calls) == 1
    notes.hurry(late)
    assert await asyncio.wait_for(late, 2) is True
    assert len(ledger.calls) == 2


async def test_a_note_hurried_while_it_waits_behind_a_withdrawal_goes_once_queued() -> None:
    ledger = _Ledger()
    notes, _ = _notes(ledger, linger_s=30.0)
    first = notes.note("s1", "a", 1)
    notes.hurry(first)
    assert await asyncio.wait_for(first, 2) is True
    notes.withdraw("s1", "a", first)  # lingers (nobody waits for a withdrawal)
    again = notes.note("s1", "a", 2)  # the retried attempt: behind the withdrawal
    await _turns()
    notes.hurry(again)  # its call is ready to answer: the withdrawal goes, then the note at once
    assert await asyncio.wait_for(again, 2) is True
    assert [[(d[1], d[3]) for d in c] for c in ledger.calls] == [[("a", False)], [("a", True)], [("a", False)]]


async def test_a_note_told_not_to_linger_goes_at_once_with_what_is_queued() -> None:
    ledger = _Ledger()
    notes, _ = _notes(ledger, linger_s=30.0)
    queued = notes.note("s1", "a", 1)
    await _turns()
    assert ledger.calls == []
    now = notes.note("s1", "b", 1, linger=False)
    assert await asyncio.wait_for(asyncio.gather(queued, now), 2) == [True, True]
    assert [[d[1] for d in c] for c in ledger.calls] == [["a", "b"]]
    assert notes.worth_lingering(30.006) and not notes.worth_lingering(30.0)
    plain, _ = _notes(_Ledger())
    assert not plain.worth_lingering(100.0)  # no linger configured


async def test_a_note_answered_over_limit_hands_its_slice_to_the_router() -> None:
    class _Over(_Ledger):
        async def NoteSliceDraws(self, req: pb.NoteSliceDrawsRequest, timeout: float) -> pb.NoteSliceDrawsResponse:
            self.calls.append([(d.reservation_id, d.request_id, d.held_nanos, d.withdrawn) for d in req.draws])
            return pb.NoteSliceDrawsResponse(results=[
                pb.NoteSliceDrawResult(over_limit=d.reservation_id == "lowered") for d in req.draws])

    over: list[str] = []
    notes, _ = _notes(_Over(), on_over_limit=over.append)  # type: ignore[arg-type]
    # Recorded either way (the call is answered); only the slice over its limit is handed on.
    assert await asyncio.wait_for(asyncio.gather(notes.note("fine", "a", 1), notes.note("lowered", "b", 1)), 2) == [
        True, True]
    assert over == ["lowered"]


async def test_drain_sends_lingering_notes_at_once() -> None:
    ledger = _Ledger()
    notes, _ = _notes(ledger, linger_s=30.0)
    note = notes.note("s1", "a", 1)
    assert await notes.drain(2)
    assert note.result() is True


async def test_a_hurried_note_waits_for_the_pipeline_then_goes_before_its_linger_ends() -> None:
    ledger = _Ledger()
    ledger.gate.clear()
    notes, _ = _notes(ledger, linger_s=30.0, pipeline=1)
    busy = [notes.note("s1", "x", 1), notes.note("s1", "y", 1)]
    notes.hurry(busy[0])
    await _turns()
    notes.hurry(busy[1])
    await _turns()
    assert [[d[1] for d in c] for c in ledger.calls] == [["x", "y"]]
    late = notes.note("s1", "z", 1)
    await _turns()
    notes.hurry(late)
    await _turns()
    assert len(ledger.calls) == 1
    ledger.gate.set()
    assert await asyncio.wait_for(asyncio.gather(*busy, late), 2) == [True] * 3
    assert [[d[1] for d in c] for c in ledger.calls] == [["x", "y"], ["z"]]


async def test_a_batch_holds_at_most_max_batch_notes() -> None:
    ledger = _Ledger()
    ledger.gate.clear()
    notes, _ = _notes(ledger, max_batch=3)
    held = [notes.note("s1", "a", 1), notes.note("s1", "b", 1)]
    await _turns()
    waiting = [notes.note("s1", f"c{i}", 1) for i in range(7)]
    ledger.gate.set()
    assert await asyncio.wait_for(asyncio.gather(*held, *waiting), 2) == [True] * 9
    assert [len(c) for c in ledger.calls] == [1, 1, 3, 3, 1]
    assert sorted(d[1] for c in ledger.calls for d in c) == sorted(["a", "b"] + [f"c{i}" for i in range(7)])


async def test_a_failed_batch_is_retried_until_acknowledged() -> None:
    ledger = _Ledger([grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED])
    notes, metrics = _notes(ledger)
    assert await asyncio.wait_for(notes.note("s1", "a", 5), 5) is True
    assert ledger.calls == [[("s1", "a", 5, False)]] * 3
    assert metrics.slice_draw_note_retries._value.get() == 2
    assert _count(metrics, "draw", "acknowledged") == 1


async def test_only_the_items_with_a_transient_code_are_sent_again() -> None:
    ledger = _Ledger(["ok", {"b": grpc.StatusCode.UNAVAILABLE.value[0]}])
    ledger.gate.clear()
    notes, _ = _notes(ledger, pipeline=1)
    futures = [notes.note("s1", rid, 1) for rid in "xab"]  # a and b wait for x: one batch
    ledger.gate.set()
    assert await asyncio.wait_for(asyncio.gather(*futures), 5) == [True, True, True]
    assert [[d[1] for d in c] for c in ledger.calls] == [["x"], ["a", "b"], ["b"]]


async def test_a_refused_note_resolves_false_and_is_not_retried(caplog: pytest.LogCaptureFixture) -> None:
    ledger = _Ledger(["ok", {"a": _FAILED_PRECONDITION}])
    ledger.gate.clear()
    notes, metrics = _notes(ledger, pipeline=1)
    futures = [notes.note("s1", rid, 1) for rid in "xab"]
    ledger.gate.set()
    assert await asyncio.wait_for(asyncio.gather(*futures), 5) == [True, False, True]
    assert [[d[1] for d in c] for c in ledger.calls] == [["x"], ["a", "b"]]
    assert _count(metrics, "draw", "refused") == 1 and _count(metrics, "draw", "acknowledged") == 2
    assert any("draw note refused" in r.getMessage() for r in caplog.records)


async def test_a_refused_batch_resolves_false() -> None:
    ledger = _Ledger([grpc.StatusCode.INVALID_ARGUMENT])
    notes, metrics = _notes(ledger)
    assert await asyncio.wait_for(notes.note("s1", "a", 1), 5) is False
    assert len(ledger.calls) == 1 and _count(metrics, "draw", "refused") == 1


async def test_a_note_never_acknowledged_is_given_up() -> None:
    ledger = _Ledger([grpc.StatusCode.UNAVAILABLE] * 1000)
    notes, metrics = _notes(ledger, give_up_s=0.3)
    assert await asyncio.wait_for(notes.note("s1", "a", 1), 5) is False
    assert len(ledger.calls) >= 2
    assert _count(metrics, "draw", "unacknowledged") == 1
    assert await notes.drain(1)


async def test_a_withdrawal_waits_for_its_note() -> None:
    ledger = _Ledger()
    ledger.gate.clear()
    notes, metrics = _notes(ledger)
    noted = notes.note("s1", "a", 7)
    await _turns()
    notes.withdraw("s1", "a", noted)
    other = notes.note("s1", "b", 7)  # a free slot: the withdrawal could have gone, but must not
    await asyncio.sleep(0.05)
    assert ledger.calls == [[("s1", "a", 7, False)], [("s1", "b", 7, False)]]
    assert not await notes.drain(0.05)  # the withdrawal is pending
    ledger.gate.set()
    assert await notes.drain(2)
    assert await noted is True and await other is True
    assert ledger.calls[2] == [("s1", "a", 0, True)]
    assert _count(metrics, "withdrawal", "acknowledged") == 1


async def test_a_withdrawal_follows_a_note_that_was_given_up() -> None:
    # The note may have landed after all: the withdrawal still goes, after it.
    ledger = _Ledger([grpc.StatusCode.UNAVAILABLE] * 3)
    notes, _ = _notes(ledger, give_up_s=0.1)
    noted = notes.note("s1", "a", 7)
    notes.withdraw("s1", "a", noted)
    assert await notes.drain(5)
    assert await noted is False
    assert ledger.calls[-1] == [("s1", "a", 0, True)]
    assert all(not d[3] for c in ledger.calls[:-1] for d in c)


async def test_a_second_draw_of_the_same_call_waits_for_the_first_ones_withdrawal() -> None:
    # A retried attempt draws the same request id from the same slice again: its note must not
    # be overtaken by the first attempt's withdrawal (which would forget the second draw).
    ledger = _Ledger()
    ledger.gate.clear()
    notes, _ = _notes(ledger)
    first = notes.note("s1", "a", 7)
    notes.withdraw("s1", "a", first)
    second = notes.note("s1", "a", 7)
    await asyncio.sleep(0.05)
    assert len(ledger.calls) == 1
    ledger.gate.set()
    assert await asyncio.wait_for(second, 2) is True
    assert ledger.calls == [[("s1", "a", 7, False)], [("s1", "a", 0, True)], [("s1", "a", 7, False)]]


async def test_a_ledger_without_the_rpc_resolves_notes_false_and_is_not_asked_again() -> None:
    ledger = _Ledger([grpc.StatusCode.UNIMPLEMENTED])
    notes, metrics = _notes(ledger)
    assert await asyncio.wait_for(notes.note("s1", "a", 1), 2) is False
    later = notes.note("s1", "b", 1)
    assert later.done() and later.result() is False
    notes.withdraw("s1", "a", later)
    assert await notes.drain(1)
    assert len(ledger.calls) == 1
    assert _count(metrics, "draw", "unsupported") == 2 and _count(metrics, "withdrawal", "unsupported") == 1


async def test_a_batch_does_not_carry_the_callers_context() -> None:
    ledger = _Ledger()
    notes, _ = _notes(ledger)
    _CALLER.set("agent-a")
    assert await notes.note("s1", "a", 1) is True
    assert ledger.callers == ["none"]


async def test_a_malformed_answer_resolves_false_and_does_not_leave_drain_waiting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class _Short(_Ledger):
        async def NoteSliceDraws(self, req: pb.NoteSliceDrawsRequest, timeout: float) -> pb.NoteSliceDrawsResponse:
            self.calls.append([])
            return pb.NoteSliceDrawsResponse()

    notes, _ = _notes(_Short())
    assert await asyncio.wait_for(notes.note("s1", "a", 1), 2) is False
    assert await notes.drain(1)
    assert any("unexpectedly" in r.getMessage() for r in caplog.records)

"""The router's settle batching: concurrent settles share a call, faults are retried, refusals are not.

The ledger side of SettleBatch runs against real Postgres in tests/integration; here a
stand-in answers the RPC so the batching and retry rules can be driven exactly.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from prometheus_client import CollectorRegistry

from igw.ledger.v1 import ledger_pb2 as pb
from services.router.metrics import RouterMetrics
from services.router.settler import Settler, release_hold, release_request


class _Unavailable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE


class _Ledger:
    """Answers SettleBatch from a script: a list of per-call behaviours, then 'ok' for ever."""

    def __init__(self, script: list[object] | None = None) -> None:
        self.calls: list[list[str]] = []
        self._script = list(script or [])

    async def SettleBatch(self, req: pb.SettleBatchRequest, timeout: float) -> pb.SettleBatchResponse:
        self.calls.append([s.request_id for s in req.settles])
        step = self._script.pop(0) if self._script else "ok"
        if step == "down":
            raise _Unavailable()
        out = pb.SettleBatchResponse()
        for s in req.settles:
            code = step.get(s.request_id, 0) if isinstance(step, dict) else 0
            if code:
                out.results.add(code=code, reason="X")
            else:
                out.results.add(response=pb.SettleResponse(replayed=False))
        return out


@pytest.fixture(autouse=True)
def _no_unexpected_failures(request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture) -> object:
    """Every test but the malformed-answer one must go through the normal paths only."""
    yield
    if "malformed" not in request.node.name:
        assert not [r for r in caplog.records if "unexpectedly" in r.getMessage()]


def _settler(ledger: _Ledger) -> tuple[Settler, RouterMetrics]:
    metrics = RouterMetrics(CollectorRegistry())
    return Settler(ledger, metrics, linger_s=0.02), metrics  # type: ignore[arg-type]


def _req(rid: str) -> pb.SettleRequest:
    return pb.SettleRequest(request_id=rid, reservation_id="r-" + rid)


async def test_settles_submitted_together_share_one_call() -> None:
    ledger = _Ledger()
    settler, _ = _settler(ledger)
    for i in range(20):
        settler.submit(_req(f"s{i}"))
    assert await settler.drain(5)
    assert ledger.calls == [[f"s{i}" for i in range(20)]]


async def test_a_batch_larger_than_the_maximum_is_split() -> None:
    ledger = _Ledger()
    metrics = RouterMetrics(CollectorRegistry())
    settler = Settler(ledger, metrics, max_batch=8, linger_s=0.02)  # type: ignore[arg-type]
    for i in range(20):
        settler.submit(_req(f"s{i}"))
    assert await settler.drain(5)
    assert [len(c) for c in ledger.calls] == [8, 8, 4]
    assert sorted(r for c in ledger.calls for r in c) == sorted(f"s{i}" for i in range(20))


async def test_an_unreachable_ledger_is_retried_until_it_answers() -> None:
    ledger = _Ledger(["down", "down"])
    settler, metrics = _settler(ledger)
    settler.submit(_req("a"))
    settler.submit(_req("b"))
    assert await settler.drain(5)
    assert ledger.calls == [["a", "b"]] * 3
    assert metrics.settle_retries._value.get() == 4  # two settles, two retries each


async def test_only_the_items_that_failed_for_a_transient_reason_are_sent_again() -> None:
    unavailable = grpc.StatusCode.UNAVAILABLE.value[0]
    refused = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    ledger = _Ledger([{"b": unavailable, "c": refused}])
    settler, _ = _settler(ledger)
    for rid in "abc":
        settler.submit(_req(rid))
    assert await settler.drain(5)
    assert ledger.calls == [["a", "b", "c"], ["b"]]


async def test_drain_reports_settles_that_could_not_be_delivered() -> None:
    ledger = _Ledger(["down"] * 1000)
    settler, _ = _settler(ledger)
    settler.submit(_req("a"))
    assert not await settler.drain(0.3)
    assert len(ledger.calls) >= 2


async def test_a_malformed_answer_does_not_leave_drain_waiting(caplog: pytest.LogCaptureFixture) -> None:
    class _Short(_Ledger):
        async def SettleBatch(self, req: pb.SettleBatchRequest, timeout: float) -> pb.SettleBatchResponse:
            self.calls.append([s.request_id for s in req.settles])
            return pb.SettleBatchResponse()

    settler, _ = _settler(_Short())
    settler.submit(_req("a"))
    assert await settler.drain(2)
    assert any("unexpectedly" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("n", [1, 3])
async def test_settles_after_an_idle_period_are_still_sent(n: int) -> None:
    ledger = _Ledger()
    settler, _ = _settler(ledger)
    settler.submit(_req("first"))
    assert await settler.drain(5)
    await asyncio.sleep(0.05)
    for i in range(n):
        settler.submit(_req(f"later{i}"))
    assert await settler.drain(5)
    assert ledger.calls[-1] == [f"later{i}" for i in range(n)]


class _Releases:
    """Answers Release from a script of codes (None: acknowledged)."""

    def __init__(self, script: list[grpc.StatusCode | None]) -> None:
        self.requests: list[pb.ReleaseRequest] = []
        self._script = script

    async def Release(self, req: pb.ReleaseRequest, timeout: float) -> pb.ReleaseResponse:
        self.requests.append(req)
        code = self._script.pop(0) if self._script else None
        if code is not None:
            err = grpc.RpcError()
            err.code = lambda: code  # type: ignore[attr-defined]
            raise err
        return pb.ReleaseResponse(released=True)


async def test_release_by_request_id_is_retried_through_faults_until_acknowledged() -> None:
    ledger = _Releases([grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED])
    assert await release_request(ledger, "call-1", "cancelled") is True  # type: ignore[arg-type]
    assert [(r.request_id, r.reservation_id, r.reason) for r in ledger.requests] == [("call-1", "", "cancelled")] * 3


async def test_a_refused_release_is_not_retried() -> None:
    ledger = _Releases([grpc.StatusCode.INVALID_ARGUMENT])
    assert await release_hold(ledger, "not-a-uuid", "x") is False  # type: ignore[arg-type]
    assert len(ledger.requests) == 1


async def test_a_settle_is_retried_and_its_callback_runs_once() -> None:
    # A sliced call's settle goes this background path too (its answer waits for its draw note,
    # services/router/draw_notes.py): the callback is what frees its slice.
    ledger = _Ledger(["down", "down"])
    settler, metrics = _settler(ledger)
    seen: list[bool] = []
    settler.submit(_req("a"), seen.append)
    assert await settler.drain(5)
    assert seen == [True] and ledger.calls == [["a"]] * 3
    assert metrics.settle_retries._value.get() == 2


async def test_a_refused_settle_tells_its_callback_false_and_is_not_retried() -> None:
    ledger = _Ledger([{"a": grpc.StatusCode.FAILED_PRECONDITION.value[0]}])
    settler, _ = _settler(ledger)
    seen: list[bool] = []
    settler.submit(_req("a"), seen.append)
    settler.submit(_req("b"), seen.append)
    assert await settler.drain(5)
    assert sorted(seen) == [False, True] and ledger.calls == [["a", "b"]]


async def test_settles_linger_so_concurrent_ones_share_a_call() -> None:
    # No settle skips the linger any more: one submitted alone waits for company.
    ledger = _Ledger()
    metrics = RouterMetrics(CollectorRegistry())
    settler = Settler(ledger, metrics, linger_s=0.2)  # type: ignore[arg-type]
    settler.submit(_req("a"))
    await asyncio.sleep(0.05)
    assert ledger.calls == []
    settler.submit(_req("b"))
    assert await settler.drain(5)
    assert ledger.calls == [["a", "b"]]

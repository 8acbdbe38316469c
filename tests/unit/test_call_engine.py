"""The router's call engine over fakes: the fallback and retry matrix (each error kind x position of
the failing candidate x unary or stream), the breaker, the routing strategies and the final status
by cause. No processes, no gRPC: each case runs in milliseconds."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import grpc
import pytest

from services.common import errors as E
from services.router.call.domain import Outcome, Settled
from services.router.call.plan import order
from services.router.providers.errors import ErrorKind
from tests.unit.fakes_call import NO_CREDENTIAL, OK, URL_MISMATCH, VAULT_DOWN, Rig, config

K = ErrorKind


@dataclass(frozen=True)
class Rule:
    """What a failure of one kind does to the call."""

    outcome: Outcome
    next: str  # "fallback" (breaker fed), "skip" (breaker not fed), "stop" (straight back), "larger"
    cause: str
    error: tuple[grpc.StatusCode, str] | None = None  # the agent's error when the call stops here
    last_error: tuple[grpc.StatusCode, str] = (grpc.StatusCode.UNAVAILABLE, "ALL_CANDIDATES_FAILED")


RULES: dict[object, Rule] = {
    K.RATE_LIMITED: Rule(Outcome.RATE_LIMITED, "fallback", "rate_limited"),
    K.OVERLOADED: Rule(Outcome.OVERLOADED, "fallback", "overloaded"),
    K.SERVER_ERROR: Rule(Outcome.SERVER_ERROR, "fallback", "server_error"),
    K.TIMEOUT: Rule(Outcome.TIMEOUT, "fallback", "timeout"),
    K.CONNECT_ERROR: Rule(Outcome.CONNECT_ERROR, "fallback", "connect_error"),
    K.PROTOCOL_ERROR: Rule(Outcome.PROTOCOL_ERROR, "fallback", "protocol_error"),
    K.CONTEXT_TOO_LONG: Rule(Outcome.CONTEXT_TOO_LONG, "larger", "context_too_long",
                             last_error=(grpc.StatusCode.INVALID_ARGUMENT, "CONTEXT_TOO_LONG")),
    K.CONTENT_REFUSED: Rule(Outcome.CONTENT_REFUSED, "stop", "content_refused",
                            error=(grpc.StatusCode.FAILED_PRECONDITION, "CONTENT_REFUSED")),
    K.BAD_REQUEST: Rule(Outcome.BAD_REQUEST, "stop", "bad_request",
                        error=(grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_BAD_REQUEST")),
    K.AUTH_FAILED: Rule(Outcome.AUTH_FAILED, "skip", "auth_failed"),
    K.REDIRECT_REFUSED: Rule(Outcome.PROTOCOL_ERROR, "skip", "redirect_refused"),
    NO_CREDENTIAL: Rule(Outcome.NO_CREDENTIAL, "skip", "NO_ACTIVE_KEY"),
    VAULT_DOWN: Rule(Outcome.NO_CREDENTIAL, "skip", "VAULT_UNAVAILABLE"),
    URL_MISMATCH: Rule(Outcome.NO_CREDENTIAL, "skip", "LEASE_BASE_URL_MISMATCH"),
}
POSITIONS = {"first": 0, "middle": 1, "last": 2}


def _run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("position", list(POSITIONS))
@pytest.mark.parametrize("kind", list(RULES), ids=lambda k: getattr(k, "value", k))
def test_fallback_and_retry_matrix(kind: object, position: str, stream: bool) -> None:
    """Candidates before the failing one fail with a server error; the ones after it answer."""
    p = POSITIONS[position]
    rule = RULES[kind]
    rig = Rig(config())
    names = ["d1", "d2", "d3"]
    for i in range(p):
        rig.providers.script[f"m{i + 1}"] = [K.SERVER_ERROR]
    failing = names[p]
    if isinstance(kind, ErrorKind):
        rig.providers.script[f"m{p + 1}"] = [kind]
    else:
        rig.creds.script[failing] = kind  # type: ignore[assignment]

    served = names[p + 1] if p + 1 < len(names) else None
    if rule.error is not None or served is None:
        with pytest.raises(E.IgwError) as caught:
            _run(rig.call(stream))
        err = caught.value
        assert (err.code, err.reason) == (rule.error or rule.last_error)
        # No later candidate was asked; every hold placed was freed, none settled.
        assert rig.providers.calls == [f"m{i + 1}" for i in range(p + (1 if isinstance(kind, ErrorKind) else 0))]
        assert sorted(n for n, _ in rig.holds.freed) == sorted(rig.holds.placed)
        assert rig.holds.settled == []
        if rule.error is None:  # the final error lists every attempt, with its cause
            meta = err.metadata
            assert meta["attempts"] == str(p + 1)
            assert meta[f"attempt_{p + 1}_deployment"] == failing
            assert meta[f"attempt_{p + 1}_outcome"] == rule.outcome.name
            assert meta[f"attempt_{p + 1}_cause"] == rule.cause
    else:
        res = _run(rig.call(stream))
        assert res.deployment.name == served  # type: ignore[attr-defined]
        log = res.attempts  # type: ignore[attr-defined]
        assert [(a.deployment, a.outcome) for a in log] == (
            [(n, Outcome.SERVER_ERROR) for n in names[:p]] + [(failing, rule.outcome), (served, Outcome.SUCCESS)])
        assert log[p].cause == rule.cause
        # The served attempt's hold is settled; every other hold was freed, with the failure as the reason.
        assert [(s[1], s[2]) for s in rig.holds.settled] == [(served, Settled.SUCCESS)]
        assert sorted(n for n, _ in rig.holds.freed) == sorted(set(rig.holds.placed) - {served})
        if isinstance(kind, ErrorKind):
            assert (failing, rule.cause) in rig.holds.freed
        else:
            assert failing not in rig.providers.calls and f"m{p + 1}" not in rig.providers.calls
    # The breaker counts only failures that say the deployment is unhealthy.
    assert rig.breakers[failing].failures == (1 if rule.next == "fallback" else 0)
    for n in names[:p]:
        assert rig.breakers[n].failures == 1
    # A secret is sent only to its own deployment's base URL, and never for a mismatched lease.
    assert all(s == f"sk-d{m[1:]}" for s, m in zip(rig.providers.secrets, rig.providers.calls, strict=True))
    # A credential issued is ended exactly once: used when the provider was called, returned otherwise.
    ended = {name: (used, reason) for name, used, reason in rig.creds.ended}
    assert len(ended) == len(rig.creds.ended)
    if kind == URL_MISMATCH:
        assert ended[failing] == (False, "LEASE_BASE_URL_MISMATCH")
    elif isinstance(kind, ErrorKind):
        assert ended[failing] == (True, kind.name)
    if rule.error is None and served is not None:
        assert ended[served] == (True, "STREAMED" if stream else "SUCCESS")


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_a_lone_retryable_failure_is_retried_after_a_backoff_on_the_same_deployment(stream: bool) -> None:
    rig = Rig(config(n=1))
    rig.providers.script["m1"] = [K.RATE_LIMITED]
    res = _run(rig.call(stream))
    assert [a.outcome for a in res.attempts] == [Outcome.RATE_LIMITED, Outcome.SUCCESS]  # type: ignore[attr-defined]
    assert rig.clock.slept == [0.25]  # the provider's retry-after, honoured (under the cap)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_attempts_stop_at_max_attempts_and_the_status_follows_the_cause(stream: bool) -> None:
    rig = Rig(config(n=2, max_attempts=3))
    rig.providers.script = {"m1": [K.RATE_LIMITED] * 3, "m2": [K.OVERLOADED] * 3}
    with pytest.raises(E.ResourceExhausted) as caught:
        _run(rig.call(stream))
    assert caught.value.reason == "UPSTREAM_RATE_LIMITED"
    assert caught.value.retry_delay_s == 0.25
    assert rig.providers.calls == ["m1", "m2", "m1"]


@pytest.mark.parametrize(("script", "status", "reason"), [
    ({"d1": NO_CREDENTIAL, "d2": NO_CREDENTIAL, "d3": NO_CREDENTIAL},
     grpc.StatusCode.FAILED_PRECONDITION, "NO_CREDENTIAL"),
    ({"d1": URL_MISMATCH, "d2": URL_MISMATCH, "d3": URL_MISMATCH},
     grpc.StatusCode.FAILED_PRECONDITION, "LEASE_BASE_URL_MISMATCH"),
    ({"d1": NO_CREDENTIAL, "d2": URL_MISMATCH, "d3": NO_CREDENTIAL},
     grpc.StatusCode.FAILED_PRECONDITION, "DEPLOYMENTS_MISCONFIGURED"),
    ({"d1": VAULT_DOWN, "d2": VAULT_DOWN, "d3": VAULT_DOWN}, grpc.StatusCode.UNAVAILABLE, "ALL_CANDIDATES_FAILED"),
])
def test_final_status_by_cause_of_credentials(script: dict[str, str], status: grpc.StatusCode, reason: str) -> None:
    rig = Rig(config())
    rig.creds.script = script
    with pytest.raises(E.IgwError) as caught:
        _run(rig.call(False))
    assert (caught.value.code, caught.value.reason) == (status, reason)
    assert rig.providers.calls == []


@pytest.mark.parametrize(("kind", "reason"), [
    (K.AUTH_FAILED, "PROVIDER_AUTH_FAILED"), (K.REDIRECT_REFUSED, "PROVIDER_REDIRECT_REFUSED"),
])
def test_every_provider_refusing_the_key_is_failed_precondition(kind: ErrorKind, reason: str) -> None:
    rig = Rig(config())
    rig.providers.script = {m: [kind] for m in ("m1", "m2", "m3")}
    with pytest.raises(E.FailedPrecondition) as caught:
        _run(rig.call(False))
    assert caught.value.reason == reason
    assert rig.providers.calls == ["m1", "m2", "m3"]  # each skipped once, never retried


def test_a_budget_refusal_goes_straight_back_and_leaves_no_hold_to_release() -> None:
    rig = Rig(config())
    rig.holds.refuse = E.ResourceExhausted("BUDGET_EXCEEDED", "team budget exhausted")
    with pytest.raises(E.ResourceExhausted):
        _run(rig.call(False))
    assert rig.providers.calls == [] and rig.holds.released_requests == []


def test_an_open_breaker_is_skipped_then_probed_after_the_cooldown() -> None:
    rig = Rig(config(threshold=1))
    rig.providers.script["m1"] = [K.SERVER_ERROR]
    res = _run(rig.call(False))
    assert res.deployment.name == "d2"  # type: ignore[attr-defined]
    # Open: the next call logs it once and goes to d2 without asking d1.
    res = _run(rig.call(False))
    assert [(a.deployment, a.outcome) for a in res.attempts] == [  # type: ignore[attr-defined]
        ("d1", Outcome.BREAKER_OPEN), ("d2", Outcome.SUCCESS)]
    assert rig.providers.calls == ["m1", "m2", "m2"]
    # After the cooldown, one probe goes to d1; its success closes the breaker.
    rig.clock.now += 1.0
    res = _run(rig.call(True))
    assert res.deployment.name == "d1"  # type: ignore[attr-defined]
    assert rig.breakers["d1"].try_acquire() is True


def test_every_breaker_open_is_unavailable() -> None:
    rig = Rig(config(threshold=1))
    for b in rig.breakers.values():
        b.record_failure()
    with pytest.raises(E.Unavailable) as caught:
        _run(rig.call(False))
    assert caught.value.reason == "ALL_BREAKERS_OPEN"
    assert rig.providers.calls == [] and rig.holds.placed == []


def test_a_failed_probe_reopens_the_breaker_and_a_skip_releases_the_probe() -> None:
    rig = Rig(config(threshold=1))
    rig.breakers["d1"].record_failure()
    rig.clock.now += 1.0
    rig.providers.script["m1"] = [K.TIMEOUT]
    _run(rig.call(False))
    assert rig.breakers["d1"].try_acquire() is False  # re-opened by the failed probe
    rig.clock.now += 1.0
    rig.creds.script["d1"] = NO_CREDENTIAL
    _run(rig.call(False))
    assert rig.breakers["d1"].try_acquire() == "probe"  # no verdict: the probe was released


@pytest.mark.parametrize(("strategy", "expected"), [
    ("priority", ["d1", "d2", "d3"]),
    ("cheapest", ["d3", "d1", "d2"]),
    ("latency", ["d3", "d2", "d1"]),
])
def test_routing_strategies_pick_the_first_candidate(strategy: str, expected: list[str]) -> None:
    rig = Rig(config(strategy))
    rig.holds.prices_now = {"c1": _Price(5, 5), "c2": _Price(20, 1), "c3": _Price(1, 1)}
    rig.breakers["d1"].record_success(0.5)
    rig.breakers["d2"].record_success(0.1)
    assert [d.name for d in order(rig.cfg.aliases["m"], rig.cfg, rig.holds.prices_now, rig.breakers)] == (
        expected if strategy != "latency" else ["d3", "d2", "d1"])
    res = _run(rig.call(False))
    assert res.deployment.name == expected[0]  # type: ignore[attr-defined]


def test_weighted_routing_follows_the_weights() -> None:
    rig = Rig(config("weighted"))  # weights 1, 2, 3
    random.seed(7)
    firsts = [order(rig.cfg.aliases["m"], rig.cfg, {}, rig.breakers)[0].name for _ in range(3000)]
    share = {n: firsts.count(n) / len(firsts) for n in ("d1", "d2", "d3")}
    assert 0.12 < share["d1"] < 0.22 and 0.28 < share["d2"] < 0.39 and 0.44 < share["d3"] < 0.56


def test_cheapest_without_prices_keeps_the_config_order() -> None:
    rig = Rig(config("cheapest"))
    res = _run(rig.call(False))
    assert res.deployment.name == "d1"  # type: ignore[attr-defined]


def test_a_call_past_its_deadline_is_deadline_exceeded_with_its_attempts() -> None:
    rig = Rig(config())
    rig.providers.script["m1"] = [K.TIMEOUT]

    async def slow_place(*args: object) -> object:
        rig.clock.now += 5.0
        return await type(rig.holds).place(rig.holds, *args)  # type: ignore[arg-type]

    rig.holds.place = slow_place  # type: ignore[method-assign, assignment]
    with pytest.raises(E.DeadlineExceeded) as caught:
        _run(rig.call(False, remaining=4.0))
    assert caught.value.metadata["attempts"] == "1"
    assert rig.breakers["d1"].failures == 0  # cut by the agent's deadline: says nothing about d1


def test_success_settles_with_the_usage_and_the_cost() -> None:
    rig = Rig(config())
    res = _run(rig.call(False))
    assert res.usage.input_tokens == 3 and res.cost_nanos == 3 + 20  # type: ignore[attr-defined]
    assert [(s[0], s[1], s[2]) for s in rig.holds.settled] == [("r-1", "d1", Settled.SUCCESS)]
    assert OK not in rig.creds.script.values()


@dataclass(frozen=True)
class _Price:
    input_per_mtok_nanos: int
    output_per_mtok_nanos: int
    cached_input_per_mtok_nanos: int = 0


def test_domain_outcomes_are_the_wire_enums_by_name_and_number() -> None:
    from igw.ledger.v1 import ledger_pb2
    from igw.router.v1 import router_pb2

    for o in Outcome:
        assert router_pb2.AttemptOutcome.Value(f"ATTEMPT_OUTCOME_{o.name}") == o.value
    assert len(Outcome) == len(router_pb2.AttemptOutcome.values()) - 1  # all but UNSPECIFIED
    for s in Settled:
        assert ledger_pb2.CallOutcome.Value(f"CALL_OUTCOME_{s.name}") == s.value


def test_router_files_stay_short_and_the_call_engine_imports_no_grpc() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "services" / "router"
    for path in [*root.glob("*.py"), *root.glob("call/*.py")]:
        assert len(path.read_text(encoding="utf-8").splitlines()) <= 400, path.name
    for name in ("domain", "ports", "plan", "engine", "relay"):
        text = (root / "call" / f"{name}.py").read_text(encoding="utf-8")
        assert "import grpc" not in text and "_pb2" not in text, name


def test_a_stream_the_agent_leaves_is_settled_as_cancelled_with_what_it_was_sent() -> None:
    rig = Rig(config())

    async def leave_after_first_delta() -> None:
        events = rig.engine.stream(rig.request(), 30.0)
        assert type(await events.__anext__()).__name__ == "Started"
        assert type(await events.__anext__()).__name__ == "TextDelta"
        await events.aclose()  # type: ignore[attr-defined]

    _run(leave_after_first_delta())
    [(_, dep, outcome, usage)] = rig.holds.settled
    assert (dep, outcome, usage.reported) == ("d1", Settled.CANCELLED, False)
    assert usage.input_tokens == 100 and usage.output_tokens >= 1  # the upper bound; never less than sent
    assert rig.engine.in_flight == 0 and rig.holds.freed == []


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_a_sliced_call_is_answered_only_once_its_draw_is_recorded(stream: bool) -> None:
    # A hold drawn from a budget slice: the ledger must have recorded the draw (or the settle)
    # before the answer (or the stream's final event) goes out, so a router killed right after
    # leaves the ledger an entry to capture under this call's request id.
    rig = Rig(config())
    order: list[str] = []

    async def ack() -> bool:
        await asyncio.sleep(0.01)
        order.append("acked")
        return True

    rig.holds.settle_ack = ack

    async def go() -> None:
        if not stream:
            await rig.engine.unary(rig.request(), 30.0)
            order.append("answered")
            return
        async for ev in rig.engine.stream(rig.request(), 30.0):
            order.append(type(ev).__name__)

    _run(go())
    assert order[-2:] == ["acked", "answered" if not stream else "CallResult"]
    assert rig.engine.metrics.settles_unconfirmed._value.get() == 0


@pytest.mark.parametrize("outcome", ["refused", "late"])
def test_an_unrecorded_draw_still_answers_but_is_counted(
    outcome: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    # The provider was paid: the agent gets its answer (an error would make it pay again), and
    # the metric and an error log (request id only) say the entry is not yet durable.
    from services.router.call import engine as engine_mod

    monkeypatch.setattr(engine_mod, "RECORD_WAIT_S", 0.05)
    rig = Rig(config())

    async def ack() -> bool:
        if outcome == "late":
            await asyncio.sleep(5)
        return False

    rig.holds.settle_ack = ack
    res = _run(rig.call(False))
    assert res.request_id == "r-1"  # type: ignore[attr-defined]
    assert rig.engine.metrics.settles_unconfirmed._value.get() == 1
    [rec] = [r for r in caplog.records if "acknowledged the draw record" in r.getMessage()]
    assert rec.request_id == "r-1" and "hello" not in rec.getMessage()  # type: ignore[attr-defined]

"""The ledger's plpgsql results are decoded once, into typed values; a shape the code does not
know is a ResultShapeError that names the function, never a bare KeyError."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from services.ledger import domain as D
from services.ledger import results as R

RESERVATION_ID = "0b3f0e0c-8f9e-4a4b-9b4e-6d1c2f3a4b5c"
BUDGET = {"team": "t", "agent": "", "run": "", "window": 3, "limit": 1000, "soft": 800, "spent": 100,
          "held": 50, "start_us": 1_700_000_000_000_000}
HOLD = {"id": RESERVATION_ID, "request_id": "r1", "attempt": 0, "team": "t", "agent": "a", "model": "m",
        "amount": 42, "price_version": 1, "state": "OPEN", "created_us": 1_700_000_000_000_000,
        "expires_us": 1_700_000_300_000_000}
ENTRY = {"id": 7, "request_id": "r1", "reservation_id": RESERVATION_ID, "team": "t", "agent": "a", "model": "m",
         "provider": "p", "provider_model": "pm", "input": 10, "output": 5, "cached": 2, "cost": 40, "held": 42,
         "price_version": 1, "outcome": 1, "flags": 0, "latency_us": 1234, "created_us": 1_700_000_001_000_000,
         "reserve_us": 1_700_000_000_000_000}
CROSSING = {"team": "t", "agent": "", "window": 3, "soft": 800, "spent": 850}


def test_a_granted_hold_decodes_to_its_hold_and_budgets() -> None:
    held = R.decode_hold({"result": "OK", "hold": HOLD, "budgets": [BUDGET], "replayed": False})
    assert held.outcome is R.HoldOutcome.GRANTED
    assert held.hold is not None
    assert held.hold.reservation_id == uuid.UUID(RESERVATION_ID)
    assert held.hold.amount_nanos == 42
    assert held.hold.slice_calls == 0
    assert [b.remaining_nanos for b in held.budgets] == [850]
    assert held.budgets[0].window is D.Window(3)
    assert held.replayed is False


def test_a_denied_hold_carries_the_budget_that_refused_and_the_amount() -> None:
    held = R.decode_hold({"result": "DENIED", "budget": BUDGET, "amount": 5000})
    assert held.outcome is R.HoldOutcome.DENIED
    assert held.denied_by is not None and held.denied_by.limit_nanos == 1000
    assert held.amount_nanos == 5000
    assert held.hold is None


def test_a_rate_limited_hold_says_which_limit_and_when_to_retry() -> None:
    raw = {"result": "RATE_LIMITED", "agent": "a", "rpm": 10, "tpm": 1000, "requests": 10, "tokens": "250.0",
           "retry_us": 1_500_000}
    held = R.decode_hold(raw)
    assert held.outcome is R.HoldOutcome.RATE_LIMITED
    assert held.rate == R.RateRefusal("a", 10, 1000, 10, 250, 1_500_000)
    assert held.rate.kind == "requests"
    tokens = R.decode_hold({**raw, "requests": 3})
    assert tokens.rate is not None and tokens.rate.kind == "tokens"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"result": "NO_SLICE", "amount": 9}, R.HoldResult(R.HoldOutcome.NO_SLICE, amount_nanos=9)),
        ({"result": "RATE_TOO_LARGE", "agent": "", "tpm": 100, "tokens": 500},
         R.HoldResult(R.HoldOutcome.RATE_TOO_LARGE, rate=R.RateRefusal("", 0, 100, 0, 500, 0))),
        ({"result": "NOT_PRICED", "price_version": 3}, R.HoldResult(R.HoldOutcome.NOT_PRICED, price_version=3)),
        ({"result": "MISMATCH"}, R.HoldResult(R.HoldOutcome.MISMATCH)),
        ({"result": "ALREADY_SETTLED"}, R.HoldResult(R.HoldOutcome.ALREADY_SETTLED)),
        ({"result": "COST_OVERFLOW"}, R.HoldResult(R.HoldOutcome.COST_OVERFLOW)),
        ({"result": "NO_BUDGET"}, R.HoldResult(R.HoldOutcome.NO_BUDGET)),
        ({"result": "REQUEST_RELEASED"}, R.HoldResult(R.HoldOutcome.REQUEST_RELEASED)),
    ],
)
def test_every_other_hold_outcome_decodes(raw: dict[str, Any], expected: R.HoldResult) -> None:
    assert R.decode_hold(raw) == expected


def test_every_hold_outcome_the_sql_returns_has_a_member() -> None:
    assert {o.value for o in R.HoldOutcome} == {
        "OK", "DENIED", "NO_SLICE", "RATE_LIMITED", "RATE_TOO_LARGE", "NOT_PRICED", "MISMATCH",
        "ALREADY_SETTLED", "COST_OVERFLOW", "NO_BUDGET", "REQUEST_RELEASED"}


def test_a_settle_decodes_its_entry_budgets_and_crossings() -> None:
    settled = R.decode_settle({"result": "OK", "entry": ENTRY, "replayed": False, "budgets": [BUDGET],
                               "crossings": [CROSSING], "was_state": "RELEASED"})
    assert settled.outcome is R.SettleOutcome.SETTLED
    assert settled.entry is not None
    assert settled.entry.usage == D.Usage(10, 5, 2)
    assert settled.entry.outcome is D.Outcome(1)
    assert settled.was_released and not settled.captured and not settled.replayed
    assert settled.crossings == (R.Crossing("t", "", D.Window(3), 800, 850),)
    assert len(settled.budgets) == 1


def test_a_settle_after_capture_is_flagged() -> None:
    settled = R.decode_settle({"result": "OK", "entry": ENTRY, "replayed": True, "captured": True})
    assert settled.captured and settled.replayed
    assert settled.budgets == () and settled.crossings == ()


@pytest.mark.parametrize("result", ["MISMATCH", "NOT_FOUND", "NO_OPEN_HOLD", "RESERVATION_MISMATCH",
                                    "COST_OVERFLOW"])
def test_settle_refusals_decode_to_their_outcome(result: str) -> None:
    assert R.decode_settle({"result": result}) == R.SettleResult(R.SettleOutcome(result))


def test_settle_not_priced_carries_the_version() -> None:
    assert R.decode_settle({"result": "NOT_PRICED", "price_version": 4}).price_version == 4


def test_release_capture_and_budgets_decode() -> None:
    assert R.decode_release({"result": "NOT_FOUND"}) == R.ReleaseResult(found=False, released=False)
    assert R.decode_release({"result": "OK", "released": True}) == R.ReleaseResult(found=True, released=True)
    assert R.decode_released_count({"released": 2}) == 2
    capture = R.decode_capture({"captured": [{"id": RESERVATION_ID, "request_id": "r1", "team": "t",
                                              "amount": 42}], "freed": 1, "crossings": [CROSSING]})
    assert capture.captured == (R.CapturedHold(RESERVATION_ID, "r1", "t", 42),)
    assert capture.freed == 1 and len(capture.crossings) == 1
    assert [b.team for b in R.decode_budgets([BUDGET])] == ["t"]
    assert R.decode_budgets(None) == []


@pytest.mark.parametrize(
    ("decode", "raw", "names"),
    [
        (R.decode_hold, {"result": "GRANTED_TWICE"}, "ledger_hold: unknown result 'GRANTED_TWICE'"),
        (R.decode_hold, {"result": "OK", "budgets": []}, "ledger_hold: unexpected shape (KeyError"),
        (R.decode_hold, {"hold": HOLD}, "ledger_hold: unexpected shape (KeyError"),
        (R.decode_hold, None, "ledger_hold: expected a JSON object"),
        (R.decode_settle, {"result": "SETTLED"}, "ledger_settle: unknown result 'SETTLED'"),
        (R.decode_settle, {"result": "OK", "entry": {**ENTRY, "cost": None}, "replayed": False},
         "ledger_settle: unexpected shape (TypeError"),
        (R.decode_release, [], "ledger_release: expected a JSON object"),
        (R.decode_capture, {"captured": []}, "ledger_capture: unexpected shape (KeyError"),
        (R.decode_budgets, {"team": "t"}, "ledger_budgets: expected a JSON array"),
    ],
)
def test_an_unknown_shape_is_a_clear_error_not_a_key_error(decode: Any, raw: object, names: str) -> None:
    with pytest.raises(R.ResultShapeError) as caught:
        decode(raw)
    assert not isinstance(caught.value, KeyError)
    assert str(caught.value).startswith(names)


def test_results_are_frozen() -> None:
    held = R.decode_hold({"result": "NO_BUDGET"})
    with pytest.raises(AttributeError):
        held.outcome = R.HoldOutcome.GRANTED  # type: ignore[misc]

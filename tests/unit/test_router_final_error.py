"""When every candidate of a model fails, the agent's status follows the cause, the error lists
each attempt, and the client decodes it into a typed error that it does not retry."""

from __future__ import annotations

import grpc
import pytest

from igw.client import ModelMisconfigured, NoCandidates, RateLimited, error_from_rpc_error
from igw.router.v1 import router_pb2
from services.cli.output import format_error
from services.common import errors as E
from services.router.service import DEFAULT_RETRY_DELAY_S, AttemptLog, final_error

OUT = router_pb2


def _log(*attempts: tuple[str, int, int, str, float | None]) -> AttemptLog:
    log = AttemptLog()
    for dep, outcome, status, cause, retry_after in attempts:
        att = router_pb2.Attempt(deployment=dep, provider="p", outcome=outcome, http_status=status)  # type: ignore[arg-type]
        if retry_after is not None:
            att.retry_after.FromNanoseconds(int(retry_after * 1e9))
        log.items.append(att)
        log.causes.append(cause)
    return log


class _Rpc(grpc.RpcError):
    def __init__(self, status: grpc.Status) -> None:
        self.status = status

    def code(self) -> grpc.StatusCode:
        return self.status.code

    def details(self) -> str:
        return self.status.details

    def trailing_metadata(self) -> object:
        return self.status.trailing_metadata


def _received(err: E.IgwError) -> object:
    """The error as the agent's client decodes it from the wire."""
    return error_from_rpc_error(_Rpc(E.to_status(err, "router.igw")))


def test_a_provider_refusing_the_key_is_failed_precondition_with_the_attempt_and_its_status() -> None:
    err = final_error("solo", _log(("oa-solo", OUT.ATTEMPT_OUTCOME_AUTH_FAILED, 401, "auth_failed", None)))
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION and err.reason == "PROVIDER_AUTH_FAILED"
    assert "oa-solo" in err.message and "refused the credential (HTTP 401)" in err.message
    assert err.metadata["attempt_1_deployment"] == "oa-solo"
    assert err.metadata["attempt_1_outcome"] == "AUTH_FAILED"
    assert err.metadata["attempt_1_http_status"] == "401"
    got = _received(err)
    assert isinstance(got, ModelMisconfigured) and not got.retryable
    assert got.attempts == [{"deployment": "oa-solo", "outcome": "AUTH_FAILED", "http_status": "401",
                             "cause": "auth_failed"}]
    printed = format_error(got)  # type: ignore[arg-type]
    assert printed.startswith("error: FAILED_PRECONDITION PROVIDER_AUTH_FAILED: model 'solo' has no usable")
    assert "attempt 1: oa-solo auth_failed HTTP 401" in printed


@pytest.mark.parametrize(("cause", "reason"), [
    ("NO_ACTIVE_KEY", "NO_CREDENTIAL"), ("TEAM_NOT_ALLOWED", "NO_CREDENTIAL"),
    ("LEASE_BASE_URL_MISMATCH", "LEASE_BASE_URL_MISMATCH"),
])
def test_no_key_or_a_key_for_another_url_is_failed_precondition(cause: str, reason: str) -> None:
    err = final_error("m", _log(("d", OUT.ATTEMPT_OUTCOME_NO_CREDENTIAL, 0, cause, None)))
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, reason)
    assert err.metadata["attempt_1_cause"] == cause and err.metadata["attempt_1_outcome"] == "NO_CREDENTIAL"


def test_different_configuration_problems_together_are_deployments_misconfigured() -> None:
    err = final_error("m", _log(("a", OUT.ATTEMPT_OUTCOME_AUTH_FAILED, 403, "auth_failed", None),
                                ("b", OUT.ATTEMPT_OUTCOME_NO_CREDENTIAL, 0, "NO_ACTIVE_KEY", None)))
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "DEPLOYMENTS_MISCONFIGURED")
    assert err.metadata["attempts"] == "2" and err.metadata["attempt_2_deployment"] == "b"


@pytest.mark.parametrize("cause", ["VAULT_UNAVAILABLE", "VAULT_UNAVAILABLE:AUDIT_UNAVAILABLE"])
def test_a_vault_that_cannot_be_reached_is_unavailable_not_a_configuration_problem(cause: str) -> None:
    err = final_error("m", _log(("d", OUT.ATTEMPT_OUTCOME_NO_CREDENTIAL, 0, cause, None)))
    assert (err.code, err.reason) == (grpc.StatusCode.UNAVAILABLE, "ALL_CANDIDATES_FAILED")
    assert not _received(err).retryable  # type: ignore[attr-defined]


def test_all_rate_limited_or_overloaded_is_resource_exhausted_with_the_providers_retry_after() -> None:
    err = final_error("m", _log(("a", OUT.ATTEMPT_OUTCOME_RATE_LIMITED, 429, "rate_limited", 7.0),
                                ("b", OUT.ATTEMPT_OUTCOME_OVERLOADED, 529, "overloaded", None),
                                ("a", OUT.ATTEMPT_OUTCOME_RATE_LIMITED, 429, "rate_limited", 3.0),
                                ("c", OUT.ATTEMPT_OUTCOME_AUTH_FAILED, 401, "auth_failed", None)))
    assert (err.code, err.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "UPSTREAM_RATE_LIMITED")
    assert err.retry_delay_s == 3.0  # the soonest any deployment said it would take calls again
    got = _received(err)
    assert isinstance(got, RateLimited) and got.retry_delay == 3.0 and not got.retryable
    assert "(retry after 3s)" in format_error(got)


def test_overload_without_a_retry_after_still_says_when_to_retry() -> None:
    err = final_error("m", _log(("a", OUT.ATTEMPT_OUTCOME_OVERLOADED, 503, "overloaded", None)))
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.retry_delay_s == DEFAULT_RETRY_DELAY_S


def test_server_errors_are_unavailable_and_carry_a_retry_after_when_a_provider_gave_one() -> None:
    err = final_error("m", _log(("a", OUT.ATTEMPT_OUTCOME_SERVER_ERROR, 500, "server_error", None),
                                ("b", OUT.ATTEMPT_OUTCOME_RATE_LIMITED, 429, "rate_limited", 2.0)))
    assert (err.code, err.reason, err.retry_delay_s) == (grpc.StatusCode.UNAVAILABLE, "ALL_CANDIDATES_FAILED", 2.0)
    got = _received(err)
    assert isinstance(got, NoCandidates) and got.retry_delay == 2.0 and not got.retryable
    plain = final_error("m", _log(("a", OUT.ATTEMPT_OUTCOME_TIMEOUT, 0, "timeout", None)))
    assert plain.code == grpc.StatusCode.UNAVAILABLE and plain.retry_delay_s is None


def test_every_breaker_open_is_unavailable() -> None:
    err = final_error("m", _log(("a", OUT.ATTEMPT_OUTCOME_BREAKER_OPEN, 0, "breaker_open", None)))
    assert (err.code, err.reason) == (grpc.StatusCode.UNAVAILABLE, "ALL_BREAKERS_OPEN")


def test_no_attempt_at_all_is_unavailable_not_a_configuration_problem() -> None:
    err = final_error("m", AttemptLog())
    assert (err.code, err.reason) == (grpc.StatusCode.UNAVAILABLE, "ALL_CANDIDATES_FAILED")

"""The Router's use cases: one agent call, end to end, with fallbacks, budgets and leases.

For each candidate deployment: ``Ledger.Reserve`` and ``KeyVault.IssueCredential``
concurrently; the provider is called with the lease's secret at the config's base URL
only; retryable failures before any byte reached the agent release the hold, feed the
breaker and move on; success answers the agent, then settles in the background,
retried until the ledger acknowledges.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import httpx
from google.protobuf import duration_pb2

from igw.keyvault.v1 import keyvault_pb2, keyvault_pb2_grpc
from igw.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from igw.router.v1 import router_pb2
from services.common import errors as E
from services.common.errors import error_info_from_rpc_error, retry_delay_from_rpc_error
from services.common.identity import Identity
from services.common.money import call_cost
from services.common.tracing import annotate_genai, attempt_failed, attempt_span, attempt_usage, end_span
from services.router.breaker import Breaker, State
from services.router.metrics import RouterMetrics
from services.router.providers.base import estimate_tokens
from services.router.providers.domain import (
    ChatResponse,
    FinishReason,
    StreamEnd,
    TextDelta,
    Timeouts,
    ToolCall,
    ToolCallDelta,
    Usage,
    UsageSoFar,
)
from services.router.providers.errors import ErrorKind, ProviderError
from services.router.providers.registry import get_adapter
from services.router.routing import Alias, Deployment, RoutingConfig
from services.router.settler import LeaseEnder, Settler, release_hold, release_request
from services.router.slices import SliceBook, SliceHold
from services.router.translate import FINISH_TO_PB, Prepared, prepare, valid_request_id

_LOGGER = logging.getLogger(__name__)

_OUTCOME = {
    ErrorKind.RATE_LIMITED: router_pb2.ATTEMPT_OUTCOME_RATE_LIMITED,
    ErrorKind.OVERLOADED: router_pb2.ATTEMPT_OUTCOME_OVERLOADED,
    ErrorKind.SERVER_ERROR: router_pb2.ATTEMPT_OUTCOME_SERVER_ERROR,
    ErrorKind.TIMEOUT: router_pb2.ATTEMPT_OUTCOME_TIMEOUT,
    ErrorKind.CONNECT_ERROR: router_pb2.ATTEMPT_OUTCOME_CONNECT_ERROR,
    ErrorKind.CONTEXT_TOO_LONG: router_pb2.ATTEMPT_OUTCOME_CONTEXT_TOO_LONG,
    ErrorKind.CONTENT_REFUSED: router_pb2.ATTEMPT_OUTCOME_CONTENT_REFUSED,
    ErrorKind.BAD_REQUEST: router_pb2.ATTEMPT_OUTCOME_BAD_REQUEST,
    ErrorKind.AUTH_FAILED: router_pb2.ATTEMPT_OUTCOME_AUTH_FAILED,
    ErrorKind.PROTOCOL_ERROR: router_pb2.ATTEMPT_OUTCOME_PROTOCOL_ERROR,
    ErrorKind.REDIRECT_REFUSED: router_pb2.ATTEMPT_OUTCOME_PROTOCOL_ERROR,
}
# Errors that go straight back to the agent: another deployment would say the same.
_TERMINAL = {
    ErrorKind.BAD_REQUEST: ("UPSTREAM_BAD_REQUEST", E.InvalidArgument),
    ErrorKind.CONTENT_REFUSED: ("CONTENT_REFUSED", E.FailedPrecondition),
}
# Deployment-specific failures: skip this deployment, try the others, do not feed the breaker.
_SKIP = {ErrorKind.AUTH_FAILED, ErrorKind.REDIRECT_REFUSED}
_BREAKER_GAUGE = {State.CLOSED: 0, State.OPEN: 1, State.HALF_OPEN: 2}
# Ledger refusals that say no hold was placed (a Reserve whose answer is anything else may have
# left one: the call then releases its request id when it ends).
_NO_HOLD = frozenset({
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT,
})
# IssueCredential gets this long whatever the call's deadline: a lease issued after the caller
# left is still learnt, and returned (EndLease) so the audit shows it closed.
_VAULT_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Backends:
    """Long-lived stubs to the ledger and the vault (mTLS with the router's certificate)."""

    ledger: ledger_pb2_grpc.LedgerServiceStub
    ledger_admin: ledger_pb2_grpc.LedgerAdminServiceStub
    vault: keyvault_pb2_grpc.KeyVaultServiceStub


@dataclass
class PriceBook:
    """Price catalogue versions fetched from the ledger, cached by version (they never change)."""

    admin: ledger_pb2_grpc.LedgerAdminServiceStub
    versions: dict[int, dict[str, ledger_pb2.ModelPrice]] = field(default_factory=dict)
    current_version: int = 0
    fetched_at: float = 0.0

    async def get(self, version: int) -> dict[str, ledger_pb2.ModelPrice]:
        """The prices of one version (0: the current one, refreshed every 30 s)."""
        if version and version in self.versions:
            return self.versions[version]
        if not version and self.current_version and time.monotonic() - self.fetched_at < 30:
            return self.versions[self.current_version]
        resp = await self.admin.ListPrices(ledger_pb2.ListPricesRequest(version=version), timeout=5)
        prices = {p.model: p for p in resp.prices}
        self.versions[resp.version] = prices
        if not version:
            self.current_version, self.fetched_at = resp.version, time.monotonic()
        return prices


@dataclass
class AttemptLog:
    """The attempts of one call, for the answer and for metrics.

    ``causes[i]`` says more than ``items[i].outcome`` where we know more: the provider error
    kind (``auth_failed``, ``redirect_refused``...), the vault's reason for issuing no
    credential (``NO_ACTIVE_KEY``, ``VAULT_UNAVAILABLE``...), ``LEASE_BASE_URL_MISMATCH``.
    """

    items: list[router_pb2.Attempt] = field(default_factory=list)
    causes: list[str] = field(default_factory=list)

    def add(
        self, dep: Deployment, outcome: router_pb2.AttemptOutcome, start: float,
        err: ProviderError | None = None, cause: str = "",
    ) -> None:
        att = router_pb2.Attempt(deployment=dep.name, provider=dep.provider, outcome=outcome)
        att.latency.FromNanoseconds(int((time.perf_counter() - start) * 1e9))
        if err is not None:
            att.http_status = err.status_code or 0
            if err.retry_after_s is not None:
                att.retry_after.FromNanoseconds(int(err.retry_after_s * 1e9))
            cause = cause or err.kind.value
        self.items.append(att)
        self.causes.append(cause)


@dataclass
class _Lease:
    hold: ledger_pb2.ReserveResponse
    secret: str
    # Set when the hold was drawn from a budget slice (no Reserve): settled against the slice,
    # given back to it (not released) when the attempt fails.
    slice: SliceHold | None = None
    # How to end the vault lease (EndLease, without its end and reason); None once ended.
    end: keyvault_pb2.EndLeaseRequest | None = None


class Router:
    """Routes agent calls. One instance per process; the config can be swapped atomically."""

    def __init__(
        self,
        config: RoutingConfig,
        backends: Backends,
        http: httpx.AsyncClient,
        metrics: RouterMetrics,
        *,
        lease_ttl_s: int = 30,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backends = backends
        self.http = http
        self.metrics = metrics
        self.prices = PriceBook(backends.ledger_admin)
        self.lease_ttl_s = lease_ttl_s
        self._clock = clock
        self.breakers: dict[str, Breaker] = {}
        self._in_flight = 0
        self._settles: set[asyncio.Task[None]] = set()
        self.settler = Settler(backends.ledger, metrics)
        self.lease_ends = LeaseEnder(backends.vault, metrics)
        self.slices = SliceBook(backends.ledger, self.prices, metrics)
        self.config = config
        self.apply_config(config)

    # ------------------------------------------------------------------ config

    def apply_config(self, config: RoutingConfig) -> None:
        """Makes ``config`` active; breakers of deployments that stay are kept."""
        breakers: dict[str, Breaker] = {}
        for name in config.deployments:
            old = self.breakers.get(name)
            if old is not None and old.cfg == config.breaker:
                breakers[name] = old
            else:
                breakers[name] = self._new_breaker(name, config)
        self.breakers = breakers
        old_sha = getattr(self, "config", None)
        if old_sha is not None and old_sha.sha256 != config.sha256:
            with contextlib.suppress(KeyError):
                self.metrics.config_info.remove(old_sha.sha256)
        self.config = config
        self.metrics.config_info.labels(config.sha256).set(1)

    def _new_breaker(self, name: str, config: RoutingConfig) -> Breaker:
        gauge = self.metrics.breaker_state.labels(name)
        gauge.set(0)
        return Breaker(config.breaker, clock=self._clock, on_change=lambda st: gauge.set(_BREAKER_GAUGE[st]))

    # ------------------------------------------------------------------ planning

    def _alias(self, ident: Identity, model: str, cfg: RoutingConfig) -> Alias:
        alias = cfg.aliases.get(model)
        if alias is None:
            raise E.NotFound("UNKNOWN_MODEL", "no such model alias", {"model": model[:128]})
        if not alias.allows(ident.team):
            raise E.PermissionDenied("MODEL_NOT_ALLOWED", "your team may not use this model", {"model": model})
        return alias

    def _order(self, alias: Alias, cfg: RoutingConfig, prices: dict[str, ledger_pb2.ModelPrice]) -> list[Deployment]:
        deps = [cfg.deployments[c] for c in alias.candidates]
        if alias.strategy == "cheapest":

            def unit_cost(d: Deployment) -> int:
                p = prices.get(d.price)
                return (p.input_per_mtok_nanos + p.output_per_mtok_nanos) if p else 1 << 62

            deps.sort(key=unit_cost)
        elif alias.strategy == "latency":
            # Unobserved deployments first (explore), then by smoothed first-byte latency.
            def lat(d: Deployment) -> float:
                ewma = self.breakers[d.name].latency_ewma_s
                return -1.0 if ewma is None else ewma

            deps.sort(key=lat)
        elif alias.strategy == "weighted":
            pool = [d for d in deps if d.weight > 0]
            ordered: list[Deployment] = []
            while pool:
                pick = random.choices(pool, weights=[d.weight for d in pool])[0]
                ordered.append(pick)
                pool.remove(pick)
            deps = ordered
        return deps

    # ------------------------------------------------------------------ one call

    def _admit(self) -> None:
        if self._in_flight >= self.config.limits.max_in_flight:
            self.metrics.overload_rejections.inc()
            raise E.ResourceExhausted("ROUTER_OVERLOADED", "too many calls in flight; retry shortly")
        self._in_flight += 1
        self.metrics.in_flight.inc()

    def _leave(self) -> None:
        self._in_flight -= 1
        self.metrics.in_flight.dec()

    async def _lease(
        self, ident: Identity, rid: str, attempt: int, dep: Deployment, prep: Prepared, cfg: RoutingConfig,
        timeout: float, hold_sent: Callable[[], None] | None = None, run_id: str = "", run_cap_nanos: int = 0,
    ) -> _Lease:
        """A hold (Reserve, or drawn from a budget slice) and a credential (IssueCredential),
        concurrently. Raises IgwError or _SkipDeployment. ``hold_sent`` is called just before a
        Reserve goes out. A credential that comes back unused, now or after the caller left, is
        returned to the vault with the reason (EndLease)."""
        provider = cfg.providers[dep.provider]
        issue: asyncio.Future[keyvault_pb2.IssueCredentialResponse] = asyncio.ensure_future(
            self.backends.vault.IssueCredential(
                keyvault_pb2.IssueCredentialRequest(
                    provider=dep.provider, team=ident.team, model=dep.model, request_id=rid,
                    ttl=duration_pb2.Duration(seconds=self.lease_ttl_s),
                ),
                timeout=max(timeout, _VAULT_TIMEOUT_S),
            )
        )
        drawn: SliceHold | None = None
        # Both calls are in flight at once (a gRPC aio call starts when it is created).
        hold: ledger_pb2.ReserveResponse | BaseException
        try:
            # A call of a run takes its own hold: the run's cap is one more budget of that hold.
            if cfg.budget_slices.applies(ident.team) and not run_id:
                drawn = await self.slices.draw(
                    ident.team, ident.agent, dep.price, prep.prompt_tokens_upper_bound,
                    prep.chat.max_output_tokens, cfg, timeout, dep.provider,
                )
            if drawn is not None:
                hold = drawn.response()
            else:
                if hold_sent is not None:
                    hold_sent()
                reserve = ledger_pb2.ReserveRequest(
                    request_id=rid, attempt=attempt, team=ident.team, agent=ident.agent, model=dep.price,
                    prompt_tokens_upper_bound=prep.prompt_tokens_upper_bound,
                    max_output_tokens=prep.chat.max_output_tokens, provider=dep.provider,
                    run_id=run_id, run_cap_nanos=run_cap_nanos,
                )
                # Exact at the limit: a refusal while this router holds the team's slices gives them back first.
                hold = await self.slices.reserve(
                    ident.team, lambda: self.backends.ledger.Reserve(reserve, timeout=timeout), timeout)
        except asyncio.CancelledError:
            self._return_when_issued(issue, "CANCELLED", ident, rid, dep)
            raise
        except Exception as exc:
            hold = exc
        try:
            # asyncio.wait neither cancels the lease call on timeout nor when this task is cancelled.
            await asyncio.wait((issue,), timeout=timeout)
        except asyncio.CancelledError:
            if not isinstance(hold, BaseException):
                self._free(_Lease(hold, "", drawn), "cancelled")
            self._return_when_issued(issue, "CANCELLED", ident, rid, dep)
            raise
        lease: keyvault_pb2.IssueCredentialResponse | BaseException | None = None
        if issue.done():
            lease = issue.exception() or issue.result()
        if isinstance(hold, BaseException):
            err = _ledger_error(hold, ident.team, self.metrics)
            self._return_when_issued(issue, err.reason, ident, rid, dep)
            raise err
        held = _Lease(hold, "", drawn)
        if lease is None:
            self._free(held, "no_credential")
            self._return_when_issued(issue, "DEADLINE_EXCEEDED", ident, rid, dep)
            raise _SkipDeployment("DEADLINE_EXCEEDED")
        if isinstance(lease, BaseException):
            self._free(held, "no_credential")
            if isinstance(lease, grpc.RpcError) and lease.code() in (
                grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND,
            ):
                info = error_info_from_rpc_error(lease)
                transient = lease.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                reason = info.reason if info else lease.code().name
                if transient:  # e.g. VAULT_UNAVAILABLE:AUDIT_UNAVAILABLE; never a configuration problem
                    reason = "VAULT_UNAVAILABLE" if not info else f"VAULT_UNAVAILABLE:{info.reason}"
                raise _SkipDeployment(reason, transient=transient)
            raise lease
        held.end = _end_request(lease, ident, rid, dep)
        if lease.base_url.rstrip("/") != provider.base_url:
            # The vault bound this secret to another host: never send it to ours.
            self._free(held, "lease_url_mismatch")
            self._end_lease(held, False, "LEASE_BASE_URL_MISMATCH")
            _LOGGER.error("lease base URL differs from the routing config", extra={"deployment": dep.name})
            raise _SkipDeployment("LEASE_BASE_URL_MISMATCH")
        held.secret = lease.secret
        return held

    def _end_lease(self, lease: _Lease, used: bool, reason: str) -> None:
        """Tells the vault, in the background, how the attempt's lease ended (once)."""
        req, lease.end = lease.end, None
        if req is None:
            return
        req.end = keyvault_pb2.LEASE_END_USED if used else keyvault_pb2.LEASE_END_RETURNED
        req.reason = reason
        self.lease_ends.submit(req)  # grouped with other calls' ends (EndLeaseBatch)

    def _return_when_issued(
        self, issue: asyncio.Future[keyvault_pb2.IssueCredentialResponse], reason: str, ident: Identity, rid: str,
        dep: Deployment,
    ) -> None:
        """Returns the attempt's lease unused (EndLease) once the vault answers, if it issued one."""

        async def wait() -> None:
            try:
                lease = await issue
            except Exception:  # no lease was issued (or the answer is lost): nothing to return
                return
            req = _end_request(lease, ident, rid, dep)
            req.end, req.reason = keyvault_pb2.LEASE_END_RETURNED, reason
            self.lease_ends.submit(req)

        self._background(wait())

    def _release_request(self, rid: str, reason: str) -> None:
        """Frees, in the background, every hold of a call that ended early, including one its
        Reserve places after this (the ledger refuses that Reserve)."""
        self._background(self._release_request_now(rid, reason))

    async def _release_request_now(self, rid: str, reason: str) -> None:
        if await release_request(self.backends.ledger, rid, reason):
            self.metrics.request_releases.labels("sent").inc()
        else:
            self.metrics.request_releases.labels("unacknowledged").inc()
            _LOGGER.warning("release by request id not acknowledged; a hold left behind will expire")

    def _free(self, lease: _Lease, reason: str) -> None:
        """Frees an attempt's hold: back to its slice, or released in the ledger."""
        if lease.slice is not None:
            self.slices.give_back(lease.slice)
        else:
            self._release(lease.hold.reservation_id, reason)

    def _release(self, reservation_id: str, reason: str) -> None:
        self._background(self._release_now(reservation_id, reason))

    async def _release_now(self, reservation_id: str, reason: str) -> None:
        if not await release_hold(self.backends.ledger, reservation_id, reason):
            _LOGGER.warning("release not acknowledged; the hold will expire")

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._settles.add(task)
        task.add_done_callback(self._settles.discard)

    def _settle(
        self, rid: str, lease: _Lease, dep: Deployment, usage: Usage, latency_s: float,
        outcome: ledger_pb2.CallOutcome,
    ) -> None:
        req = ledger_pb2.SettleRequest(
            request_id=rid, reservation_id=lease.hold.reservation_id,
            usage=ledger_pb2.TokenUsage(
                input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
                cached_input_tokens=usage.cached_input_tokens,
            ),
            provider=dep.provider, provider_model=dep.model, outcome=outcome, usage_estimated=not usage.reported,
        )
        req.latency.FromNanoseconds(int(latency_s * 1e9))
        drawn = lease.slice
        self.settler.submit(req, None if drawn is None else lambda ok: self.slices.settled(drawn, ok))

    async def drain(self, timeout: float) -> None:
        """Waits for queued settles and background releases (graceful shutdown), ``timeout`` in all."""
        deadline = time.monotonic() + timeout
        await self.settler.drain(timeout)
        await self.slices.close(max(deadline - time.monotonic(), 0.0))
        if self._settles:
            await asyncio.wait(list(self._settles), timeout=max(deadline - time.monotonic(), 0.0))
        await self.lease_ends.drain(max(deadline - time.monotonic(), 0.0))

    async def _cost(self, hold: ledger_pb2.ReserveResponse, dep: Deployment, usage: Usage) -> int:
        try:
            prices = await self.prices.get(hold.price_version)
        except grpc.RpcError:
            return 0
        p = prices.get(dep.price)
        if p is None:
            return 0
        return call_cost(
            usage.input_tokens, usage.output_tokens, usage.cached_input_tokens,
            p.input_per_mtok_nanos, p.output_per_mtok_nanos, p.cached_input_per_mtok_nanos,
        )

    def _account(self, dep: Deployment, ident: Identity, usage: Usage, cost: int) -> None:
        m = self.metrics
        m.tokens.labels(dep.provider, dep.model, "input").inc(usage.input_tokens)
        m.tokens.labels(dep.provider, dep.model, "output").inc(usage.output_tokens)
        if usage.cached_input_tokens:
            m.tokens.labels(dep.provider, dep.model, "cached_input").inc(usage.cached_input_tokens)
        m.cost_nanos.labels(dep.provider, dep.model, ident.team).inc(cost)

    def _timeouts(self, cfg: RoutingConfig, remaining: float | None, probe: bool) -> Timeouts:
        t = cfg.timeouts
        total = t.total_ms / 1000
        if probe:
            total = min(total, cfg.breaker.probe_timeout_ms / 1000)
        if remaining is not None:
            total = min(total, max(remaining - 0.05, 0.001))
        return Timeouts(
            connect_s=min(t.connect_ms / 1000, total), first_byte_s=min(t.first_byte_ms / 1000, total),
            idle_s=t.idle_ms / 1000, total_s=total,
        )

    async def generate(
        self, ident: Identity, req: router_pb2.GenerateRequest, remaining: float | None,
    ) -> router_pb2.GenerateResponse:
        """One unary call. Raises IgwError for the agent."""
        return await _Call(self, ident, req, remaining).unary()

    def generate_stream(
        self, ident: Identity, req: router_pb2.GenerateRequest, remaining: float | None,
    ) -> AsyncIterator[router_pb2.GenerateStreamResponse]:
        """One streaming call."""
        return _Call(self, ident, req, remaining).stream()


def _end_request(
    lease: keyvault_pb2.IssueCredentialResponse, ident: Identity, rid: str, dep: Deployment,
) -> keyvault_pb2.EndLeaseRequest:
    """The EndLease of one lease, without its end and reason (no secret in it)."""
    return keyvault_pb2.EndLeaseRequest(
        lease_id=lease.lease_id, request_id=rid, provider=dep.provider, team=ident.team, model=dep.model,
        key_name=lease.key_name, key_version=lease.key_version,
    )


def _lease_end_of(exc: BaseException) -> tuple[bool, str]:
    """(used, reason) for a lease whose attempt ended in ``exc`` (not a ProviderError)."""
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return True, "CANCELLED"  # the request may have gone out: count the secret as used
    if isinstance(exc, ValueError):
        return False, "UNTRANSLATABLE"  # refused by the adapter before anything was sent
    return True, "ROUTER_ERROR"


class _SkipDeployment(Exception):
    """No credential for this deployment: ``reason`` from the vault (or ours); ``transient`` when
    the vault could not be reached in time (a configuration problem otherwise)."""

    def __init__(self, reason: str, *, transient: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


# How each attempt outcome counts when every candidate failed (see final_error).
_CONFIG_CAUSES = {ErrorKind.AUTH_FAILED.value, ErrorKind.REDIRECT_REFUSED.value}
_THROTTLED = {router_pb2.ATTEMPT_OUTCOME_RATE_LIMITED, router_pb2.ATTEMPT_OUTCOME_OVERLOADED}
# Without a retry-after from any provider, the hint for "all rate limited or overloaded".
DEFAULT_RETRY_DELAY_S = 1.0
_CONFIG_REASON = {
    ErrorKind.AUTH_FAILED.value: "PROVIDER_AUTH_FAILED",
    ErrorKind.REDIRECT_REFUSED.value: "PROVIDER_REDIRECT_REFUSED",
    "LEASE_BASE_URL_MISMATCH": "LEASE_BASE_URL_MISMATCH",
}


def _is_config(att: router_pb2.Attempt, cause: str) -> bool:
    """A configuration or credential problem: retrying changes nothing until an operator acts."""
    if att.outcome == router_pb2.ATTEMPT_OUTCOME_NO_CREDENTIAL:
        return not cause.startswith("VAULT_UNAVAILABLE")
    return cause in _CONFIG_CAUSES or att.outcome == router_pb2.ATTEMPT_OUTCOME_AUTH_FAILED


def _describe(att: router_pb2.Attempt, cause: str) -> str:
    """One attempt in words for the error message (names and codes only, never provider text)."""
    if att.outcome == router_pb2.ATTEMPT_OUTCOME_NO_CREDENTIAL:
        if cause == "LEASE_BASE_URL_MISMATCH":
            what = "the vault's key for this provider is bound to another base URL than the routing config's"
        else:
            what = f"the vault issued no credential ({cause or 'unknown'})"
    elif cause == ErrorKind.AUTH_FAILED.value or att.outcome == router_pb2.ATTEMPT_OUTCOME_AUTH_FAILED:
        what = "the provider refused the credential"
    elif cause == ErrorKind.REDIRECT_REFUSED.value:
        what = "the provider answered with a redirect (never followed)"
    else:
        what = router_pb2.AttemptOutcome.Name(att.outcome).removeprefix("ATTEMPT_OUTCOME_").lower().replace("_", " ")
    if att.http_status:
        what += f" (HTTP {att.http_status})"
    return f"{att.deployment}: {what}"


def final_error(model: str, log: AttemptLog) -> E.IgwError:
    """The agent's error when every candidate failed, its status chosen by the cause.

    - every tried deployment failed for configuration or credentials (no key, provider
      401/403, lease base URL mismatch, redirect): FAILED_PRECONDITION, never worth retrying;
    - the rest were all rate limited or overloaded: RESOURCE_EXHAUSTED
      ``UPSTREAM_RATE_LIMITED`` with RetryInfo (the shortest retry-after a provider gave);
    - every deployment's breaker open: UNAVAILABLE ``ALL_BREAKERS_OPEN``;
    - otherwise UNAVAILABLE ``ALL_CANDIDATES_FAILED`` (RetryInfo when a provider gave one).

    ErrorInfo metadata lists each attempt: ``attempt_<n>_deployment``, ``attempt_<n>_outcome``,
    ``attempt_<n>_http_status``, ``attempt_<n>_cause``, ``attempt_<n>_retry_after_ms``.
    """
    items, causes = log.items, log.causes
    meta = attempt_metadata(model, log)
    tried = [(a, c) for a, c in zip(items, causes, strict=True)
             if a.outcome != router_pb2.ATTEMPT_OUTCOME_BREAKER_OPEN]
    if items and not tried:
        return E.Unavailable("ALL_BREAKERS_OPEN", "every deployment of this model is failing", meta)
    if tried and tried[-1][0].outcome == router_pb2.ATTEMPT_OUTCOME_CONTEXT_TOO_LONG:
        return E.InvalidArgument("CONTEXT_TOO_LONG", "the prompt is longer than every candidate's context", meta)
    return _by_cause(model, tried, meta)


def attempt_metadata(model: str, log: AttemptLog) -> dict[str, object]:
    """ErrorInfo metadata naming each attempt of a failed call (see :func:`final_error`)."""
    meta: dict[str, object] = {"attempts": len(log.items), "model": model}
    for n, (att, cause) in enumerate(zip(log.items, log.causes, strict=True), start=1):
        meta[f"attempt_{n}_deployment"] = att.deployment
        meta[f"attempt_{n}_outcome"] = router_pb2.AttemptOutcome.Name(att.outcome).removeprefix("ATTEMPT_OUTCOME_")
        if att.http_status:
            meta[f"attempt_{n}_http_status"] = att.http_status
        if cause:
            meta[f"attempt_{n}_cause"] = cause
        if att.HasField("retry_after"):
            meta[f"attempt_{n}_retry_after_ms"] = att.retry_after.ToMilliseconds()
    return meta


def _by_cause(
    model: str, tried: list[tuple[router_pb2.Attempt, str]], meta: dict[str, object],
) -> E.IgwError:
    said = "; ".join(dict.fromkeys(_describe(a, c) for a, c in tried[:4]))
    if tried and all(_is_config(a, c) for a, c in tried):
        kinds = {_CONFIG_REASON.get(c, "NO_CREDENTIAL") for a, c in tried}
        reason = kinds.pop() if len(kinds) == 1 else "DEPLOYMENTS_MISCONFIGURED"
        return E.FailedPrecondition(
            reason, f"model {model!r} has no usable deployment: {said}; an operator must fix the key or config",
            meta,
        )
    delays = [a.retry_after.ToNanoseconds() / 1e9 for a, _ in tried if a.HasField("retry_after")]
    hint = min(delays) if delays else None
    live = [a for a, c in tried if not _is_config(a, c)]
    if live and all(a.outcome in _THROTTLED for a in live):
        return E.ResourceExhausted(
            "UPSTREAM_RATE_LIMITED", f"every deployment of model {model!r} is rate limited or overloaded: {said}",
            meta, retry_delay_s=DEFAULT_RETRY_DELAY_S if hint is None else hint,
        )
    return E.Unavailable(
        "ALL_CANDIDATES_FAILED", f"no deployment of model {model!r} could answer: {said}" if said
        else "no deployment of this model could answer", meta, retry_delay_s=hint,
    )


def _ledger_error(err: BaseException, team: str, metrics: RouterMetrics) -> E.IgwError:
    if not isinstance(err, grpc.RpcError):
        return E.Unavailable("LEDGER_UNAVAILABLE", "the budget ledger could not be reached")
    info = error_info_from_rpc_error(err)
    code = err.code()
    meta = dict(info.metadata) if info else {}
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        if info is not None and info.reason == "RATE_LIMITED":
            # The ledger's verdict and its RetryInfo, passed through to the agent.
            return E.ResourceExhausted(
                "RATE_LIMITED", "rate limit reached; retry later", meta, retry_delay_s=retry_delay_from_rpc_error(err))
        metrics.budget_denials.labels(team).inc()
        return E.ResourceExhausted(info.reason if info else "BUDGET_EXCEEDED", "team budget exhausted", meta)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        if info is not None and info.reason == "NO_BUDGET":
            metrics.budget_denials.labels(team).inc()
            return E.FailedPrecondition("NO_BUDGET", "your team has no budget; an operator must set one", meta)
        return E.FailedPrecondition(info.reason if info else "LEDGER_REFUSED", "the ledger refused the call", meta)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return E.InvalidArgument(info.reason if info else "LEDGER_REFUSED", "the ledger refused the request", meta)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return E.DeadlineExceeded("DEADLINE_EXCEEDED", "deadline passed while reserving budget")
    return E.Unavailable("LEDGER_UNAVAILABLE", "the budget ledger could not be reached")


class _Call:
    """One agent call's state machine (shared by unary and streaming)."""

    def __init__(
        self, router: Router, ident: Identity, req: router_pb2.GenerateRequest, remaining: float | None,
    ) -> None:
        self.r = router
        self.ident = ident
        self.req = req
        self.cfg = router.config
        self.start = time.perf_counter()
        self.deadline = None if remaining is None else time.monotonic() + remaining
        if req.request_id and not valid_request_id(req.request_id):
            raise E.InvalidArgument("BAD_REQUEST_ID", "request_id must be [A-Za-z0-9._:-], at most 128")
        if req.run_id and not valid_request_id(req.run_id):
            raise E.InvalidArgument("BAD_RUN_ID", "run_id must be [A-Za-z0-9._:-], at most 128")
        if req.run_cap_nanos < 0 or (req.run_cap_nanos and not req.run_id):
            raise E.InvalidArgument("BAD_RUN_CAP", "run_cap_nanos must be >= 0 and needs a run_id")
        self.rid = req.request_id or uuid.uuid4().hex
        self.alias = self.r._alias(ident, req.model, self.cfg)
        self.prep = prepare(req, self.cfg.limits)
        self.log = AttemptLog()
        self.excluded: set[str] = set()
        self.verdict: ProviderError | None = None
        # A Reserve of this call went out and its hold is neither owned by an attempt nor known
        # not to exist (answer lost, late, or the call ended while waiting): when the call ends
        # without an answer, the ledger releases the request id (covering a hold placed later).
        self.hold_unsure = False

    def _remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def _hold_sent(self) -> None:
        self.hold_unsure = True

    def _ended_early(self, reason: str) -> None:
        """The call ends without an answer: a hold it may have left behind goes (by request id)."""
        if self.hold_unsure:
            self.hold_unsure = False
            self.r._release_request(self.rid, reason)

    def _rpc_timeout(self) -> float:
        rem = self._remaining()
        return 5.0 if rem is None else max(min(rem, 5.0), 0.001)

    def _final_error(self) -> E.IgwError:
        remaining = self._remaining()
        # Attempts stop 50 ms short of the agent's deadline so the answer still reaches it.
        if remaining is not None and remaining < 0.1:
            meta = attempt_metadata(self.req.model, self.log)
            return E.DeadlineExceeded("DEADLINE_EXCEEDED", "deadline passed before any deployment answered", meta)
        return final_error(self.req.model, self.log)

    def _failed(self, dep: Deployment, ticket: bool | str, err: ProviderError, t0: float) -> None:
        """Bookkeeping for a failed attempt; raises for errors that go straight back."""
        r = self.r
        self.log.add(dep, _OUTCOME.get(err.kind, router_pb2.ATTEMPT_OUTCOME_SERVER_ERROR), t0, err)
        r.metrics.attempts.labels(dep.name, err.kind.value).inc()
        breaker = r.breakers[dep.name]
        # A timeout the agent's own deadline imposed says nothing about the deployment's health.
        cut_by_deadline = (err.kind is ErrorKind.TIMEOUT and self.deadline is not None
                           and (self._remaining() or 0.0) < 0.1)
        if err.retryable and not cut_by_deadline:
            breaker.record_failure()
            r.metrics.fallbacks.labels(err.kind.value).inc()
        elif ticket == "probe":
            breaker.release_probe()
        if err.kind in _TERMINAL:
            reason, cls = _TERMINAL[err.kind]
            raise cls(reason, f"the provider refused the request ({err.kind.value})",
                      {"deployment": dep.name, "http_status": err.status_code or 0})
        if err.kind is ErrorKind.CONTEXT_TOO_LONG:
            # Only a candidate with a larger window may be tried.
            window = dep.context_window
            for name, d in self.cfg.deployments.items():
                if d.context_window <= window:
                    self.excluded.add(name)
            r.metrics.fallbacks.labels("context_too_long").inc()
        if err.kind in _SKIP:
            self.excluded.add(dep.name)
            r.metrics.fallbacks.labels(err.kind.value).inc()

    async def _plan(self) -> AsyncIterator[tuple[int, Deployment, bool | str]]:
        """Yields (attempt number, deployment, breaker ticket) in order, with backoff between rounds.

        The caller records each attempt's verdict in ``self.verdict`` before resuming.
        """
        r, alias, cfg, prep, log = self.r, self.alias, self.cfg, self.prep, self.log
        try:
            prices = await r.prices.get(0) if alias.strategy == "cheapest" else {}
        except grpc.RpcError:
            prices = {}
        order = r._order(alias, cfg, prices)
        order = [d for d in order if (not prep.has_tools or d.supports_tools)
                 and (not prep.has_images or d.supports_images)]
        if not order:
            raise E.FailedPrecondition("NO_CAPABLE_DEPLOYMENT", "no deployment of this model takes these inputs")
        attempt = 0
        backoff = cfg.retries.backoff_initial_ms / 1000
        skipped: set[str] = set()
        breaker_logged: set[str] = set()
        while attempt < cfg.retries.max_attempts:
            progressed = False
            wait_hint = 0.0
            last_kind = "unknown"
            for dep in order:
                if attempt >= cfg.retries.max_attempts:
                    break
                if dep.name in skipped or dep.name in self.excluded:
                    continue
                ticket = r.breakers[dep.name].try_acquire()
                if not ticket:
                    if dep.name not in breaker_logged:
                        breaker_logged.add(dep.name)
                        log.add(dep, router_pb2.ATTEMPT_OUTCOME_BREAKER_OPEN, time.perf_counter(), cause="breaker_open")
                        r.metrics.attempts.labels(dep.name, "breaker_open").inc()
                    continue
                rem = self._remaining()
                if rem is not None and rem <= 0:
                    return
                attempt += 1
                progressed = True
                self.verdict = None
                yield attempt, dep, ticket
                verdict = self.verdict
                if verdict is not None:
                    last_kind = verdict.kind.value
                if verdict is not None and verdict.kind in _SKIP:
                    skipped.add(dep.name)
                if verdict is not None and verdict.retry_after_s:
                    wait_hint = max(wait_hint, verdict.retry_after_s)
            if not progressed:
                return
            # Another round over the same deployments: back off (retry-after honoured up to a cap).
            wait = min(max(backoff, wait_hint), cfg.retries.retry_after_cap_ms / 1000)
            wait = wait * (0.5 + random.random() / 2) if not wait_hint else wait
            if self.deadline is not None and time.monotonic() + wait >= self.deadline:
                return
            if attempt < cfg.retries.max_attempts:
                r.metrics.retries.labels(last_kind).inc()  # why the round before failed
                await asyncio.sleep(wait)
            backoff = min(backoff * 2, cfg.retries.backoff_max_ms / 1000)

    async def unary(self) -> router_pb2.GenerateResponse:
        r = self.r
        r._admit()
        code = "OK"
        try:
            return await self._unary()
        except E.IgwError as err:
            code = err.code.name
            raise
        except BaseException as exc:
            code = "CANCELLED" if isinstance(exc, asyncio.CancelledError) else "UNKNOWN"
            raise
        finally:
            self._ended_early(code.lower())
            r._leave()
            r.metrics.calls.labels(self.alias.name, code).inc()

    async def _attempt_lease(self, attempt: int, dep: Deployment, ticket: bool | str) -> _Lease | None:
        """A hold and a credential for one attempt; None: skip this deployment.

        Whenever no lease comes back, the breaker probe (if this attempt holds it) is released.
        """
        t0 = time.perf_counter()
        try:
            lease = await self.r._lease(self.ident, self.rid, attempt, dep, self.prep, self.cfg, self._rpc_timeout(),
                                        self._hold_sent, self.req.run_id, self.req.run_cap_nanos)
            self.hold_unsure = False  # the attempt owns its hold now: settled or freed by its id
            return lease
        except _SkipDeployment as skip:
            self.hold_unsure = False  # the hold was placed and freed by its id
            self.log.add(dep, router_pb2.ATTEMPT_OUTCOME_NO_CREDENTIAL, t0, cause=skip.reason)
            self.r.metrics.attempts.labels(dep.name, "no_credential").inc()
            self.excluded.add(dep.name)
            if ticket == "probe":
                self.r.breakers[dep.name].release_probe()
            return None
        except BaseException as exc:
            if isinstance(exc, E.IgwError) and exc.code in _NO_HOLD:
                self.hold_unsure = False  # the ledger refused: no hold was placed
            if ticket == "probe":
                self.r.breakers[dep.name].release_probe()
            raise

    def _abandon(
        self, dep: Deployment, ticket: bool | str, lease: _Lease, exc: BaseException,
    ) -> E.InvalidArgument | None:
        """Cleans up an attempt that ended in an exception other than a ProviderError.

        Releases the hold and the breaker probe (the deployment gets no verdict). Returns the
        error for the agent when ``exc`` is a ValueError from an adapter (the request cannot be
        translated for this provider); None when ``exc`` should propagate unchanged.
        """
        r = self.r
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            reason = "cancelled"
        elif isinstance(exc, ValueError):
            reason = "untranslatable"
        else:
            reason = "router_error"
        r._free(lease, reason)
        r._end_lease(lease, *_lease_end_of(exc))
        if ticket == "probe":
            r.breakers[dep.name].release_probe()
        if not isinstance(exc, ValueError):
            return None
        # The exception text is not logged: it may quote the request.
        _LOGGER.warning("request cannot be translated for the provider",
                        extra={"deployment": dep.name, "error_type": type(exc).__name__})
        r.metrics.attempts.labels(dep.name, "untranslatable").inc()
        return E.InvalidArgument(
            "UNTRANSLATABLE_REQUEST", "the request cannot be expressed in this provider's API",
            {"deployment": dep.name, "provider": dep.provider},
        )

    async def _unary(self) -> router_pb2.GenerateResponse:
        r, cfg = self.r, self.cfg
        adapter_cache: dict[str, Any] = {}
        plan = self._plan()
        async for attempt, dep, ticket in plan:
            provider = cfg.providers[dep.provider]
            adapter = adapter_cache.get(provider.type) or get_adapter(provider.type)
            adapter_cache[provider.type] = adapter
            lease = await self._attempt_lease(attempt, dep, ticket)
            if lease is None:
                continue
            t0 = time.perf_counter()
            with attempt_span(provider.type, dep.provider, dep.name, dep.model, attempt,
                              server_url=provider.base_url) as span:
                try:
                    resp: ChatResponse = await adapter.complete(
                        r.http, provider.base_url, lease.secret, replace(self.prep.chat, model=dep.model),
                        r._timeouts(cfg, self._remaining(), ticket == "probe"),
                    )
                except ProviderError as err:
                    attempt_failed(span, err.kind.value)
                    r._free(lease, err.kind.value)
                    r._end_lease(lease, True, err.kind.name)
                    self.verdict = err
                    self._failed(dep, ticket, err, t0)
                    continue
                except BaseException as exc:
                    attempt_failed(span, type(exc).__name__)
                    refusal = self._abandon(dep, ticket, lease, exc)
                    if refusal is None:
                        raise
                    raise refusal from None
                finally:
                    lease.secret = ""
                r._end_lease(lease, True, "SUCCESS")
                attempt_usage(span, resp.usage.input_tokens, resp.usage.output_tokens)
            elapsed = time.perf_counter() - t0
            r.breakers[dep.name].record_success(elapsed)
            r.metrics.upstream_seconds.labels(dep.provider, dep.model).observe(elapsed)
            r.metrics.attempts.labels(dep.name, "success").inc()
            self.log.add(dep, router_pb2.ATTEMPT_OUTCOME_SUCCESS, t0)
            usage = resp.usage
            # Settle before anything else can fail: the hold must never outlive a served call.
            r._settle(self.rid, lease, dep, usage, elapsed, ledger_pb2.CALL_OUTCOME_SUCCESS)
            cost = await r._cost(lease.hold, dep, usage)
            r._account(dep, self.ident, usage, cost)
            self._trace(dep, usage, cost, resp.finish_reason)
            return self._response(dep, resp.text, resp.tool_calls, resp.finish_reason, usage, cost)
        raise self._final_error()

    def _trace(self, dep: Deployment, usage: Usage, cost: int, finish: FinishReason) -> None:
        annotate_genai(self.alias.name, dep.provider, self.cfg.providers[dep.provider].type, dep.model,
                       usage.input_tokens, usage.output_tokens, cost, self.rid,
                       max_tokens=self.prep.chat.max_output_tokens, finish_reason=finish.value)

    def _response(
        self, dep: Deployment, text: str, calls: tuple[ToolCall, ...] | list[ToolCall], finish: FinishReason,
        usage: Usage, cost: int,
    ) -> router_pb2.GenerateResponse:
        out = router_pb2.GenerateResponse(
            request_id=self.rid,
            text=text,
            tool_calls=[router_pb2.ToolCall(id=c.id, name=c.name, arguments_json=c.arguments_json) for c in calls],
            finish_reason=FINISH_TO_PB[finish],
            usage=router_pb2.Usage(
                input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
                cached_input_tokens=usage.cached_input_tokens, estimated=not usage.reported,
            ),
            cost_nanos=cost,
            served_by=router_pb2.ServedBy(deployment=dep.name, provider=dep.provider, provider_model=dep.model),
            attempts=self.log.items,
        )
        out.latency.FromNanoseconds(int((time.perf_counter() - self.start) * 1e9))
        return out

    async def stream(self) -> AsyncIterator[router_pb2.GenerateStreamResponse]:
        r = self.r
        r._admit()
        code = "OK"
        try:
            async for item in self._stream():
                yield item
        except E.IgwError as err:
            code = err.code.name
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"
            raise
        finally:
            self._ended_early(code.lower())
            r._leave()
            r.metrics.calls.labels(self.alias.name, code).inc()

    async def _stream(self) -> AsyncIterator[router_pb2.GenerateStreamResponse]:
        r, cfg = self.r, self.cfg
        async for attempt, dep, ticket in self._plan():
            provider = cfg.providers[dep.provider]
            adapter = get_adapter(provider.type)
            lease = await self._attempt_lease(attempt, dep, ticket)
            if lease is None:
                continue
            t0 = time.perf_counter()
            upstream: AsyncIterator[Any] | None = None
            first: Any = None
            so_far: Usage | None = None  # usage the provider reported before the first content
            err: ProviderError | None = None
            # The attempt's span covers the whole upstream stream: it is current while connecting
            # and ends after the relay (a failed attempt ends it before the next one).
            with attempt_span(provider.type, dep.provider, dep.name, dep.model, attempt, keep_open=True,
                              server_url=provider.base_url) as span:
                try:
                    upstream = adapter.stream(
                        r.http, provider.base_url, lease.secret, replace(self.prep.chat, model=dep.model),
                        r._timeouts(cfg, self._remaining(), ticket == "probe"),
                    )
                    first = await upstream.__anext__()
                    while isinstance(first, UsageSoFar):  # commit on content, not on a usage report
                        so_far = first.usage
                        first = await upstream.__anext__()
                except StopAsyncIteration:
                    err = ProviderError(ErrorKind.PROTOCOL_ERROR, f"{dep.provider}: empty stream")
                except ProviderError as exc:
                    err = exc
                except BaseException as exc:
                    attempt_failed(span, type(exc).__name__)
                    if so_far is not None and isinstance(exc, asyncio.CancelledError | GeneratorExit):
                        # The agent left after the provider reported its input count: that was used.
                        r._settle(self.rid, lease, dep, replace(so_far, reported=False),
                                  time.perf_counter() - t0, ledger_pb2.CALL_OUTCOME_CANCELLED)
                        r._end_lease(lease, True, "CANCELLED")
                        if ticket == "probe":
                            r.breakers[dep.name].release_probe()
                        refusal = None
                    else:
                        refusal = self._abandon(dep, ticket, lease, exc)
                    if upstream is not None:
                        await _aclose(upstream)
                    if refusal is None:
                        raise
                    raise refusal from None
                finally:
                    lease.secret = ""
                if err is not None:
                    attempt_failed(span, err.kind.value)
            assert upstream is not None  # adapter.stream() returned, or the handler above raised
            if err is not None:
                end_span(span)
                r._end_lease(lease, True, err.kind.name)
                r._free(lease, err.kind.value)  # before the close: a cancellation there must not skip it
                await _aclose(upstream)
                self.verdict = err
                self._failed(dep, ticket, err, t0)
                continue
            # Committed to this deployment: from here on, no fallback.
            r._end_lease(lease, True, "STREAMED")
            ttft = time.perf_counter() - t0
            r.breakers[dep.name].record_success(ttft)
            r.metrics.ttft_seconds.labels(dep.provider, dep.model).observe(ttft)
            r.metrics.attempts.labels(dep.name, "success").inc()
            self.log.add(dep, router_pb2.ATTEMPT_OUTCOME_SUCCESS, t0)
            async for msg in self._relay(dep, lease, upstream, first, t0, span, so_far):
                yield msg
            return
        raise self._final_error()

    async def _relay(
        self, dep: Deployment, lease: _Lease, upstream: AsyncIterator[Any], first: Any,
        t0: float, span: Any, so_far: Usage | None = None,
    ) -> AsyncIterator[router_pb2.GenerateStreamResponse]:
        """Relays the committed attempt's events; ends its span (``span``) when the stream does.

        ``so_far`` (and any later ``UsageSoFar``) is what the provider reported before its final
        usage: a stream cut short is charged with the provider's counts where it gave them."""
        r = self.r
        text_parts: list[str] = []
        calls: dict[int, list[str]] = {}
        usage: Usage | None = None
        finish = FinishReason.OTHER
        outcome = ledger_pb2.CALL_OUTCOME_CANCELLED
        served = router_pb2.ServedBy(deployment=dep.name, provider=dep.provider, provider_model=dep.model)
        try:
            yield router_pb2.GenerateStreamResponse(
                start=router_pb2.StreamStart(request_id=self.rid, served_by=served))
            event = first
            while True:
                if isinstance(event, TextDelta):
                    text_parts.append(event.text)
                    yield router_pb2.GenerateStreamResponse(text_delta=router_pb2.TextDelta(text=event.text))
                elif isinstance(event, ToolCallDelta):
                    slot = calls.setdefault(event.index, [event.id, event.name, ""])
                    if event.id:
                        slot[0] = event.id
                    if event.name:
                        slot[1] = event.name
                    slot[2] += event.arguments_fragment
                    yield router_pb2.GenerateStreamResponse(tool_call_delta=router_pb2.ToolCallDelta(
                        index=event.index, id=event.id, name=event.name,
                        arguments_fragment=event.arguments_fragment))
                elif isinstance(event, UsageSoFar):
                    so_far = event.usage
                elif isinstance(event, StreamEnd):
                    usage, finish = event.usage, event.finish_reason
                try:
                    event = await upstream.__anext__()
                except StopAsyncIteration:
                    break
            outcome = ledger_pb2.CALL_OUTCOME_SUCCESS
        except ProviderError as err:
            outcome = ledger_pb2.CALL_OUTCOME_PROVIDER_ERROR
            raise E.Unavailable("UPSTREAM_STREAM_BROKEN", f"the provider's stream broke ({err.kind.value})",
                                {"deployment": dep.name}) from None
        finally:
            elapsed = time.perf_counter() - t0
            if usage is None or outcome != ledger_pb2.CALL_OUTCOME_SUCCESS:
                # No final usage (hang-up, broken stream): count what was consumed; never less than
                # seen. Input: the provider's count when it gave one, else the upper bound.
                known = usage or so_far
                counted = Usage(
                    input_tokens=self.prep.prompt_tokens_upper_bound if known is None else known.input_tokens,
                    output_tokens=max(estimate_tokens("".join(text_parts))
                                      + sum(estimate_tokens(c[2]) for c in calls.values()),
                                      known.output_tokens if known else 0),
                    cached_input_tokens=0 if known is None else known.cached_input_tokens,
                    reported=False,
                )
                usage = counted
            r.metrics.upstream_seconds.labels(dep.provider, dep.model).observe(elapsed)
            # Settle before closing upstream: a second cancellation during the close must not skip it.
            r._settle(self.rid, lease, dep, usage, elapsed, outcome)
            attempt_usage(span, usage.input_tokens, usage.output_tokens)
            if outcome == ledger_pb2.CALL_OUTCOME_PROVIDER_ERROR:
                attempt_failed(span, "stream_broken")
            end_span(span)
            await _aclose(upstream)
        cost = await r._cost(lease.hold, dep, usage)
        r._account(dep, self.ident, usage, cost)
        self._trace(dep, usage, cost, finish)
        tool_calls = [ToolCall(c[0], c[1], c[2]) for _, c in sorted(calls.items())]
        yield router_pb2.GenerateStreamResponse(
            final=self._response(dep, "".join(text_parts), tool_calls, finish, usage, cost))


async def _aclose(gen: Any) -> None:
    with contextlib.suppress(Exception):
        await gen.aclose()

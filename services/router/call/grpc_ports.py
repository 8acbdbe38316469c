"""The engine's ports over gRPC: holds in the ledger (or a budget slice), credentials from the vault.

Everything that outlives the call (settles, releases, draw withdrawals, lease ends) runs in the
background, retried until acknowledged; :meth:`Background.wait` lets a draining router wait for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import duration_pb2

from igw.keyvault.v1 import keyvault_pb2, keyvault_pb2_grpc
from igw.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from services.common import errors as E
from services.common.errors import error_info_from_rpc_error, retry_delay_from_rpc_error
from services.common.money import call_cost
from services.router.call.domain import CallRequest, Lease, NoCredential, Settled
from services.router.draw_notes import DrawNotes
from services.router.metrics import RouterMetrics
from services.router.providers.domain import Usage
from services.router.routing import Deployment
from services.router.settler import LeaseEnder, Settler, release_hold, release_request
from services.router.slices import SliceBook, SliceHold

_LOGGER = logging.getLogger(__name__)
# Ledger refusals that say no hold was placed (a Reserve whose answer is anything else may have
# left one: the call then releases its request id when it ends).
_NO_HOLD = frozenset({
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT,
})
# IssueCredential gets this long whatever the call's deadline: a lease issued after the caller
# left is still learnt, and returned (EndLease) so the audit shows it closed.
_VAULT_TIMEOUT_S = 5.0
# A deployment not called yet is taken to be as slow as a model call (its draw notes may linger).
_UNKNOWN_UPSTREAM_S = 1.0
_UPSTREAM_WEIGHT = 0.2  # of the newest call in a deployment's average provider time
# The vault's answers that mean "no credential for this deployment" (skip it), not a router fault.
_NO_CREDENTIAL = frozenset({
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND,
})
_SETTLED = {
    Settled.SUCCESS: ledger_pb2.CALL_OUTCOME_SUCCESS,
    Settled.CANCELLED: ledger_pb2.CALL_OUTCOME_CANCELLED,
    Settled.PROVIDER_ERROR: ledger_pb2.CALL_OUTCOME_PROVIDER_ERROR,
}


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


class Background:
    """Tasks that outlive the call that started them."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()

    def run(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def wait(self, timeout: float) -> None:
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=timeout)


class LedgerHolds:
    """HoldPort: a Reserve per attempt, or a hold drawn from a budget slice (its draw noted in the
    ledger); settles batched."""

    def __init__(
        self, ledger: ledger_pb2_grpc.LedgerServiceStub, settler: Settler, notes: DrawNotes, slices: SliceBook,
        prices: PriceBook, metrics: RouterMetrics, background: Background,
    ) -> None:
        self.ledger = ledger
        self.settler = settler
        self.notes = notes
        self.slices = slices
        self.price_book = prices
        self.metrics = metrics
        self.background = background
        # Per deployment: how long its provider calls took lately (an average), to know whether a
        # draw note may linger for others to share its round trip.
        self._upstream_s: dict[str, float] = {}

    async def place(
        self, call: CallRequest, attempt: int, dep: Deployment, timeout: float, reserve_sent: Callable[[], None],
    ) -> Lease:
        prep = call.prep
        key: tuple[str, str, str] | None = None
        try:
            # A call of a run takes its own hold: the run's cap is one more budget of that hold.
            if call.cfg.budget_slices.applies(call.team) and not call.run_id:
                key = (call.team, call.agent, dep.price)
                self.slices.enter(key)  # how many calls of the key are in flight: is it busy?
                drawn = await self.slices.draw(
                    call.team, call.agent, dep.price, prep.prompt_tokens_upper_bound,
                    prep.chat.max_output_tokens, call.cfg, timeout, dep.provider,
                )
                if drawn is not None:
                    # Recorded while the provider call runs: the answer waits for it (see settle).
                    drawn.request_id = call.request_id
                    linger = self.notes.worth_lingering(self._upstream_s.get(dep.name, _UNKNOWN_UPSTREAM_S))
                    drawn.noted = self.notes.note(drawn.slice.reservation_id, call.request_id, drawn.amount,
                                                  linger=linger)
                    return Lease(drawn.response(), drawn, counted=key)
            reserve_sent()
            reserve = ledger_pb2.ReserveRequest(
                request_id=call.request_id, attempt=attempt, team=call.team, agent=call.agent,
                model=dep.price, prompt_tokens_upper_bound=prep.prompt_tokens_upper_bound,
                max_output_tokens=prep.chat.max_output_tokens, provider=dep.provider,
                run_id=call.run_id, run_cap_nanos=call.run_cap_nanos,
            )
            # Exact at the limit: a refusal while this router holds the team's slices gives them back first.
            hold = await self.slices.reserve(call.team, lambda: self.ledger.Reserve(reserve, timeout=timeout), timeout)
        except BaseException as exc:
            if key is not None:
                self.slices.leave(key)
            if isinstance(exc, asyncio.CancelledError) or not isinstance(exc, Exception):
                raise
            raise ledger_error(exc, call.team, self.metrics) from None
        return Lease(hold, counted=key)

    def _left(self, lease: Lease) -> None:
        key, lease.counted = lease.counted, None
        if key is not None:
            self.slices.leave(key)  # type: ignore[arg-type]

    def refused(self, exc: BaseException) -> bool:
        return isinstance(exc, E.IgwError) and exc.code in _NO_HOLD

    def free(self, lease: Lease, reason: str) -> None:
        self._left(lease)
        drawn = lease.drawn
        if isinstance(drawn, SliceHold):
            if drawn.done:
                return
            self.slices.give_back(drawn)
            if drawn.noted is not None:  # forgotten by the ledger once the note was answered
                self.notes.withdraw(drawn.slice.reservation_id, drawn.request_id, drawn.noted)
        else:
            self.background.run(self._release(lease.hold.reservation_id, reason))

    async def _release(self, reservation_id: str, reason: str) -> None:
        if not await release_hold(self.ledger, reservation_id, reason):
            _LOGGER.warning("release not acknowledged; the hold will expire")

    def release_request(self, request_id: str, reason: str) -> None:
        self.background.run(self._release_request(request_id, reason))

    async def _release_request(self, request_id: str, reason: str) -> None:
        if await release_request(self.ledger, request_id, reason):
            self.metrics.request_releases.labels("sent").inc()
        else:
            self.metrics.request_releases.labels("unacknowledged").inc()
            _LOGGER.warning("release by request id not acknowledged; a hold left behind will expire")

    def settle(
        self, request_id: str, lease: Lease, dep: Deployment, usage: Usage, latency_s: float, outcome: Settled,
    ) -> Awaitable[bool] | None:
        req = ledger_pb2.SettleRequest(
            request_id=request_id, reservation_id=lease.hold.reservation_id,
            usage=ledger_pb2.TokenUsage(
                input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
                cached_input_tokens=usage.cached_input_tokens,
            ),
            provider=dep.provider, provider_model=dep.model, outcome=_SETTLED[outcome],
            usage_estimated=not usage.reported,
        )
        req.latency.FromNanoseconds(int(latency_s * 1e9))
        self._left(lease)
        last = self._upstream_s.get(dep.name)
        self._upstream_s[dep.name] = latency_s if last is None else last + _UPSTREAM_WEIGHT * (latency_s - last)
        drawn = lease.drawn
        if isinstance(drawn, SliceHold):
            # The answer waits until the call's draw is recorded (normally long done): a router
            # dying before the settle lands leaves the ledger an entry to capture under this
            # request id. Or until the settle is acknowledged, should the note fail (e.g. a ledger
            # without NoteSliceDraws): either way the call has its own entry.
            settled: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            slices = self.slices

            def done(ok: bool) -> None:
                slices.settled(drawn, ok)
                if not settled.done():
                    settled.set_result(ok)

            self.settler.submit(req, done)
            if drawn.noted is not None:
                self.notes.hurry(drawn.noted)
            return first_ack([f for f in (drawn.noted, settled) if f is not None])
        # A per-call hold left behind expires and is captured under this request id: background.
        self.settler.submit(req, None)
        return None

    async def prices(self) -> Mapping[str, ledger_pb2.ModelPrice]:
        try:
            return await self.price_book.get(0)
        except grpc.RpcError:
            return {}

    async def cost(self, lease: Lease, dep: Deployment, usage: Usage) -> int:
        try:
            prices = await self.price_book.get(lease.hold.price_version)
        except grpc.RpcError:
            return 0
        p = prices.get(dep.price)
        if p is None:
            return 0
        return call_cost(
            usage.input_tokens, usage.output_tokens, usage.cached_input_tokens,
            p.input_per_mtok_nanos, p.output_per_mtok_nanos, p.cached_input_per_mtok_nanos,
        )


def first_ack(futures: list[asyncio.Future[bool]]) -> asyncio.Future[bool]:
    """True as soon as one of ``futures`` is True; False once all are False (or failed)."""
    out: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    left = len(futures)
    if not futures:
        out.set_result(False)

    def one(fut: asyncio.Future[bool]) -> None:
        nonlocal left
        left -= 1
        ok = not fut.cancelled() and fut.exception() is None and fut.result()
        if not out.done() and (ok or left == 0):
            out.set_result(ok)

    for fut in futures:
        fut.add_done_callback(one)
    return out


def ledger_error(err: BaseException, team: str, metrics: RouterMetrics) -> E.IgwError:
    """The agent's error for a failed Reserve (or budget-slice draw)."""
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


class VaultCredentials:
    """CredentialPort: a lease per attempt (IssueCredential), ended once (EndLease)."""

    def __init__(
        self, vault: keyvault_pb2_grpc.KeyVaultServiceStub, lease_ttl_s: int, metrics: RouterMetrics,
        background: Background, lease_ends: LeaseEnder,
    ) -> None:
        self.vault = vault
        self.lease_ttl_s = lease_ttl_s
        self.metrics = metrics
        self.background = background
        self.lease_ends = lease_ends

    def issue(
        self, call: CallRequest, dep: Deployment, timeout: float,
    ) -> asyncio.Future[keyvault_pb2.IssueCredentialResponse]:
        # The gRPC call starts as it is created: it runs while the hold is placed.
        issue: asyncio.Future[keyvault_pb2.IssueCredentialResponse] = asyncio.ensure_future(self.vault.IssueCredential(
            keyvault_pb2.IssueCredentialRequest(
                provider=dep.provider, team=call.team, model=dep.model, request_id=call.request_id,
                ttl=duration_pb2.Duration(seconds=self.lease_ttl_s),
            ),
            timeout=max(timeout, _VAULT_TIMEOUT_S),
        ))
        return issue

    def bind(
        self, lease: Lease, issued: keyvault_pb2.IssueCredentialResponse, call: CallRequest, dep: Deployment,
    ) -> None:
        lease.end = _end_request(issued, call, dep)

    def no_credential(self, exc: BaseException) -> NoCredential | None:
        if not isinstance(exc, grpc.RpcError) or exc.code() not in _NO_CREDENTIAL:
            return None
        info = error_info_from_rpc_error(exc)
        transient = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        reason = info.reason if info else exc.code().name
        if transient:  # e.g. VAULT_UNAVAILABLE:AUDIT_UNAVAILABLE; never a configuration problem
            reason = "VAULT_UNAVAILABLE" if not info else f"VAULT_UNAVAILABLE:{info.reason}"
        return NoCredential(reason, transient=transient)

    def end(self, lease: Lease, used: bool, reason: str) -> None:
        req, lease.end = lease.end, None
        if not isinstance(req, keyvault_pb2.EndLeaseRequest):
            return
        req.end = keyvault_pb2.LEASE_END_USED if used else keyvault_pb2.LEASE_END_RETURNED
        req.reason = reason
        self.lease_ends.submit(req)  # grouped with other calls' ends (EndLeaseBatch)

    def return_when_issued(
        self, issue: asyncio.Future[keyvault_pb2.IssueCredentialResponse], reason: str, call: CallRequest,
        dep: Deployment,
    ) -> None:
        async def wait() -> None:
            try:
                lease = await issue
            except Exception:  # no lease was issued (or the answer is lost): nothing to return
                return
            req = _end_request(lease, call, dep)
            req.end, req.reason = keyvault_pb2.LEASE_END_RETURNED, reason
            self.lease_ends.submit(req)

        self.background.run(wait())


def _end_request(
    lease: keyvault_pb2.IssueCredentialResponse, call: CallRequest, dep: Deployment,
) -> keyvault_pb2.EndLeaseRequest:
    """The EndLease of one lease, without its end and reason (no secret in it)."""
    return keyvault_pb2.EndLeaseRequest(
        lease_id=lease.lease_id, request_id=call.request_id, provider=dep.provider, team=call.team,
        model=dep.model, key_name=lease.key_name, key_version=lease.key_version,
    )

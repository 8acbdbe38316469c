"""One agent call, end to end: the use case the router exists for.

For each candidate deployment the :class:`~services.router.call.plan.Plan` yields, a hold
(``HoldPort.place``) and a credential (``CredentialPort.issue``) are obtained concurrently;
the provider is called with the lease's secret at the config's base URL only; a failure before
any byte reached the agent frees the hold, is judged by the plan (fall back, skip, or answer
at once) and the next candidate is tried; success settles (in the background) and answers the
agent (a hold drawn from a budget slice first waits until the ledger recorded its draw, so the
call has its own spend entry even if the router dies before the settle lands). A stream
commits to a deployment at its first content and is relayed by :mod:`services.router.call.relay`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import replace
from typing import Any

from services.common import errors as E
from services.common.tracing import annotate_genai, attempt_failed, attempt_span, attempt_usage, end_span
from services.router.breaker import Breaker
from services.router.call.domain import (
    CallRequest,
    CallResult,
    Lease,
    NoCredential,
    Settled,
    StreamEvent,
)
from services.router.call.plan import Plan, Ticket
from services.router.call.ports import Clock, CredentialPort, HoldPort, ProviderPort, SystemClock
from services.router.call.relay import aclose, relay
from services.router.metrics import RouterMetrics
from services.router.providers.domain import ChatResponse, FinishReason, ToolCall, Usage, UsageSoFar
from services.router.providers.errors import ErrorKind, ProviderError
from services.router.routing import Deployment

_LOGGER = logging.getLogger(__name__)
# How long a served call waits for its draw record (DrawNotes retries over the replicas meanwhile).
RECORD_WAIT_S = 10.0


class CallEngine:
    """Runs calls over its ports. One per router process; ``breakers`` is the router's (kept
    current by the router when the config changes)."""

    def __init__(
        self, holds: HoldPort, credentials: CredentialPort, providers: ProviderPort, metrics: RouterMetrics,
        breakers: Mapping[str, Breaker], clock: Clock | None = None,
    ) -> None:
        self.holds = holds
        self.credentials = credentials
        self.providers = providers
        self.metrics = metrics
        self.breakers = breakers
        self.clock: Clock = clock or SystemClock()
        self.in_flight = 0

    def admit(self, call: CallRequest) -> None:
        """Counts a call in, or refuses it when ``max_in_flight`` calls are running."""
        if self.in_flight >= call.cfg.limits.max_in_flight:
            self.metrics.overload_rejections.inc()
            raise E.ResourceExhausted("ROUTER_OVERLOADED", "too many calls in flight; retry shortly")
        self.in_flight += 1
        self.metrics.in_flight.inc()

    def leave(self, call: CallRequest, code: str) -> None:
        """Counts a call out, by its status."""
        self.in_flight -= 1
        self.metrics.in_flight.dec()
        self.metrics.calls.labels(call.alias.name, code).inc()

    def unary(self, call: CallRequest, remaining: float | None) -> Awaitable[CallResult]:
        """One unary call. Raises IgwError for the agent."""
        return Run(self, call, remaining).unary()

    def stream(self, call: CallRequest, remaining: float | None) -> AsyncIterator[StreamEvent]:
        """One streaming call: Started, the provider's deltas, then the CallResult."""
        return Run(self, call, remaining).stream()


class Run:
    """One call in progress: its plan, its leases, and whether a hold may be left behind."""

    def __init__(self, engine: CallEngine, call: CallRequest, remaining: float | None) -> None:
        self.engine = engine
        self.call = call
        self.holds = engine.holds
        self.credentials = engine.credentials
        self.providers = engine.providers
        self.metrics = engine.metrics
        self.breakers = engine.breakers
        self.clock = clock = engine.clock
        self.start = clock.perf_counter()
        deadline = None if remaining is None else clock.monotonic() + remaining
        self.plan = Plan(call, engine.breakers, engine.metrics, clock, deadline)
        # A Reserve of this call went out and its hold is neither owned by an attempt nor known
        # not to exist (answer lost, late, or the call ended while waiting): when the call ends
        # without an answer, the ledger releases the request id (covering a hold placed later).
        self.hold_unsure = False
        # The draw record the agent's success waits for (holds drawn from a budget slice), or None.
        self.recording: Awaitable[bool] | None = None

    def _hold_sent(self) -> None:
        self.hold_unsure = True

    def ended_early(self, reason: str) -> None:
        """The call ends without an answer: a hold it may have left behind goes (by request id)."""
        if self.hold_unsure:
            self.hold_unsure = False
            self.holds.release_request(self.call.request_id, reason)

    # ------------------------------------------------------------------ hold + credential

    async def lease(self, attempt: int, dep: Deployment, ticket: Ticket) -> Lease | None:
        """A hold and a credential for one attempt; None: skip this deployment.

        Whenever no lease comes back, the breaker probe (if this attempt holds it) is released.
        """
        t0 = self.clock.perf_counter()
        try:
            lease = await self._lease(attempt, dep, self.plan.rpc_timeout())
            self.hold_unsure = False  # the attempt owns its hold now: settled or freed by its id
            return lease
        except NoCredential as skip:
            self.hold_unsure = False  # the hold was placed and freed by its id
            self.plan.no_credential(dep, ticket, skip.reason, t0)
            return None
        except BaseException as exc:
            if self.holds.refused(exc):
                self.hold_unsure = False  # the ledger refused: no hold was placed
            if ticket == "probe":
                self.breakers[dep.name].release_probe()
            raise

    async def _lease(self, attempt: int, dep: Deployment, timeout: float) -> Lease:
        """The hold and the credential, concurrently. Raises IgwError or NoCredential. A credential
        that comes back unused, now or after the caller left, is returned to the vault."""
        call, holds, creds = self.call, self.holds, self.credentials
        issue = creds.issue(call, dep, timeout)
        held: Lease | BaseException
        try:
            held = await holds.place(call, attempt, dep, timeout, self._hold_sent)
        except asyncio.CancelledError:
            creds.return_when_issued(issue, "CANCELLED", call, dep)
            raise
        except Exception as exc:
            held = exc
        try:
            # asyncio.wait neither cancels the lease call on timeout nor when this task is cancelled.
            await asyncio.wait((issue,), timeout=timeout)
        except asyncio.CancelledError:
            if not isinstance(held, BaseException):
                holds.free(held, "cancelled")
            creds.return_when_issued(issue, "CANCELLED", call, dep)
            raise
        issued: Any = None
        if issue.done():
            issued = issue.exception() or issue.result()
        if isinstance(held, BaseException):
            creds.return_when_issued(issue, getattr(held, "reason", "LEDGER_UNAVAILABLE"), call, dep)
            raise held
        if issued is None:
            holds.free(held, "no_credential")
            creds.return_when_issued(issue, "DEADLINE_EXCEEDED", call, dep)
            raise NoCredential("DEADLINE_EXCEEDED")
        if isinstance(issued, BaseException):
            holds.free(held, "no_credential")
            skip = creds.no_credential(issued)
            raise issued if skip is None else skip
        creds.bind(held, issued, call, dep)
        if issued.base_url.rstrip("/") != call.cfg.providers[dep.provider].base_url:
            # The vault bound this secret to another host: never send it to ours.
            holds.free(held, "lease_url_mismatch")
            creds.end(held, False, "LEASE_BASE_URL_MISMATCH")
            _LOGGER.error("lease base URL differs from the routing config", extra={"deployment": dep.name})
            raise NoCredential("LEASE_BASE_URL_MISMATCH")
        held.secret = issued.secret
        return held

    def abandon(self, dep: Deployment, ticket: Ticket, lease: Lease, exc: BaseException) -> E.InvalidArgument | None:
        """Cleans up an attempt that ended in an exception other than a ProviderError.

        Frees the hold and the breaker probe (the deployment gets no verdict). Returns the error
        for the agent when ``exc`` is a ValueError from an adapter (the request cannot be
        translated for this provider); None when ``exc`` should propagate unchanged.
        """
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            reason, used, end = "cancelled", True, "CANCELLED"  # the request may have gone out
        elif isinstance(exc, ValueError):
            reason, used, end = "untranslatable", False, "UNTRANSLATABLE"  # refused before sending
        else:
            reason, used, end = "router_error", True, "ROUTER_ERROR"
        self.holds.free(lease, reason)
        self.credentials.end(lease, used, end)
        if ticket == "probe":
            self.breakers[dep.name].release_probe()
        if not isinstance(exc, ValueError):
            return None
        # The exception text is not logged: it may quote the request.
        _LOGGER.warning("request cannot be translated for the provider",
                        extra={"deployment": dep.name, "error_type": type(exc).__name__})
        self.metrics.attempts.labels(dep.name, "untranslatable").inc()
        return E.InvalidArgument(
            "UNTRANSLATABLE_REQUEST", "the request cannot be expressed in this provider's API",
            {"deployment": dep.name, "provider": dep.provider},
        )

    # ------------------------------------------------------------------ the served call

    def settle(self, lease: Lease, dep: Deployment, usage: Usage, elapsed: float, outcome: Settled) -> None:
        """Settles the served call (before anything else can fail: a hold never outlives a served call)."""
        self.recording = self.holds.settle(self.call.request_id, lease, dep, usage, elapsed, outcome)

    async def confirm_recorded(self) -> None:
        """Waits (up to ``RECORD_WAIT_S``) until the ledger recorded the draw (or acknowledged the
        settle) the agent's success depends on. Past that the agent still gets its answer: the
        provider has been paid, and an error would make the agent pay for the same call again;
        both keep being retried and a metric and an error log (request id only) say so. If neither
        lands, the slice it was drawn from is captured with this call's hold in what is left of it:
        never less than what was served."""
        recording, self.recording = self.recording, None
        if recording is None:
            return
        acked = False
        try:
            acked = await asyncio.wait_for(asyncio.shield(recording), RECORD_WAIT_S)
        except TimeoutError:
            pass
        if not acked:
            self.metrics.settles_unconfirmed.inc()
            _LOGGER.error("answering before the ledger acknowledged the draw record; it is still retried",
                          extra={"request_id": self.call.request_id})

    async def result(
        self, dep: Deployment, lease: Lease, text: str, calls: tuple[ToolCall, ...] | list[ToolCall],
        finish: FinishReason, usage: Usage,
    ) -> CallResult:
        """The agent's answer, with its cost; the call counted in metrics and traced. Its draw is
        recorded first when the hold came from a budget slice."""
        await self.confirm_recorded()
        cost = await self.holds.cost(lease, dep, usage)
        m, call = self.metrics, self.call
        m.tokens.labels(dep.provider, dep.model, "input").inc(usage.input_tokens)
        m.tokens.labels(dep.provider, dep.model, "output").inc(usage.output_tokens)
        if usage.cached_input_tokens:
            m.tokens.labels(dep.provider, dep.model, "cached_input").inc(usage.cached_input_tokens)
        m.cost_nanos.labels(dep.provider, dep.model, call.team).inc(cost)
        annotate_genai(call.alias.name, dep.provider, call.cfg.providers[dep.provider].type, dep.model,
                       usage.input_tokens, usage.output_tokens, cost, call.request_id,
                       max_tokens=call.prep.chat.max_output_tokens, finish_reason=finish.value)
        return CallResult(call.request_id, text, calls, finish, usage, cost, dep, self.plan.log,
                          int((self.clock.perf_counter() - self.start) * 1e9))

    async def _prices(self) -> Any:
        return await self.holds.prices() if self.call.alias.strategy == "cheapest" else {}

    async def unary(self) -> CallResult:
        """The call, admitted and counted (IgwError for the agent)."""
        engine = self.engine
        engine.admit(self.call)
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
            self.ended_early(code.lower())
            engine.leave(self.call, code)

    async def _unary(self) -> CallResult:
        call, plan, clock = self.call, self.plan, self.clock
        async for attempt, dep, ticket in plan.attempts(await self._prices()):
            provider = call.cfg.providers[dep.provider]
            lease = await self.lease(attempt, dep, ticket)
            if lease is None:
                continue
            t0 = clock.perf_counter()
            with attempt_span(provider.type, dep.provider, dep.name, dep.model, attempt,
                              server_url=provider.base_url) as span:
                try:
                    resp: ChatResponse = await self.providers.complete(
                        provider, lease.secret, replace(call.prep.chat, model=dep.model),
                        plan.timeouts(ticket == "probe"))
                except ProviderError as err:
                    attempt_failed(span, err.kind.value)
                    self.holds.free(lease, err.kind.value)
                    self.credentials.end(lease, True, err.kind.name)
                    plan.failed(dep, ticket, err, t0)
                    continue
                except BaseException as exc:
                    attempt_failed(span, type(exc).__name__)
                    refusal = self.abandon(dep, ticket, lease, exc)
                    if refusal is None:
                        raise
                    raise refusal from None
                finally:
                    lease.secret = ""
                self.credentials.end(lease, True, "SUCCESS")
                attempt_usage(span, resp.usage.input_tokens, resp.usage.output_tokens)
            elapsed = clock.perf_counter() - t0
            plan.succeeded(dep, t0, elapsed)
            self.metrics.upstream_seconds.labels(dep.provider, dep.model).observe(elapsed)
            self.settle(lease, dep, resp.usage, elapsed, Settled.SUCCESS)
            return await self.result(dep, lease, resp.text, resp.tool_calls, resp.finish_reason, resp.usage)
        raise plan.final_error()

    async def stream(self) -> AsyncIterator[StreamEvent]:
        """The streaming call, admitted and counted (one generator: each event passes one level)."""
        engine = self.engine
        engine.admit(self.call)
        code = "OK"
        try:
            call, plan, clock = self.call, self.plan, self.clock
            async for attempt, dep, ticket in plan.attempts(await self._prices()):
                provider = call.cfg.providers[dep.provider]
                lease = await self.lease(attempt, dep, ticket)
                if lease is None:
                    continue
                t0 = clock.perf_counter()
                upstream: AsyncIterator[Any] | None = None
                first: Any = None
                so_far: Usage | None = None  # usage the provider reported before the first content
                err: ProviderError | None = None
                # The attempt's span covers the whole upstream stream: it is current while connecting
                # and ends after the relay (a failed attempt ends it before the next one).
                with attempt_span(provider.type, dep.provider, dep.name, dep.model, attempt, keep_open=True,
                                  server_url=provider.base_url) as span:
                    try:
                        upstream = self.providers.stream(
                            provider, lease.secret, replace(call.prep.chat, model=dep.model),
                            plan.timeouts(ticket == "probe"))
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
                            self.settle(lease, dep, replace(so_far, reported=False), clock.perf_counter() - t0,
                                        Settled.CANCELLED)
                            self.credentials.end(lease, True, "CANCELLED")
                            if ticket == "probe":
                                self.breakers[dep.name].release_probe()
                            refusal = None
                        else:
                            refusal = self.abandon(dep, ticket, lease, exc)
                        if upstream is not None:
                            await aclose(upstream)
                        if refusal is None:
                            raise
                        raise refusal from None
                    finally:
                        lease.secret = ""
                    if err is not None:
                        attempt_failed(span, err.kind.value)
                assert upstream is not None  # the adapter's stream() returned, or the handler above raised
                if err is not None:
                    end_span(span)
                    self.credentials.end(lease, True, err.kind.name)
                    self.holds.free(lease, err.kind.value)  # before the close: a cancellation there must not skip it
                    await aclose(upstream)
                    plan.failed(dep, ticket, err, t0)
                    continue
                # Committed to this deployment: from here on, no fallback.
                self.credentials.end(lease, True, "STREAMED")
                ttft = clock.perf_counter() - t0
                plan.succeeded(dep, t0, ttft)
                self.metrics.ttft_seconds.labels(dep.provider, dep.model).observe(ttft)
                async for msg in relay(self, dep, lease, upstream, first, t0, span, so_far):
                    yield msg
                return
            raise plan.final_error()
        except E.IgwError as err:
            code = err.code.name
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"
            raise
        finally:
            self.ended_early(code.lower())
            engine.leave(self.call, code)

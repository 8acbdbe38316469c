"""Router gRPC servicers: protobuf in and out, identity from the guard; no business rules here.

:func:`call_from_pb`, :func:`response_to_pb` and :func:`stream_to_pb` convert between the wire
and the call engine's domain types (:mod:`services.router.call.domain`).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import grpc

from igw.ledger.v1 import ledger_pb2
from igw.router.v1 import router_pb2, router_pb2_grpc
from services.common import errors as E
from services.common.guard import current_identity
from services.common.identity import Identity
from services.router.breaker import State
from services.router.call.domain import Attempt, CallRequest, CallResult, Started, StreamEvent
from services.router.call.plan import resolve_alias
from services.router.providers.domain import TextDelta, ToolCallDelta
from services.router.routing import ConfigError, RoutingConfig, load_config
from services.router.translate import FINISH_TO_PB, prepare, valid_request_id

if TYPE_CHECKING:
    from services.router.service import Router

_LOGGER = logging.getLogger(__name__)
_STATE = {
    State.CLOSED: router_pb2.BREAKER_STATE_CLOSED,
    State.OPEN: router_pb2.BREAKER_STATE_OPEN,
    State.HALF_OPEN: router_pb2.BREAKER_STATE_HALF_OPEN,
}


def call_from_pb(ident: Identity, req: router_pb2.GenerateRequest, cfg: RoutingConfig) -> CallRequest:
    """The agent's request as the engine takes it; raises InvalidArgument, NotFound, PermissionDenied."""
    if req.request_id and not valid_request_id(req.request_id):
        raise E.InvalidArgument("BAD_REQUEST_ID", "request_id must be [A-Za-z0-9._:-], at most 128")
    if req.run_id and not valid_request_id(req.run_id):
        raise E.InvalidArgument("BAD_RUN_ID", "run_id must be [A-Za-z0-9._:-], at most 128")
    if req.run_cap_nanos < 0 or (req.run_cap_nanos and not req.run_id):
        raise E.InvalidArgument("BAD_RUN_CAP", "run_cap_nanos must be >= 0 and needs a run_id")
    request_id = req.request_id or uuid.uuid4().hex
    alias = resolve_alias(cfg, ident.team, req.model)
    return CallRequest(request_id, ident.team, ident.agent, req.model, alias, prepare(req, cfg.limits), cfg,
                       req.run_id, req.run_cap_nanos)


def _attempt_pb(att: Attempt) -> router_pb2.Attempt:
    out = router_pb2.Attempt(deployment=att.deployment, provider=att.provider, outcome=int(att.outcome),  # type: ignore[arg-type]
                             http_status=att.http_status)
    out.latency.FromNanoseconds(att.latency_ns)
    if att.retry_after_ns is not None:
        out.retry_after.FromNanoseconds(att.retry_after_ns)
    return out


def response_to_pb(res: CallResult) -> router_pb2.GenerateResponse:
    """A served call as the agent receives it."""
    dep, usage = res.deployment, res.usage
    out = router_pb2.GenerateResponse(
        request_id=res.request_id,
        text=res.text,
        tool_calls=[router_pb2.ToolCall(id=c.id, name=c.name, arguments_json=c.arguments_json)
                    for c in res.tool_calls],
        finish_reason=FINISH_TO_PB[res.finish_reason],
        usage=router_pb2.Usage(
            input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
            cached_input_tokens=usage.cached_input_tokens, estimated=not usage.reported,
        ),
        cost_nanos=res.cost_nanos,
        served_by=router_pb2.ServedBy(deployment=dep.name, provider=dep.provider, provider_model=dep.model),
        attempts=[_attempt_pb(a) for a in res.attempts],
    )
    out.latency.FromNanoseconds(res.latency_ns)
    return out


def event_to_pb(ev: StreamEvent) -> router_pb2.GenerateStreamResponse:
    """One event of a streaming call as the agent receives it."""
    if isinstance(ev, TextDelta):
        return router_pb2.GenerateStreamResponse(text_delta=router_pb2.TextDelta(text=ev.text))
    if isinstance(ev, ToolCallDelta):
        return router_pb2.GenerateStreamResponse(tool_call_delta=router_pb2.ToolCallDelta(
            index=ev.index, id=ev.id, name=ev.name, arguments_fragment=ev.arguments_fragment))
    if isinstance(ev, Started):
        dep = ev.deployment
        return router_pb2.GenerateStreamResponse(start=router_pb2.StreamStart(
            request_id=ev.request_id,
            served_by=router_pb2.ServedBy(deployment=dep.name, provider=dep.provider, provider_model=dep.model)))
    return router_pb2.GenerateStreamResponse(final=response_to_pb(ev))


async def stream_to_pb(events: AsyncIterator[StreamEvent]) -> AsyncIterator[router_pb2.GenerateStreamResponse]:
    """A streaming call's events as the agent receives them."""
    async for ev in events:
        if isinstance(ev, TextDelta):  # the common event, converted inline
            yield router_pb2.GenerateStreamResponse(text_delta=router_pb2.TextDelta(text=ev.text))
        else:
            yield event_to_pb(ev)


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    """What agents call."""

    def __init__(self, router: Router) -> None:
        self._router = router

    async def Generate(
        self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.GenerateResponse:
        router = self._router
        call = call_from_pb(current_identity(), request, router.config)
        return response_to_pb(await router.engine.unary(call, context.time_remaining()))

    async def GenerateStream(
        self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.GenerateStreamResponse]:
        router = self._router
        call = call_from_pb(current_identity(), request, router.config)
        async for ev in router.engine.stream(call, context.time_remaining()):
            if isinstance(ev, TextDelta):  # the common event, converted inline
                yield router_pb2.GenerateStreamResponse(text_delta=router_pb2.TextDelta(text=ev.text))
            else:
                yield event_to_pb(ev)

    async def ListModels(
        self, request: router_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListModelsResponse:
        ident = current_identity()
        cfg = self._router.config
        try:
            prices = await self._router.prices.get(0)
        except grpc.RpcError:
            prices = {}
        out = router_pb2.ListModelsResponse()
        for alias in sorted(cfg.aliases.values(), key=lambda a: a.name):
            if ident.team and not alias.allows(ident.team):
                continue
            info = out.models.add(alias=alias.name, description=alias.description, strategy=alias.strategy)
            for name in alias.candidates:
                d = cfg.deployments[name]
                cand = info.candidates.add(
                    deployment=d.name, provider=d.provider, provider_model=d.model,
                    context_window=d.context_window, supports_tools=d.supports_tools,
                    supports_images=d.supports_images, supports_streaming=d.supports_streaming,
                )
                if d.price in prices:
                    cand.price.CopyFrom(prices[d.price])
        return out

    async def GetBudget(
        self, request: router_pb2.GetBudgetRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.GetBudgetResponse:
        ident = current_identity()
        try:
            resp = await self._router.backends.ledger.GetBudget(
                ledger_pb2.GetBudgetRequest(team=ident.team, agent=ident.agent), timeout=5
            )
        except grpc.RpcError:
            raise E.Unavailable("LEDGER_UNAVAILABLE", "the budget ledger could not be reached") from None
        return router_pb2.GetBudgetResponse(budgets=resp.budgets)


class ConfigHolder:
    """Loads, pins and reloads the routing config; a bad reload keeps the last good one."""

    def __init__(
        self, router: Router, path_loader: Callable[[], RoutingConfig], pinned: str | Callable[[], str]
    ) -> None:
        self.router = router
        self._load = path_loader
        self._pinned = pinned
        self.loaded_at = datetime.now(UTC)
        self.last_error = ""
        self._lock = asyncio.Lock()

    @property
    def pinned(self) -> str:
        """The digest the active config was checked against ('' when none is pinned)."""
        return self._pinned() if callable(self._pinned) else self._pinned

    async def reload(self) -> tuple[str, str, bool]:
        """Returns (new sha, previous sha, changed); raises FailedPrecondition and keeps the old config."""
        async with self._lock:
            previous = self.router.config.sha256
            try:
                cfg = self._load()
            except ConfigError as err:
                self.last_error = str(err)
                self.router.metrics.config_reloads.labels("rejected").inc()
                _LOGGER.error("config reload rejected; keeping the last good config",
                              extra={"error": str(err), "active_sha256": previous})
                raise E.FailedPrecondition("CONFIG_INVALID", f"reload rejected, old config kept: {err}",
                                           {"active_sha256": previous}) from None
            self.last_error = ""
            changed = cfg.sha256 != previous
            if changed:
                self.router.apply_config(cfg)
                self.loaded_at = datetime.now(UTC)
            self.router.metrics.config_reloads.labels("applied" if changed else "unchanged").inc()
            _LOGGER.info("config reloaded", extra={"sha256": cfg.sha256, "previous_sha256": previous})
            return cfg.sha256, previous, changed


class RouterAdminServicer(router_pb2_grpc.RouterAdminServiceServicer):
    """What operators call."""

    def __init__(self, holder: ConfigHolder) -> None:
        self._holder = holder

    async def GetConfig(
        self, request: router_pb2.GetConfigRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.GetConfigResponse:
        cfg = self._holder.router.config
        out = router_pb2.GetConfigResponse(
            sha256=cfg.sha256, source=cfg.source, providers=sorted(cfg.providers),
            deployments=sorted(cfg.deployments), aliases=sorted(cfg.aliases),
            pinned_sha256=self._holder.pinned, last_reload_error=self._holder.last_error,
        )
        out.load_time.FromDatetime(self._holder.loaded_at)
        return out

    async def ReloadConfig(
        self, request: router_pb2.ReloadConfigRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ReloadConfigResponse:
        sha, prev, changed = await self._holder.reload()
        return router_pb2.ReloadConfigResponse(sha256=sha, previous_sha256=prev, changed=changed)

    async def ListDeployments(
        self, request: router_pb2.ListDeploymentsRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListDeploymentsResponse:
        router = self._holder.router
        out = router_pb2.ListDeploymentsResponse()
        now_wall = datetime.now(UTC).timestamp()
        now_mono = asyncio.get_running_loop().time()
        for name, d in sorted(router.config.deployments.items()):
            b = router.breakers[name]
            st = b.state()
            item = out.deployments.add(
                name=name, provider=d.provider, provider_model=d.model, breaker_state=_STATE[st],
                consecutive_failures=b.failures, in_flight=b.in_flight,
            )
            if st is State.OPEN:
                item.open_until.FromNanoseconds(int((now_wall + b.open_until() - now_mono) * 1e9))
            if b.latency_ewma_s is not None:
                item.observed_latency.FromNanoseconds(int(b.latency_ewma_s * 1e9))
        return out


def make_loader(settings_path: object, pinned: str) -> Callable[[], RoutingConfig]:
    """A loader bound to the config path and the pinned digest."""
    from pathlib import Path

    path = Path(str(settings_path))
    return lambda: load_config(path, pinned)

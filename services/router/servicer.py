"""Router gRPC servicers: protobuf in and out, identity from the guard; no business rules here."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import grpc

from igw.ledger.v1 import ledger_pb2
from igw.router.v1 import router_pb2, router_pb2_grpc
from services.common import errors as E
from services.common.server import current_identity
from services.router.breaker import State
from services.router.routing import ConfigError, RoutingConfig, load_config
from services.router.service import Router

_LOGGER = logging.getLogger(__name__)
_STATE = {
    State.CLOSED: router_pb2.BREAKER_STATE_CLOSED,
    State.OPEN: router_pb2.BREAKER_STATE_OPEN,
    State.HALF_OPEN: router_pb2.BREAKER_STATE_HALF_OPEN,
}


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    """What agents call."""

    def __init__(self, router: Router) -> None:
        self._router = router

    async def Generate(
        self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.GenerateResponse:
        return await self._router.generate(current_identity(), request, context.time_remaining())

    async def GenerateStream(
        self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.GenerateStreamResponse]:
        async for msg in self._router.generate_stream(current_identity(), request, context.time_remaining()):
            yield msg

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

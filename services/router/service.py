"""The Router: the process's call engine wired to its ports, the live routing config and the
per-deployment breakers.

A call's path: :mod:`services.router.servicer` (protobuf <-> domain) ->
:mod:`services.router.call.engine` (the use case) -> :mod:`services.router.call.plan` (order,
fallback and retry rules, the final error) and :mod:`services.router.call.relay` (streams),
over the ports in :mod:`services.router.call.grpc_ports` (ledger, vault) and the provider
adapters. :meth:`Router.generate` and :meth:`Router.generate_stream` take and return protobuf,
for callers inside the process (the HTTP edge).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable

import httpx

from igw.router.v1 import router_pb2
from services.common.identity import Identity
from services.router.breaker import Breaker, State
from services.router.call.engine import CallEngine
from services.router.call.grpc_ports import Backends, Background, LedgerHolds, PriceBook, VaultCredentials
from services.router.call.http_ports import Adapters
from services.router.call.ports import Clock, SystemClock
from services.router.draw_notes import DrawNotes
from services.router.metrics import RouterMetrics
from services.router.providers.base import ProviderAdapter
from services.router.providers.registry import get_adapter
from services.router.routing import RoutingConfig
from services.router.servicer import call_from_pb, response_to_pb, stream_to_pb
from services.router.settler import LeaseEnder, Settler
from services.router.slices import SliceBook

__all__ = ["Backends", "PriceBook", "Router"]

_BREAKER_GAUGE = {State.CLOSED: 0, State.OPEN: 1, State.HALF_OPEN: 2}


def _adapter(kind: str) -> ProviderAdapter:
    return get_adapter(kind)  # looked up at each attempt (a test may swap the registry's answer)


class Router:
    """Routes agent calls. One instance per process; the config can be swapped atomically."""

    def __init__(
        self, config: RoutingConfig, backends: Backends, http: httpx.AsyncClient, metrics: RouterMetrics, *,
        lease_ttl_s: int = 30, clock: Callable[[], float] = time.monotonic, engine_clock: Clock | None = None,
    ) -> None:
        self.http = http
        self.metrics = metrics
        self.prices = PriceBook(backends.ledger_admin)
        self.lease_ttl_s = lease_ttl_s
        self._clock = clock
        # Kept current in place by apply_config: calls in flight see the new breakers at once.
        self.breakers: dict[str, Breaker] = {}
        self.settler = Settler(backends.ledger, metrics)
        self.slices = SliceBook(backends.ledger, self.prices, metrics)
        self.notes = DrawNotes(backends.ledger, metrics, on_over_limit=self.slices.over_limit)
        self.background = Background()
        self.holds = LedgerHolds(backends.ledger, self.settler, self.notes, self.slices, self.prices, metrics,
                                 self.background)
        self.lease_ends = LeaseEnder(backends.vault, metrics)
        self.credentials = VaultCredentials(backends.vault, lease_ttl_s, metrics, self.background, self.lease_ends)
        self.engine = CallEngine(self.holds, self.credentials, Adapters(http, _adapter), metrics, self.breakers,
                                 engine_clock or SystemClock())
        self._backends = backends
        self.config = config
        self.apply_config(config)

    @property
    def backends(self) -> Backends:
        """The ledger and vault stubs (settable: the ports follow)."""
        return self._backends

    @backends.setter
    def backends(self, backends: Backends) -> None:
        # Every part that holds a stub follows (tests put spies in front of the ledger or vault).
        self._backends = backends
        self.holds.ledger = backends.ledger
        self.settler._ledger = backends.ledger
        self.slices._ledger = backends.ledger
        self.notes._ledger = backends.ledger
        self.prices.admin = backends.ledger_admin
        self.credentials.vault = backends.vault
        self.lease_ends._vault = backends.vault

    def apply_config(self, config: RoutingConfig) -> None:
        """Makes ``config`` active; breakers of deployments that stay are kept."""
        breakers: dict[str, Breaker] = {}
        for name in config.deployments:
            old = self.breakers.get(name)
            if old is not None and old.cfg == config.breaker:
                breakers[name] = old
            else:
                breakers[name] = self._new_breaker(name, config)
        self.breakers.clear()
        self.breakers.update(breakers)
        old_cfg = getattr(self, "config", None)
        if old_cfg is not None and old_cfg.sha256 != config.sha256:
            with contextlib.suppress(KeyError):
                self.metrics.config_info.remove(old_cfg.sha256)
        self.config = config
        self.metrics.config_info.labels(config.sha256).set(1)

    def _new_breaker(self, name: str, config: RoutingConfig) -> Breaker:
        gauge = self.metrics.breaker_state.labels(name)
        gauge.set(0)
        return Breaker(config.breaker, clock=self._clock, on_change=lambda st: gauge.set(_BREAKER_GAUGE[st]))

    async def generate(
        self, ident: Identity, req: router_pb2.GenerateRequest, remaining: float | None,
    ) -> router_pb2.GenerateResponse:
        """One unary call, protobuf in and out. Raises IgwError for the agent."""
        return response_to_pb(await self.engine.unary(call_from_pb(ident, req, self.config), remaining))

    def generate_stream(
        self, ident: Identity, req: router_pb2.GenerateRequest, remaining: float | None,
    ) -> AsyncIterator[router_pb2.GenerateStreamResponse]:
        """One streaming call, protobuf in and out (the request is checked before this returns)."""
        return stream_to_pb(self.engine.stream(call_from_pb(ident, req, self.config), remaining))

    async def drain(self, timeout: float) -> None:
        """Waits for queued draw notes, settles and background releases (graceful shutdown),
        ``timeout`` in all; the slices are released last (a release makes the ledger forget their draws)."""
        deadline = time.monotonic() + timeout
        await self.notes.drain(timeout)
        await self.settler.drain(max(deadline - time.monotonic(), 0.0))
        await self.slices.close(max(deadline - time.monotonic(), 0.0))
        await self.background.wait(max(deadline - time.monotonic(), 0.0))
        await self.lease_ends.drain(max(deadline - time.monotonic(), 0.0))

"""The engine's ports: what a call needs from the outside world, as small protocols.

gRPC implementations (ledger, vault, settler, budget slices) are in
:mod:`services.router.call.grpc_ports`; the provider adapters (HTTP) are behind
:class:`ProviderPort`. Unit tests use fakes of all of them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol

from services.router.call.domain import CallRequest, Lease, NoCredential, Settled
from services.router.providers.domain import ChatRequest, ChatResponse, Timeouts, Usage
from services.router.routing import Deployment, Provider


class Price(Protocol):
    """One model's price per million tokens (the ledger's ModelPrice has these fields)."""

    @property
    def input_per_mtok_nanos(self) -> int: ...

    @property
    def output_per_mtok_nanos(self) -> int: ...

    @property
    def cached_input_per_mtok_nanos(self) -> int: ...


class HoldPort(Protocol):
    """Budget holds: placed per attempt, settled when the call was served, freed otherwise."""

    async def place(
        self, call: CallRequest, attempt: int, dep: Deployment, timeout: float, reserve_sent: Callable[[], None],
    ) -> Lease:
        """A hold for one attempt (a Lease without its credential): drawn from a budget slice, or
        reserved (``reserve_sent`` is called just before a reservation goes out). Raises IgwError
        when the budget says no or cannot be reached."""
        ...

    def free(self, lease: Lease, reason: str) -> None:
        """Gives the attempt's hold back (in the background)."""
        ...

    def release_request(self, request_id: str, reason: str) -> None:
        """Frees every hold of a call that ended early, including one placed after this."""
        ...

    def settle(
        self, request_id: str, lease: Lease, dep: Deployment, usage: Usage, latency_s: float, outcome: Settled,
    ) -> Awaitable[bool] | None:
        """Queues the settle of a served call (retried until acknowledged, in the background).
        Returns what to await before the agent sees success (a hold drawn from a budget slice:
        True once the ledger recorded the draw, or acknowledged the settle, so the call has its
        own spend entry even if the router dies); None when there is nothing to wait for."""
        ...

    async def cost(self, lease: Lease, dep: Deployment, usage: Usage) -> int:
        """What ``usage`` costs at the hold's price version (0 when the price is unknown)."""
        ...

    async def prices(self) -> Mapping[str, Price]:
        """The current price catalogue (empty when it cannot be fetched)."""
        ...

    def refused(self, exc: BaseException) -> bool:
        """Whether ``exc`` (raised by ``place``) says that no hold was placed."""
        ...


class CredentialPort(Protocol):
    """Provider credentials, leased per attempt from the vault."""

    def issue(self, call: CallRequest, dep: Deployment, timeout: float) -> asyncio.Future[Any]:
        """Starts issuing a credential now; the future's result has ``secret`` and ``base_url``."""
        ...

    def bind(self, lease: Lease, issued: Any, call: CallRequest, dep: Deployment) -> None:
        """Takes an issued credential into the attempt's lease (secret, and how to end it)."""
        ...

    def no_credential(self, exc: BaseException) -> NoCredential | None:
        """The skip reason for an issue that failed; None when ``exc`` is not the vault's answer."""
        ...

    def end(self, lease: Lease, used: bool, reason: str) -> None:
        """Tells the vault, in the background, how the lease ended (once)."""
        ...

    def return_when_issued(
        self, issue: asyncio.Future[Any], reason: str, call: CallRequest, dep: Deployment,
    ) -> None:
        """Returns a credential unused once the vault answers, if it issued one."""
        ...


class ProviderPort(Protocol):
    """The provider adapters: one unary call, or one stream of events."""

    def complete(
        self, provider: Provider, secret: str, chat: ChatRequest, timeouts: Timeouts,
    ) -> Awaitable[ChatResponse]: ...

    def stream(self, provider: Provider, secret: str, chat: ChatRequest, timeouts: Timeouts) -> AsyncIterator[Any]: ...


class Clock(Protocol):
    """Monotonic time for deadlines, a precise counter for latencies, and sleeping."""

    def monotonic(self) -> float: ...

    def perf_counter(self) -> float: ...

    def sleep(self, seconds: float) -> Awaitable[None]: ...


class SystemClock:
    """The real clock."""

    monotonic = staticmethod(time.monotonic)
    perf_counter = staticmethod(time.perf_counter)
    sleep = staticmethod(asyncio.sleep)

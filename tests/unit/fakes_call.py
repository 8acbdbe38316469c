"""Fakes of the call engine's ports: no processes, no gRPC, no HTTP, no sleeping."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from services.common import errors as E
from services.router.breaker import Breaker
from services.router.call.domain import CallRequest, CallResult, Lease, NoCredential, Settled, StreamEvent
from services.router.call.engine import CallEngine
from services.router.call.plan import resolve_alias
from services.router.metrics import RouterMetrics
from services.router.providers.domain import (
    ChatRequest,
    ChatResponse,
    ContentPart,
    FinishReason,
    Message,
    StreamEnd,
    TextDelta,
    Timeouts,
    Usage,
)
from services.router.providers.errors import ErrorKind, ProviderError
from services.router.routing import Deployment, Provider, RoutingConfig, parse_config
from services.router.translate import Prepared

NO_CREDENTIAL = "no_credential"  # the vault has no key for the deployment
VAULT_DOWN = "vault_down"  # the vault cannot be reached
URL_MISMATCH = "url_mismatch"  # the vault's key is bound to another base URL
OK = "ok"
BASE = "https://{}.example.com/v1"


def config(strategy: str = "priority", *, n: int = 3, threshold: int = 5, max_attempts: int = 3) -> RoutingConfig:
    """``n`` deployments d1..dn (provider pi, model mi, price ci, context window 1000*i, weight i)."""
    lines = ["providers:"]
    lines += [f'  p{i}: {{type: openai, base_url: "{BASE.format(f"p{i}")}"}}' for i in range(1, n + 1)]
    lines.append("deployments:")
    lines += [f"  d{i}: {{provider: p{i}, model: m{i}, price: c{i}, context_window: {1000 * i}, weight: {i}}}"
              for i in range(1, n + 1)]
    cands = ", ".join(f"d{i}" for i in range(1, n + 1))
    lines += ["models:", f"  m: {{strategy: {strategy}, candidates: [{cands}]}}",
              f"retries: {{max_attempts: {max_attempts}, backoff_initial_ms: 10, backoff_max_ms: 20}}",
              f"breaker: {{failure_threshold: {threshold}, cooldown_ms: 1000, probe_timeout_ms: 500}}"]
    return parse_config("\n".join(lines).encode())


class FakeClock:
    """Time moves only when someone sleeps (or the test says so)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def perf_counter(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@dataclass
class Hold:
    reservation_id: str
    price_version: int = 1


@dataclass
class FakeHolds:
    """HoldPort: records every hold placed, freed and settled."""

    refuse: E.IgwError | None = None
    prices_now: Mapping[str, Any] = field(default_factory=dict)
    placed: list[str] = field(default_factory=list)
    freed: list[tuple[str, str]] = field(default_factory=list)
    settled: list[tuple[str, str, Settled, Usage]] = field(default_factory=list)
    released_requests: list[str] = field(default_factory=list)
    # When set, settle returns this (what the answer waits for: a hold drawn from a budget slice).
    settle_ack: Callable[[], Awaitable[bool]] | None = None

    async def place(self, call: CallRequest, attempt: int, dep: Deployment, timeout: float, reserve_sent: Any) -> Lease:
        reserve_sent()
        if self.refuse is not None:
            raise self.refuse
        self.placed.append(dep.name)
        return Lease(Hold(f"h-{attempt}-{dep.name}"))

    def free(self, lease: Lease, reason: str) -> None:
        self.freed.append((lease.hold.reservation_id.split("-")[-1], reason))

    def release_request(self, request_id: str, reason: str) -> None:
        self.released_requests.append(reason)

    def settle(self, request_id: str, lease: Lease, dep: Deployment, usage: Usage, latency_s: float,
               outcome: Settled) -> Awaitable[bool] | None:
        self.settled.append((request_id, dep.name, outcome, usage))
        return None if self.settle_ack is None else self.settle_ack()

    async def cost(self, lease: Lease, dep: Deployment, usage: Usage) -> int:
        return usage.input_tokens + 10 * usage.output_tokens

    async def prices(self) -> Mapping[str, Any]:
        return self.prices_now

    def refused(self, exc: BaseException) -> bool:
        return isinstance(exc, E.IgwError)


@dataclass
class Issued:
    secret: str
    base_url: str


class VaultRefusal(Exception):
    def __init__(self, reason: str, transient: bool) -> None:
        self.reason, self.transient = reason, transient


@dataclass
class FakeCredentials:
    """CredentialPort: a credential per deployment unless the script says otherwise."""

    script: dict[str, str] = field(default_factory=dict)  # deployment -> NO_CREDENTIAL | VAULT_DOWN | URL_MISMATCH
    ended: list[tuple[str, bool, str]] = field(default_factory=list)

    def issue(self, call: CallRequest, dep: Deployment, timeout: float) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        what = self.script.get(dep.name, OK)
        if what == NO_CREDENTIAL:
            fut.set_exception(VaultRefusal("NO_ACTIVE_KEY", False))
        elif what == VAULT_DOWN:
            fut.set_exception(VaultRefusal("VAULT_UNAVAILABLE", True))
        else:
            url = BASE.format("elsewhere") if what == URL_MISMATCH else call.cfg.providers[dep.provider].base_url
            fut.set_result(Issued(f"sk-{dep.name}", url))
        return fut

    def bind(self, lease: Lease, issued: Any, call: CallRequest, dep: Deployment) -> None:
        lease.end = dep.name

    def no_credential(self, exc: BaseException) -> NoCredential | None:
        if isinstance(exc, VaultRefusal):
            return NoCredential(exc.reason, transient=exc.transient)
        return None

    def end(self, lease: Lease, used: bool, reason: str) -> None:
        name, lease.end = lease.end, None
        if isinstance(name, str):
            self.ended.append((name, used, reason))

    def return_when_issued(self, issue: asyncio.Future[Any], reason: str, call: CallRequest, dep: Deployment) -> None:
        pass


@dataclass
class FakeProviders:
    """ProviderPort: per provider model, a list of what each attempt does (an ErrorKind, or OK)."""

    script: dict[str, list[object]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)

    def _next(self, chat: ChatRequest, secret: str) -> object:
        self.calls.append(chat.model)
        self.secrets.append(secret)
        steps = self.script.get(chat.model, [])
        return steps.pop(0) if steps else OK

    @staticmethod
    def _error(kind: object) -> ProviderError:
        assert isinstance(kind, ErrorKind)
        status = {ErrorKind.RATE_LIMITED: 429, ErrorKind.OVERLOADED: 529, ErrorKind.SERVER_ERROR: 500,
                  ErrorKind.AUTH_FAILED: 401, ErrorKind.BAD_REQUEST: 400, ErrorKind.CONTEXT_TOO_LONG: 400,
                  ErrorKind.CONTENT_REFUSED: 400, ErrorKind.REDIRECT_REFUSED: 302}.get(kind)
        retry = 0.25 if kind is ErrorKind.RATE_LIMITED else None
        return ProviderError(kind, f"fake: {kind.value}", status_code=status, retry_after_s=retry)

    async def complete(self, provider: Provider, secret: str, chat: ChatRequest, timeouts: Timeouts) -> ChatResponse:
        step = self._next(chat, secret)
        if step != OK:
            raise self._error(step)
        return ChatResponse(f"from {chat.model}", (), FinishReason.STOP, Usage(3, 2), "resp")

    async def stream(
        self, provider: Provider, secret: str, chat: ChatRequest, timeouts: Timeouts,
    ) -> AsyncIterator[Any]:
        step = self._next(chat, secret)
        if step != OK:
            raise self._error(step)
        yield TextDelta(f"from {chat.model}")
        yield StreamEnd(FinishReason.STOP, Usage(3, 2))


@dataclass
class Rig:
    """One engine over fakes, and the means to call it."""

    cfg: RoutingConfig
    holds: FakeHolds = field(default_factory=FakeHolds)
    creds: FakeCredentials = field(default_factory=FakeCredentials)
    providers: FakeProviders = field(default_factory=FakeProviders)
    clock: FakeClock = field(default_factory=FakeClock)
    breakers: dict[str, Breaker] = field(default_factory=dict)
    engine: CallEngine = field(init=False)

    def __post_init__(self) -> None:
        self.breakers.update({n: Breaker(self.cfg.breaker, clock=self.clock.monotonic) for n in self.cfg.deployments})
        self.engine = CallEngine(self.holds, self.creds, self.providers, RouterMetrics(CollectorRegistry()),
                                 self.breakers, self.clock)

    def request(self, request_id: str = "r-1") -> CallRequest:
        chat = ChatRequest("", (Message("user", (ContentPart("text", text="hello"),)),), 16)
        return CallRequest(request_id, "team", "agent", "m", resolve_alias(self.cfg, "team", "m"),
                           Prepared(chat, 100, False, False), self.cfg)

    async def call(self, stream: bool, remaining: float | None = 30.0) -> CallResult:
        """One call, unary or streaming; a stream's events are checked and its result returned."""
        if not stream:
            return await self.engine.unary(self.request(), remaining)
        events: list[StreamEvent] = [ev async for ev in self.engine.stream(self.request(), remaining)]
        result = events[-1]
        assert isinstance(result, CallResult)
        assert [type(e).__name__ for e in events] == ["Started", "TextDelta", "CallResult"]
        assert events[0].deployment == result.deployment  # type: ignore[union-attr]
        assert result.text == events[1].text  # type: ignore[union-attr]
        return result

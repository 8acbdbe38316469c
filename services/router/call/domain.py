"""The call engine's own types: what a call asks for, how each attempt ended, what it answers.

No protobuf and no gRPC here: the servicer converts the wire types to and from these.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from services.router.providers.domain import FinishReason, TextDelta, ToolCall, ToolCallDelta, Usage
from services.router.routing import Alias, Deployment, RoutingConfig
from services.router.translate import Prepared


class Outcome(enum.IntEnum):
    """How one attempt ended (the numbers are the wire enum's, so converting is free)."""

    SUCCESS = 1
    RATE_LIMITED = 2
    OVERLOADED = 3
    SERVER_ERROR = 4
    TIMEOUT = 5
    CONNECT_ERROR = 6
    CONTEXT_TOO_LONG = 7
    CONTENT_REFUSED = 8
    BAD_REQUEST = 9
    AUTH_FAILED = 10
    PROTOCOL_ERROR = 11
    BREAKER_OPEN = 12
    NO_CREDENTIAL = 13


class Settled(enum.IntEnum):
    """How a served call ended, as it is settled (the numbers are the ledger's CallOutcome)."""

    SUCCESS = 1
    CANCELLED = 2
    PROVIDER_ERROR = 3


@dataclass(slots=True)
class Attempt:
    """One attempt of a call. ``cause`` says more than ``outcome`` where we know more: the provider
    error kind (``auth_failed``, ``redirect_refused``...), the vault's reason for issuing no
    credential (``NO_ACTIVE_KEY``, ``VAULT_UNAVAILABLE``...), ``LEASE_BASE_URL_MISMATCH``."""

    deployment: str
    provider: str
    outcome: Outcome
    latency_ns: int = 0
    http_status: int = 0
    retry_after_ns: int | None = None
    cause: str = ""


@dataclass(frozen=True, slots=True)
class CallRequest:
    """One agent call, validated: who, which alias, the neutral request, and the config it runs under."""

    request_id: str
    team: str
    agent: str
    model: str
    alias: Alias
    prep: Prepared
    cfg: RoutingConfig
    run_id: str = ""
    run_cap_nanos: int = 0


class HoldRecord(Protocol):
    """What a hold carries for the engine (the ledger's ReserveResponse has these fields)."""

    @property
    def reservation_id(self) -> str: ...

    @property
    def price_version(self) -> int: ...


@dataclass(slots=True)
class Lease:
    """One attempt's hold and credential. ``hold`` is the port's own record of the hold (it has a
    ``reservation_id`` and a ``price_version``); ``drawn`` is set when the hold came from a budget
    slice; ``end`` is how the port ends the credential (None once ended); ``secret`` is cleared as
    soon as the provider call has it; ``counted`` is the port's mark of a call it counts in flight
    (None once settled or freed)."""

    hold: HoldRecord
    drawn: object | None = None
    secret: str = ""
    end: object | None = None
    counted: object | None = None


@dataclass(frozen=True, slots=True)
class Started:
    """The first stream event: the call is committed to ``deployment``."""

    request_id: str
    deployment: Deployment


@dataclass(slots=True)
class CallResult:
    """A served call: the answer, what it used and cost, where it ran, every attempt."""

    request_id: str
    text: str
    tool_calls: tuple[ToolCall, ...] | list[ToolCall]
    finish_reason: FinishReason
    usage: Usage
    cost_nanos: int
    deployment: Deployment
    attempts: list[Attempt] = field(default_factory=list)
    latency_ns: int = 0


# What a streaming call yields: Started, then the provider's deltas, then the CallResult.
StreamEvent = Started | TextDelta | ToolCallDelta | CallResult


class NoCredential(Exception):
    """No credential for this deployment: ``reason`` from the vault (or ours); ``transient`` when
    the vault could not be reached in time (a configuration problem otherwise)."""

    def __init__(self, reason: str, *, transient: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient

"""Typed errors of the igw client, decoded from the gRPC status the gateway returns.

    IgwError                      (code, reason, domain, message, metadata)
    ├── ClientConfigError         bad or missing local configuration (no RPC was made)
    │   └── CertificateExpired    the client certificate is past its notAfter
    ├── InvalidArgument           INVALID_ARGUMENT
    ├── NotFound                  NOT_FOUND
    │   └── ModelNotFound         reason UNKNOWN_MODEL
    ├── AlreadyExists             ALREADY_EXISTS
    ├── FailedPrecondition        FAILED_PRECONDITION
    │   ├── ModelNotPriced        reason MODEL_NOT_PRICED
    │   ├── ModelMisconfigured    no deployment usable: no key, key refused (401/403), ...
    │   └── NoBudget              reason NO_BUDGET (no budget applies to the team; an operator sets one)
    ├── PermissionDenied          PERMISSION_DENIED
    ├── Unauthenticated           UNAUTHENTICATED
    ├── ResourceExhausted         RESOURCE_EXHAUSTED
    │   ├── BudgetExceeded        reason BUDGET_EXCEEDED (remaining_nanos, limit_nanos, ...)
    │   └── RateLimited           reason RATE_LIMITED / UPSTREAM_RATE_LIMITED
    ├── Unavailable               UNAVAILABLE (retried only when the router was not reached
    │   │                         or is draining; see ``retryable``)
    │   └── NoCandidates          reason ALL_CANDIDATES_FAILED / ALL_BREAKERS_OPEN
    ├── DeadlineExceeded          DEADLINE_EXCEEDED
    ├── Cancelled                 CANCELLED
    ├── Aborted                   ABORTED
    ├── Unimplemented             UNIMPLEMENTED
    └── Internal                  INTERNAL, UNKNOWN, DATA_LOSS, OUT_OF_RANGE

The class is chosen by the stable ``reason`` of the ``google.rpc.ErrorInfo`` detail
first (reasons are the contract), then by the status code. The detail is read from the
``grpc-status-details-bin`` trailer with :mod:`igw.rpc.v1.status_pb2`, wire-compatible
copies of ``google.rpc.Status``/``ErrorInfo``/``RetryInfo``, so only protobuf is needed.
``retry_delay`` carries ``RetryInfo`` (seconds); ``attempts`` the router's per-attempt
metadata when every candidate of a model failed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, ClassVar

import grpc

from igw.rpc.v1 import error_reason_pb2, status_pb2

__all__ = [
    "Aborted",
    "AlreadyExists",
    "BudgetExceeded",
    "Cancelled",
    "CertificateExpired",
    "ClientConfigError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "IgwError",
    "Internal",
    "InvalidArgument",
    "ModelMisconfigured",
    "ModelNotFound",
    "ModelNotPriced",
    "NoBudget",
    "NoCandidates",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "decode_status_details",
    "error_class",
    "error_from_rpc_error",
    "format_nanos",
    "is_retryable_error",
]

_DETAILS_KEY = "grpc-status-details-bin"
_ERROR_INFO_TYPE = "google.rpc.ErrorInfo"
_RETRY_INFO_TYPE = "google.rpc.RetryInfo"
# UNAVAILABLE reasons that mean "this router is going away": safe to send again elsewhere.
# The catalogue of reasons (protos/igw/rpc/v1/error_reason.proto): a reason the client matches on
# is a value of it, so a typo fails at import rather than silently never matching.
_R = error_reason_pb2.ErrorReason
_DRAINING_REASONS = frozenset({_R.Name(_R.DRAINING)})
_ATTEMPT_KEY = re.compile(r"^attempt_(\d+)_([a-z_]+)$")
_NANOS_PER_DOLLAR = Decimal(1_000_000_000)


def format_nanos(nanos: int) -> str:
    """Nano-dollars as a dollar string, exact (Decimal, never float): ``1234500000`` -> ``$1.2345``."""
    dollars = Decimal(nanos) / _NANOS_PER_DOLLAR
    text = f"{dollars:.9f}".rstrip("0")
    whole, _, frac = text.partition(".")
    frac = frac.ljust(2, "0")
    sign = "-" if whole.startswith("-") else ""
    return f"{sign}${whole.lstrip('-')}.{frac}"


class IgwError(Exception):
    """Any error from the igw gateway (or from the client's own configuration).

    Attributes:
        code: the gRPC status code (``None`` for local configuration errors).
        reason: the stable UPPER_SNAKE reason of the ErrorInfo detail ("" when none).
        domain: the error domain, e.g. ``"ledger.igw"`` ("" when none).
        message: the human-readable message.
        metadata: the ErrorInfo metadata (string values).
        retry_delay: seconds to wait before a retry may succeed (``google.rpc.RetryInfo``), or None.
    """

    default_code: ClassVar[grpc.StatusCode | None] = None

    def __init__(
        self,
        code: grpc.StatusCode | None,
        reason: str = "",
        domain: str = "",
        message: str = "",
        metadata: Mapping[str, str] | None = None,
        retry_delay: float | None = None,
    ) -> None:
        self.code = code if code is not None else self.default_code
        self.reason = reason
        self.domain = domain
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})
        self.retry_delay = retry_delay
        super().__init__(str(self))

    @property
    def code_name(self) -> str:
        """The status code's name, e.g. ``"RESOURCE_EXHAUSTED"`` (``"CLIENT"`` for local errors)."""
        return self.code.name if self.code is not None else "CLIENT"

    @property
    def retryable(self) -> bool:
        """True for errors the client retries by itself: see :func:`is_retryable_error`."""
        return is_retryable_error(self.code, self.reason)

    @property
    def attempts(self) -> list[dict[str, str]]:
        """The router's attempts when every candidate failed, in order: dicts with
        ``deployment``, ``outcome`` (e.g. ``AUTH_FAILED``) and, when known, ``http_status``,
        ``cause`` and ``retry_after_ms``. Empty for other errors."""
        found: dict[int, dict[str, str]] = {}
        for key, value in self.metadata.items():
            match = _ATTEMPT_KEY.match(key)
            if match:
                found.setdefault(int(match.group(1)), {})[match.group(2)] = value
        return [found[n] for n in sorted(found)]

    def metadata_int(self, key: str) -> int | None:
        """A metadata value as an int, or ``None`` when absent or not an integer."""
        value = self.metadata.get(key)
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            return None

    def __str__(self) -> str:
        head = self.code_name
        if self.reason:
            head = f"{head} {self.reason}"
        return f"{head}: {self.message}" if self.message else head

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code_name}, reason={self.reason!r}, "
            f"domain={self.domain!r}, message={self.message!r}, metadata={self.metadata!r})"
        )


class ClientConfigError(IgwError, ValueError):
    """The client's configuration is unusable (a missing file, no address...). No RPC was made."""

    def __init__(self, message: str, reason: str = "CLIENT_CONFIG") -> None:
        super().__init__(None, reason=reason, domain="client.igw", message=message)


class CertificateExpired(ClientConfigError):
    """The client certificate is past its notAfter: re-issue it (``igw pki issue ...``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="CERTIFICATE_EXPIRED")


class InvalidArgument(IgwError):
    """The request is malformed; retrying it unchanged will not help."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(IgwError):
    """The named thing (e.g. a model alias) does not exist."""

    default_code = grpc.StatusCode.NOT_FOUND


class ModelNotFound(NotFound):
    """The model alias is not in the routing config (or not allowed for the team)."""


class AlreadyExists(IgwError):
    """The thing to create exists already."""

    default_code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(IgwError):
    """The system is not in a state where the request can be done."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class ModelNotPriced(FailedPrecondition):
    """The ledger has no price for the model, so no budget hold can be sized."""


class ModelMisconfigured(FailedPrecondition):
    """No deployment of the model is usable until an operator acts: no key in the vault, a key
    the provider refuses (401/403), a key bound to another base URL. ``attempts`` says which."""


class NoBudget(FailedPrecondition):
    """No budget applies to the team (or agent), and the gateway refuses unbudgeted teams: an
    operator must set one. Retrying does not help."""

    @property
    def team(self) -> str:
        """The team that has no budget."""
        return str(self.metadata.get("team", ""))


class PermissionDenied(IgwError):
    """The caller's certificate identity may not do this."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(IgwError):
    """The caller presented no usable identity."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(IgwError):
    """A budget, quota or capacity limit was hit."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class BudgetExceeded(ResourceExhausted):
    """The team's (or agent's) budget cannot cover the call; the metadata says what remains."""

    @property
    def remaining_nanos(self) -> int | None:
        """What the budget has left, in nano-dollars."""
        return self.metadata_int("remaining_nanos")

    @property
    def limit_nanos(self) -> int | None:
        """The budget's hard limit, in nano-dollars."""
        return self.metadata_int("limit_nanos")

    @property
    def spent_nanos(self) -> int | None:
        """Settled spend in the current window, in nano-dollars."""
        return self.metadata_int("spent_nanos")

    @property
    def held_nanos(self) -> int | None:
        """Open holds in the current window, in nano-dollars."""
        return self.metadata_int("held_nanos")

    @property
    def requested_nanos(self) -> int | None:
        """The hold the call asked for, in nano-dollars, when the server says."""
        return self.metadata_int("requested_nanos")

    @property
    def window(self) -> str:
        """The budget window that refused (e.g. ``"BUDGET_WINDOW_DAILY"``), when the server says."""
        return self.metadata.get("window", "")

    @property
    def remaining_dollars(self) -> str | None:
        """``remaining_nanos`` as a dollar string (exact)."""
        nanos = self.remaining_nanos
        return None if nanos is None else format_nanos(nanos)


class RateLimited(ResourceExhausted):
    """Too many calls; slow down (``retry_after_seconds`` in the metadata when known)."""

    @property
    def retry_after_seconds(self) -> float | None:
        """When a retry may pass, in seconds (the server's google.rpc.RetryInfo), when it says."""
        value = self.metadata.get("retry_after_seconds", "")
        try:
            return float(value) if value else None
        except ValueError:
            return None


class Unavailable(IgwError):
    """The gateway (or every provider behind it) cannot serve now; retried by the client."""

    default_code = grpc.StatusCode.UNAVAILABLE


class NoCandidates(Unavailable):
    """No deployment behind the alias could take the call (breakers open, all failed)."""


class DeadlineExceeded(IgwError):
    """The call's deadline passed."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(IgwError):
    """The call was cancelled."""

    default_code = grpc.StatusCode.CANCELLED


class Aborted(IgwError):
    """A conflict, e.g. a request id reused with another payload."""

    default_code = grpc.StatusCode.ABORTED


class Unimplemented(IgwError):
    """The server does not implement this method (yet)."""

    default_code = grpc.StatusCode.UNIMPLEMENTED


class Internal(IgwError):
    """A server bug or unexpected state; details are in the server log only."""

    default_code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[IgwError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.UNKNOWN: Internal,
    grpc.StatusCode.DATA_LOSS: Internal,
}

# Reasons are the stable contract; they select a subclass of the code's class. A reason
# arriving with an unexpected code still maps to its class so `except BudgetExceeded` works.
_BY_REASON: dict[str, type[IgwError]] = {
    _R.Name(_R.BUDGET_EXCEEDED): BudgetExceeded,
    _R.Name(_R.RATE_LIMITED): RateLimited,
    _R.Name(_R.UPSTREAM_RATE_LIMITED): RateLimited,
    _R.Name(_R.MODEL_NOT_PRICED): ModelNotPriced,
    _R.Name(_R.NO_BUDGET): NoBudget,
    _R.Name(_R.ALL_CANDIDATES_FAILED): NoCandidates,
    _R.Name(_R.ALL_BREAKERS_OPEN): NoCandidates,
    _R.Name(_R.PROVIDER_AUTH_FAILED): ModelMisconfigured,
    _R.Name(_R.PROVIDER_REDIRECT_REFUSED): ModelMisconfigured,
    _R.Name(_R.NO_CREDENTIAL): ModelMisconfigured,
    _R.Name(_R.LEASE_BASE_URL_MISMATCH): ModelMisconfigured,
    _R.Name(_R.DEPLOYMENTS_MISCONFIGURED): ModelMisconfigured,
    _R.Name(_R.UNKNOWN_MODEL): ModelNotFound,
}


def _status_code(err: grpc.RpcError) -> grpc.StatusCode:
    code_fn = getattr(err, "code", None)
    code = code_fn() if callable(code_fn) else None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _details(err: grpc.RpcError) -> str:
    details_fn = getattr(err, "details", None)
    details = details_fn() if callable(details_fn) else None
    return details if isinstance(details, str) else ""


def _trailers(err: grpc.RpcError) -> tuple[tuple[str, Any], ...]:
    trailers_fn = getattr(err, "trailing_metadata", None)
    trailers = trailers_fn() if callable(trailers_fn) else None
    return tuple(trailers or ())


def decode_status_details(blob: bytes) -> tuple[str, str, dict[str, str], str | None]:
    """Decodes a ``grpc-status-details-bin`` value into ``(reason, domain, metadata, message)``.

    Returns empty values when the blob has no ``google.rpc.ErrorInfo``; raises nothing on
    garbage (a malformed trailer must not hide the status code).
    """
    try:
        status = status_pb2.Status.FromString(blob)
    except Exception:  # any decode failure means "no details", never a crash
        return "", "", {}, None
    message = status.message or None
    for detail in status.details:
        if detail.type_url.rsplit("/", 1)[-1] != _ERROR_INFO_TYPE:
            continue
        try:
            info = status_pb2.ErrorInfo.FromString(detail.value)
        except Exception:  # a malformed ErrorInfo is as good as none
            info = None
        if info is not None:
            return info.reason, info.domain, dict(info.metadata), message
    return "", "", {}, message


def is_retryable_error(code: grpc.StatusCode | None, reason: str) -> bool:
    """Whether the client may send the same request (same request id) again by itself.

    Only when the router was not reached or is going away: UNAVAILABLE from gRPC itself (no
    igw ErrorInfo: connection refused or reset, a router shutting down) or with reason
    ``DRAINING``. An UNAVAILABLE the router chose (every candidate failed, the ledger is down)
    already had the router's own retries and fallbacks; sending it again would multiply
    provider requests, so it goes to the caller with ``retry_delay`` when known.
    """
    return code == grpc.StatusCode.UNAVAILABLE and (not reason or reason in _DRAINING_REASONS)


def _retry_delay(blob: bytes) -> float | None:
    try:
        status = status_pb2.Status.FromString(blob)
    except Exception:  # garbage trailer: no delay, never a crash
        return None
    for detail in status.details:
        if detail.type_url.rsplit("/", 1)[-1] != _RETRY_INFO_TYPE:
            continue
        try:
            info = status_pb2.RetryInfo.FromString(detail.value)
        except Exception:
            return None
        return float(info.retry_delay.seconds) + float(info.retry_delay.nanos) / 1e9
    return None


def error_class(code: grpc.StatusCode | None, reason: str) -> type[IgwError]:
    """The typed error class for a status code and ErrorInfo reason."""
    if reason in _BY_REASON:
        return _BY_REASON[reason]
    if code is None:
        return IgwError
    return _BY_CODE.get(code, IgwError)


def error_from_rpc_error(err: grpc.RpcError) -> IgwError:
    """Turns a ``grpc.RpcError`` / ``grpc.aio.AioRpcError`` into one typed :class:`IgwError`."""
    code = _status_code(err)
    message = _details(err)
    reason, domain = "", ""
    metadata: dict[str, str] = {}
    retry_delay: float | None = None
    for key, value in _trailers(err):
        if key == _DETAILS_KEY and isinstance(value, bytes):
            reason, domain, metadata, status_message = decode_status_details(value)
            retry_delay = _retry_delay(value)
            if not message and status_message:
                message = status_message
            break
    cls = error_class(code, reason)
    return cls(code, reason=reason, domain=domain, message=message, metadata=metadata, retry_delay=retry_delay)

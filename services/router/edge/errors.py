"""igw errors in each HTTP API's own shape, so the official SDKs raise their usual exceptions.

The mapping is generic: by gRPC code (the standard google.rpc code -> HTTP table) and by a
few reasons, so whatever domain error the call engine raises reaches the caller with the
same reason it has on gRPC (in ``error.code`` for OpenAI, in the ``x-igw-error-reason``
header for both). A budget refusal is the API's exhausted-quota answer:

- OpenAI: 429 ``{"type": "insufficient_quota", "code": "insufficient_quota"}`` (the SDK
  raises ``RateLimitError``);
- Anthropic: 402 ``billing_error`` (the SDK raises ``PaymentRequiredError``);

both with ``x-should-retry: false``, so the SDKs do not retry what cannot succeed. Other
``RESOURCE_EXHAUSTED`` errors (rate limits, overload) are 429 with ``retry-after``.
Bodies carry only messages igw wrote: never a secret, a prompt or a completion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import grpc

from services.common import errors as E

# google.rpc.Code -> HTTP status (googleapis/google/rpc/code.proto).
_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_OPENAI_TYPE = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
    409: "conflict_error", 413: "invalid_request_error", 429: "rate_limit_exceeded", 503: "service_unavailable",
    504: "timeout",
}
_ANTHROPIC_TYPE = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
    504: "timeout_error",
}
DEFAULT_RETRY_AFTER_S = 1.0


def is_budget(err: E.IgwError) -> bool:
    """A refusal because the team's (or agent's) budget is spent: retrying will not help."""
    return err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "BUDGET" in err.reason


@dataclass
class HttpError:
    """One error answer: status, headers and a JSON body."""

    status: int
    body: dict[str, object]
    headers: dict[str, str] = field(default_factory=dict)
    reason: str = ""


def _common(err: E.IgwError, status: int) -> dict[str, str]:
    headers = {"x-igw-error-reason": err.reason}
    delay = getattr(err, "retry_delay_s", None)  # RetryInfo, when the engine knows when to retry
    if delay is None:
        delay = _float(err.metadata.get("retry_after_s"))
    if delay is None and status in (429, 503, 529):
        delay = DEFAULT_RETRY_AFTER_S
    if delay is not None and not is_budget(err):
        headers["retry-after"] = str(max(1, math.ceil(delay)))
        headers["retry-after-ms"] = str(max(1, int(delay * 1000)))
    if is_budget(err) or err.code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT,
                                      grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND):
        headers["x-should-retry"] = "false"
    return headers


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


def _status(err: E.IgwError) -> int:
    if err.reason in ("REQUEST_TOO_LARGE", "BODY_TOO_LARGE"):
        return 413
    return _HTTP.get(err.code, 500)


def _message(err: E.IgwError) -> str:
    meta = err.metadata
    if is_budget(err) and "remaining_nanos" in meta:
        return f"{err.message}: remaining {meta['remaining_nanos']} nano-USD, needed {meta.get('requested_nanos', '?')}"
    return err.message


def openai_error(err: E.IgwError) -> HttpError:
    """``{"error": {"message", "type", "param", "code"}}`` as the OpenAI API answers."""
    status = _status(err)
    etype, code = _OPENAI_TYPE.get(status, "server_error"), err.reason.lower()
    if is_budget(err):
        etype = code = "insufficient_quota"
    elif err.code == grpc.StatusCode.NOT_FOUND and err.reason == "UNKNOWN_MODEL":
        code = "model_not_found"
    error = {"message": _message(err), "type": etype, "param": err.metadata.get("param"), "code": code}
    body: dict[str, object] = {"error": error}
    return HttpError(status, body, _common(err, status), err.reason)


def anthropic_error(err: E.IgwError) -> HttpError:
    """``{"type": "error", "error": {"type", "message"}}`` as the Anthropic API answers."""
    status = 402 if is_budget(err) else _status(err)
    if status == 503 and err.reason == "ALL_CANDIDATES_FAILED":
        status = 529  # the provider's own "overloaded" status, which its SDK retries
    etype = _ANTHROPIC_TYPE.get(status, "overloaded_error" if status == 529 else "api_error")
    body: dict[str, object] = {"type": "error", "error": {"type": etype, "message": _message(err)}}
    return HttpError(status, body, _common(err, status), err.reason)


def bad_field(reason: str, param: str, message: str) -> E.InvalidArgument:
    """A 400 naming the offending field (``param`` in OpenAI's body, and in the message)."""
    return E.InvalidArgument(reason, f"{param}: {message}", {"param": param})


def internal() -> E.Internal:
    """What the caller sees for a bug: nothing about it (the traceback stays in the log)."""
    return E.Internal("INTERNAL", "internal error")


"""How Gemini's errors map to ProviderError: the ``google.rpc`` status of its error body
(``error.status``, ``error.details``), else the HTTP status; ``RetryInfo`` gives the retry delay.

The provider's message is inspected (an over-long prompt, an invalid key), never copied.
"""

from __future__ import annotations

import math
import re

from .errors import ErrorKind, ProviderError, safe_token, summarize

__all__ = ["typed_error"]

_STATUS_KINDS = {
    "resource_exhausted": ErrorKind.RATE_LIMITED,
    "unavailable": ErrorKind.OVERLOADED,
    "unauthenticated": ErrorKind.AUTH_FAILED,
    "permission_denied": ErrorKind.AUTH_FAILED,
    "invalid_argument": ErrorKind.BAD_REQUEST,
    "failed_precondition": ErrorKind.BAD_REQUEST,
    "not_found": ErrorKind.BAD_REQUEST,
    "internal": ErrorKind.SERVER_ERROR,
    "deadline_exceeded": ErrorKind.TIMEOUT,
}

_TOKEN_LIMIT = re.compile(
    r"(token count|tokens?).{0,80}(exceed|too long|too large|limit)|exceeds the maximum number of tokens",
    re.IGNORECASE | re.DOTALL,
)
_AUTH_REASONS = frozenset({"API_KEY_INVALID", "API_KEY_EXPIRED", "API_KEY_SERVICE_BLOCKED"})
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*\Z")


def _retry_delay(details: object) -> float | None:
    if not isinstance(details, list):
        return None
    for d in details:
        if isinstance(d, dict) and str(d.get("@type", "")).endswith("google.rpc.RetryInfo"):
            delay = d.get("retryDelay")
            if isinstance(delay, str):
                m = _DURATION.match(delay)
                if m:
                    secs = float(m.group(1))
                    if math.isfinite(secs):
                        return min(secs, 86400.0)
    return None


def _auth_reason(details: object) -> bool:
    if not isinstance(details, list):
        return False
    return any(isinstance(d, dict) and d.get("reason") in _AUTH_REASONS for d in details)


def typed_error(provider: str, err: object, status: int | None, *, in_stream: bool = False) -> ProviderError:
    """The ProviderError for Gemini's ``error`` object ``err`` (from a body or a stream) and HTTP ``status``."""
    err = err if isinstance(err, dict) else {}
    gstatus = safe_token(err.get("status"))
    code = err.get("code")
    http_status = status if status is not None else (code if isinstance(code, int) else None)
    details = err.get("details")
    kind = _STATUS_KINDS.get(gstatus or "")
    if kind is None:
        if http_status == 429:
            kind = ErrorKind.RATE_LIMITED
        elif http_status in (401, 403):
            kind = ErrorKind.AUTH_FAILED
        elif http_status == 503:
            kind = ErrorKind.OVERLOADED
        elif http_status is None or http_status >= 500:
            kind = ErrorKind.SERVER_ERROR
        else:
            kind = ErrorKind.BAD_REQUEST
    if kind is ErrorKind.BAD_REQUEST:
        message = err.get("message")
        # The message is only inspected, never copied.
        if _auth_reason(details):
            kind = ErrorKind.AUTH_FAILED
        elif isinstance(message, str) and _TOKEN_LIMIT.search(message):
            kind = ErrorKind.CONTEXT_TOO_LONG
    return ProviderError(
        kind,
        summarize(provider, status, gstatus, "stream error" if in_stream else ""),
        status_code=status,
        retry_after_s=_retry_delay(details),
    )

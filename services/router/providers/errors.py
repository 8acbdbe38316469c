"""Typed provider errors.

A :class:`ProviderError` never carries text written by the provider: upstream
error messages may echo the API key back (OpenAI: ``"Incorrect API key
provided: sk-..."``). The summary is composed by us from the provider name,
the HTTP status and, at most, one error type/code token that matches
``^[a-z0-9_.]{1,64}$``.
"""

from __future__ import annotations

import enum
import re

__all__ = ["ErrorKind", "ProviderError", "safe_token", "summarize"]

_TOKEN_RE = re.compile(r"^[a-z0-9_.]{1,64}\Z")


class ErrorKind(enum.Enum):
    """Classification of an upstream failure."""

    RATE_LIMITED = "rate_limited"
    OVERLOADED = "overloaded"
    CONTEXT_TOO_LONG = "context_too_long"
    CONTENT_REFUSED = "content_refused"
    BAD_REQUEST = "bad_request"
    AUTH_FAILED = "auth_failed"
    SERVER_ERROR = "server_error"
    TIMEOUT = "timeout"
    CONNECT_ERROR = "connect_error"
    PROTOCOL_ERROR = "protocol_error"
    REDIRECT_REFUSED = "redirect_refused"


_RETRYABLE = frozenset(
    {
        ErrorKind.RATE_LIMITED,
        ErrorKind.OVERLOADED,
        ErrorKind.SERVER_ERROR,
        ErrorKind.TIMEOUT,
        ErrorKind.CONNECT_ERROR,
        ErrorKind.PROTOCOL_ERROR,
    }
)


def safe_token(value: object) -> str | None:
    """Return ``value`` lower-cased if it is a short ``[a-z0-9_.]`` token, else None.

    Only such tokens (error types/codes like ``rate_limit_exceeded``) may be
    copied from a provider response into a summary.
    """
    if not isinstance(value, str):
        return None
    lowered = value.lower()
    if _TOKEN_RE.match(lowered) is None:
        return None
    return lowered


def summarize(provider: str, status_code: int | None, token: object = None, detail: str = "") -> str:
    """Build a summary such as ``"openai: HTTP 429 rate_limit_exceeded"``.

    ``detail`` must be a constant written by us (never provider text).
    """
    pieces = [f"{provider}:"]
    if status_code is not None:
        pieces.append(f"HTTP {status_code}")
    tok = safe_token(token)
    if tok is not None:
        pieces.append(tok)
    if detail:
        pieces.append(detail)
    return " ".join(pieces)


class ProviderError(Exception):
    """A failed upstream call, classified by :class:`ErrorKind`.

    ``str(error)`` is exactly ``error.summary``.
    """

    __slots__ = ("kind", "retry_after_s", "status_code", "summary")

    def __init__(
        self,
        kind: ErrorKind,
        summary: str,
        *,
        status_code: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(summary)
        self.kind = kind
        self.summary = summary
        self.status_code = status_code
        self.retry_after_s = retry_after_s

    @property
    def retryable(self) -> bool:
        """Whether another attempt (possibly elsewhere) may succeed."""
        return self.kind in _RETRYABLE

    def __str__(self) -> str:
        return self.summary

    def __repr__(self) -> str:
        return (
            f"ProviderError(kind={self.kind.name}, status_code={self.status_code!r}, "
            f"retry_after_s={self.retry_after_s!r}, summary={self.summary!r})"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild,
            (self.kind, self.summary, self.status_code, self.retry_after_s),
        )


def _rebuild(
    kind: ErrorKind, summary: str, status_code: int | None, retry_after_s: float | None
) -> ProviderError:
    return ProviderError(kind, summary, status_code=status_code, retry_after_s=retry_after_s)

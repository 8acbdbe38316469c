"""Unit tests for ProviderError, error mapping and URL/name checks (no network)."""

from __future__ import annotations

import json
import pickle
import time
from email.utils import formatdate

import httpx
import pytest

from services.router.providers import get_adapter
from services.router.providers.base import (
    build_url,
    check_body_model,
    check_url_name,
    estimate_tokens,
    parse_retry_after,
)
from services.router.providers.errors import ErrorKind, ProviderError, safe_token, summarize

SECRET = "sk-CANARY-0000-secret"


def test_retryable_kinds() -> None:
    retryable = {
        ErrorKind.RATE_LIMITED,
        ErrorKind.OVERLOADED,
        ErrorKind.SERVER_ERROR,
        ErrorKind.TIMEOUT,
        ErrorKind.CONNECT_ERROR,
        ErrorKind.PROTOCOL_ERROR,
    }
    for kind in ErrorKind:
        assert ProviderError(kind, "x").retryable is (kind in retryable)


def test_str_is_summary_and_pickle_roundtrip() -> None:
    err = ProviderError(ErrorKind.RATE_LIMITED, "openai: HTTP 429 x", status_code=429, retry_after_s=2.0)
    assert str(err) == "openai: HTTP 429 x"
    assert "RATE_LIMITED" in repr(err)
    back = pickle.loads(pickle.dumps(err))
    assert (back.kind, back.summary, back.status_code, back.retry_after_s) == (
        err.kind,
        err.summary,
        429,
        2.0,
    )


def test_safe_token() -> None:
    assert safe_token("rate_limit_exceeded") == "rate_limit_exceeded"
    assert safe_token("RESOURCE_EXHAUSTED") == "resource_exhausted"
    assert safe_token("Incorrect API key provided: sk-abc") is None
    assert safe_token("a" * 65) is None
    assert safe_token(429) is None
    assert summarize("openai", 429, "bad token!") == "openai: HTTP 429"


def test_retry_after_forms() -> None:
    assert parse_retry_after(httpx.Headers({"retry-after": "7"})) == 7.0
    assert parse_retry_after(httpx.Headers({"retry-after-ms": "1500", "retry-after": "9"})) == 1.5
    date = formatdate(time.time() + 30, usegmt=True)
    value = parse_retry_after(httpx.Headers({"retry-after": date}))
    assert value is not None and 25 <= value <= 31
    assert parse_retry_after(httpx.Headers({"retry-after": "soon"})) is None
    assert parse_retry_after(httpx.Headers({"retry-after": "-3"})) is None
    assert parse_retry_after(httpx.Headers({})) is None


@pytest.mark.parametrize(
    ("kind", "status", "body", "headers", "expected", "retry"),
    [
        (
            "openai",
            429,
            {"error": {"type": "requests", "code": "rate_limit_exceeded"}},
            {"retry-after": "3"},
            ErrorKind.RATE_LIMITED,
            3.0,
        ),
        ("openai", 400, {"error": {"code": "context_length_exceeded"}}, {}, ErrorKind.CONTEXT_TOO_LONG, None),
        ("openai", 400, {"error": {"code": "content_policy_violation"}}, {}, ErrorKind.CONTENT_REFUSED, None),
        ("openai", 400, {"error": {"type": "invalid_request_error"}}, {}, ErrorKind.BAD_REQUEST, None),
        ("openai", 404, {}, {}, ErrorKind.BAD_REQUEST, None),
        ("openai", 422, {}, {}, ErrorKind.BAD_REQUEST, None),
        ("openai", 401, {}, {}, ErrorKind.AUTH_FAILED, None),
        ("openai", 403, {}, {}, ErrorKind.AUTH_FAILED, None),
        ("openai", 500, {}, {}, ErrorKind.SERVER_ERROR, None),
        ("openai", 502, {}, {}, ErrorKind.SERVER_ERROR, None),
        ("openai", 504, {}, {}, ErrorKind.SERVER_ERROR, None),
        ("openai", 503, {}, {}, ErrorKind.OVERLOADED, None),
        (
            "anthropic",
            429,
            {"type": "error", "error": {"type": "rate_limit_error"}},
            {"retry-after": "4"},
            ErrorKind.RATE_LIMITED,
            4.0,
        ),
        (
            "anthropic",
            529,
            {"type": "error", "error": {"type": "overloaded_error"}},
            {},
            ErrorKind.OVERLOADED,
            None,
        ),
        (
            "anthropic",
            400,
            {
                "type": "error",
                "error": {"type": "invalid_request_error", "message": "prompt is too long: 1 > 0"},
            },
            {},
            ErrorKind.CONTEXT_TOO_LONG,
            None,
        ),
        (
            "anthropic",
            400,
            {"type": "error", "error": {"type": "invalid_request_error", "message": "x"}},
            {},
            ErrorKind.BAD_REQUEST,
            None,
        ),
        (
            "anthropic",
            401,
            {"type": "error", "error": {"type": "authentication_error"}},
            {},
            ErrorKind.AUTH_FAILED,
            None,
        ),
        (
            "anthropic",
            403,
            {"type": "error", "error": {"type": "permission_error"}},
            {},
            ErrorKind.AUTH_FAILED,
            None,
        ),
        (
            "anthropic",
            500,
            {"type": "error", "error": {"type": "api_error"}},
            {},
            ErrorKind.SERVER_ERROR,
            None,
        ),
        (
            "gemini",
            429,
            {
                "error": {
                    "code": 429,
                    "status": "RESOURCE_EXHAUSTED",
                    "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "5s"}],
                }
            },
            {},
            ErrorKind.RATE_LIMITED,
            5.0,
        ),
        ("gemini", 503, {"error": {"code": 503, "status": "UNAVAILABLE"}}, {}, ErrorKind.OVERLOADED, None),
        (
            "gemini",
            400,
            {
                "error": {
                    "code": 400,
                    "status": "INVALID_ARGUMENT",
                    "message": "The input token count (2000000) exceeds the maximum number of tokens "
                    "allowed (1048576).",
                }
            },
            {},
            ErrorKind.CONTEXT_TOO_LONG,
            None,
        ),
        (
            "gemini",
            400,
            {"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": "bad"}},
            {},
            ErrorKind.BAD_REQUEST,
            None,
        ),
        (
            "gemini",
            403,
            {"error": {"code": 403, "status": "PERMISSION_DENIED"}},
            {},
            ErrorKind.AUTH_FAILED,
            None,
        ),
        (
            "gemini",
            401,
            {"error": {"code": 401, "status": "UNAUTHENTICATED"}},
            {},
            ErrorKind.AUTH_FAILED,
            None,
        ),
        (
            "gemini",
            400,
            {
                "error": {
                    "code": 400,
                    "status": "INVALID_ARGUMENT",
                    "details": [
                        {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}
                    ],
                }
            },
            {},
            ErrorKind.AUTH_FAILED,
            None,
        ),
    ],
)
def test_error_mapping(
    kind: str,
    status: int,
    body: dict[str, object],
    headers: dict[str, str],
    expected: ErrorKind,
    retry: float | None,
) -> None:
    adapter = get_adapter(kind)
    err = adapter.map_error(status, httpx.Headers(headers), json.dumps(body).encode())  # type: ignore[attr-defined]
    assert isinstance(err, ProviderError)
    assert err.kind is expected
    assert err.status_code == status
    assert err.retry_after_s == retry
    assert str(err).startswith(f"{kind}: HTTP {status}")


@pytest.mark.parametrize("kind", ["openai", "anthropic", "gemini"])
def test_error_never_contains_provider_message(kind: str) -> None:
    message = f"Incorrect API key provided: {SECRET}"
    bodies = {
        "openai": {"error": {"message": message, "type": message, "code": SECRET}},
        "anthropic": {"type": "error", "error": {"type": message, "message": message}},
        "gemini": {"error": {"code": 400, "message": message, "status": message}},
    }
    adapter = get_adapter(kind)
    for status in (400, 401, 429, 500):
        err = adapter.map_error(status, httpx.Headers({}), json.dumps(bodies[kind]).encode())  # type: ignore[attr-defined]
        assert SECRET not in str(err) and SECRET not in repr(err)
        assert "Incorrect" not in str(err)
    garbage = adapter.map_error(500, httpx.Headers({}), b"<html>" + SECRET.encode())  # type: ignore[attr-defined]
    assert SECRET not in repr(garbage)


@pytest.mark.parametrize(
    "name", ["a/../b", "m#x", "m@evil", "m%2Fx", "m?x=1", "m x", "../m", "m\r\n", "", "a/b"]
)
def test_url_names_refused(name: str) -> None:
    with pytest.raises(ValueError):
        check_url_name(name)


def test_url_names_allowed() -> None:
    for name in ("gemini-2.0-flash", "gpt-4o-mini", "ft:gpt-4o:org:custom:abc", "llama3.1_8b"):
        assert check_url_name(name) == name
    assert check_body_model("meta-llama/Llama-3-8B") == "meta-llama/Llama-3-8B"
    for bad in ("a/../b", "m#x", "m@x", "m%2F", "a//b"):
        with pytest.raises(ValueError):
            check_body_model(bad)


def test_build_url() -> None:
    assert (
        build_url("https://api.openai.com/v1", "/chat/completions")
        == "https://api.openai.com/v1/chat/completions"
    )
    assert (
        build_url("https://api.openai.com/v1/", "/chat/completions")
        == "https://api.openai.com/v1/chat/completions"
    )
    assert (
        build_url(
            "https://g.example:8443",
            "/v1beta/models/m:streamGenerateContent?alt=sse",
            allowed_query="alt=sse",
        )
        == "https://g.example:8443/v1beta/models/m:streamGenerateContent?alt=sse"
    )
    bad_paths = ["/x?key=1", "/../../etc", "/a#frag", "@evil.com/x", "//evil.com/x", "/x\\y"]
    for path in bad_paths:
        with pytest.raises(ValueError):
            build_url("https://api.openai.com/v1", path)
    for base in ("ftp://h/x", "https://user:pw@h/v1", "https://h/v1?key=x", "/relative"):
        with pytest.raises(ValueError):
            build_url(base, "/chat/completions")


def test_estimate_tokens() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("a") == 1
    assert estimate_tokens("abcd") == 1
    assert estimate_tokens("abcde") == 2

"""Adapter protocol, URL building, the shared HTTP client and the call core.

Every adapter goes through :func:`send_unary` / :func:`open_sse` so that the
security and reliability rules live in one place:

* URLs are ``base_url`` (from routing config only) + a fixed path template;
  the result must keep the scheme, host and port of ``base_url``.
* Redirects are never followed (any 3xx → ``REDIRECT_REFUSED``).
* Deadlines: connect (httpx/aiohttp), first byte, idle between chunks and
  total are enforced here with ``asyncio.timeout_at`` regardless of what the
  transport honours.
* Errors never contain provider text or the secret; headers are built from
  scratch by the adapter, nothing from the client is forwarded.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any, Protocol

import httpx

from services.common import ids

from .domain import ChatRequest, ChatResponse, StreamEvent, Timeouts, Usage
from .errors import ErrorKind, ProviderError, summarize
from .transport import (
    USER_AGENT,
    ErrorMapper,
    make_http_client,
    open_sse,
    parse_retry_after,
    send_unary,
)

__all__ = [
    "SAFE_NAME",
    "USER_AGENT",
    "ErrorMapper",
    "ProviderAdapter",
    "build_url",
    "check_body_model",
    "check_secret",
    "check_url_name",
    "dumps",
    "estimate_tokens",
    "estimate_usage",
    "image_mime",
    "load_json_arg",
    "make_http_client",
    "open_sse",
    "parse_json_object",
    "parse_retry_after",
    "protocol_error",
    "send_unary",
    "token_count",
    "try_json_object",
]

_LOGGER = logging.getLogger(__name__)


SAFE_NAME = ids.CONFIG_NAME
# Model names that only travel in a JSON body (OpenAI, Anthropic, vLLM/Ollama)
# may contain "/" (e.g. "meta-llama/Llama-3-8B"), but nothing URL-special.
_BODY_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,255}\Z")
_SECRET = re.compile(r"^[\x21-\x7e]{1,8192}\Z")




class ProviderAdapter(Protocol):
    """Translate :class:`ChatRequest` to one provider's HTTP API."""

    name: str

    async def complete(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        secret: str,
        req: ChatRequest,
        timeouts: Timeouts,
    ) -> ChatResponse:
        """Run a unary call; raise :class:`ProviderError` on failure.

        Raises ValueError, before anything is sent, on a request this provider's API cannot express.
        """
        ...

    def stream(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        secret: str,
        req: ChatRequest,
        timeouts: Timeouts,
    ) -> AsyncIterator[StreamEvent]:
        """Stream a call (async generator ending with ``StreamEnd``).

        Closing the generator (``aclose()``) or cancelling the consuming task
        closes the upstream response immediately. Like :meth:`complete`, the
        first ``__anext__`` raises ValueError on an untranslatable request.
        """
        ...


# --------------------------------------------------------------------------- names / URLs


def check_url_name(name: str) -> str:
    """Return ``name`` if it may be placed in a URL path segment, else raise ValueError."""
    if not isinstance(name, str) or SAFE_NAME.match(name) is None or ".." in name:
        raise ValueError("name is not allowed in an upstream URL")
    return name


def check_body_model(name: str) -> str:
    """Validate a model name sent only in a JSON body (allows '/', refuses '..', '#', '@', '%', '?')."""
    if (
        not isinstance(name, str)
        or _BODY_MODEL.match(name) is None
        or ".." in name
        or "//" in name
        or name.endswith("/")
    ):
        raise ValueError("model name is not allowed")
    return name


def check_secret(provider: str, secret: str) -> None:
    """Refuse an empty secret or one that would break a header (never echoing it)."""
    if not isinstance(secret, str) or _SECRET.match(secret) is None:
        raise ProviderError(ErrorKind.AUTH_FAILED, f"{provider}: credential has an invalid format")


@functools.lru_cache(maxsize=1024)
def build_url(base_url: str, path: str, *, allowed_query: str = "") -> str:
    """Join a configured ``base_url`` and a fixed ``path`` template.

    Pure, so its checks run once per (base URL, path): the result is cached.

    Raises ValueError unless the result keeps the scheme, host and port of
    ``base_url`` and has no query other than ``allowed_query`` (only Gemini's
    ``alt=sse``) and no fragment or userinfo.
    """
    base = httpx.URL(base_url)
    if base.scheme not in ("http", "https") or not base.host:
        raise ValueError("base_url must be an absolute http(s) URL")
    if base.userinfo or base.query or base.fragment:
        raise ValueError("base_url must not carry credentials, a query or a fragment")
    if not path.startswith("/") or "//" in path or "\\" in path or "#" in path or "@" in path:
        raise ValueError("bad path template")
    joined = base_url.rstrip("/") + path
    url = httpx.URL(joined)
    if (url.scheme, url.host, url.port) != (base.scheme, base.host, base.port):
        raise ValueError("built URL escapes base_url")
    if url.fragment or url.userinfo:
        raise ValueError("built URL has a fragment or userinfo")
    query = url.query.decode("ascii")
    if query and query != allowed_query:
        raise ValueError("built URL has an unexpected query")
    base_path = base.path.rstrip("/")
    if not url.path.startswith(base_path) or "/../" in url.path + "/" or "/./" in url.path + "/":
        raise ValueError("built URL path escapes base_url")
    return joined


# --------------------------------------------------------------------------- HTTP client


def estimate_tokens(text: str) -> int:
    """Rough token estimate: ceil(len/4), at least 1 for non-empty text."""
    if not text:
        return 0
    return max(1, (len(text) + 3) // 4)


def estimate_usage(req: ChatRequest, output_text: str) -> Usage:
    """Usage counted from the text when the provider reports none (``reported=False``)."""
    pieces: list[str] = []
    for m in req.messages:
        pieces.append(m.text)
        pieces.extend(tc.arguments_json for tc in m.tool_calls)
    return Usage(
        input_tokens=estimate_tokens("".join(pieces)),
        output_tokens=estimate_tokens(output_text),
        cached_input_tokens=0,
        reported=False,
    )


def protocol_error(provider: str, detail: str) -> ProviderError:
    """A PROTOCOL_ERROR with a fixed detail written by us."""
    return ProviderError(ErrorKind.PROTOCOL_ERROR, summarize(provider, None, None, detail))


def parse_json_object(provider: str, data: bytes | str) -> dict[str, Any]:
    """Parse a JSON object or raise PROTOCOL_ERROR (the body is never kept in the error)."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        raise protocol_error(provider, "malformed JSON") from None
    if not isinstance(obj, dict):
        raise protocol_error(provider, "unexpected JSON shape")
    return obj


def try_json_object(data: bytes) -> dict[str, Any]:
    """Best-effort parse of an error body; {} when it is not a JSON object."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        return {}
    return obj if isinstance(obj, dict) else {}


def token_count(provider: str, value: object) -> int:
    """A non-negative integer token count (None/missing → 0), else PROTOCOL_ERROR."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise protocol_error(provider, "invalid token count")
    return value


def dumps(body: object) -> bytes:
    """Compact JSON encoding for request bodies."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def load_json_arg(value: str, what: str) -> Any:
    """Decode JSON text supplied in a ChatRequest (tool schema / arguments); ValueError if bad."""
    try:
        return json.loads(value) if value else {}
    except (ValueError, RecursionError):
        raise ValueError(f"{what} is not valid JSON") from None


_IMAGE_MIME = re.compile(r"^image/[a-z0-9.+-]{1,64}\Z")


def image_mime(mime_type: str) -> str:
    """Validate the MIME type of inline image bytes."""
    if _IMAGE_MIME.match(mime_type) is None:
        raise ValueError("image_bytes part needs an image/* mime_type")
    return mime_type

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

import asyncio
import email.utils
import functools
import http.cookiejar
import json
import logging
import math
import re
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import Any, Protocol

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from services.common import ids

from .domain import ChatRequest, ChatResponse, StreamEvent, Timeouts, Usage
from .errors import ErrorKind, ProviderError, summarize
from .sse import SSEEvent, SSEParser, SSEProtocolError

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

USER_AGENT = "igw/0.1"

SAFE_NAME = ids.CONFIG_NAME
# Model names that only travel in a JSON body (OpenAI, Anthropic, vLLM/Ollama)
# may contain "/" (e.g. "meta-llama/Llama-3-8B"), but nothing URL-special.
_BODY_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,255}\Z")
_SECRET = re.compile(r"^[\x21-\x7e]{1,8192}\Z")

MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_ERROR_BODY_BYTES = 64 * 1024

ErrorMapper = Callable[[int, httpx.Headers, bytes], ProviderError]


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


class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    """Never store provider cookies (they would be shared across tenants)."""

    def set_ok(self, cookie: http.cookiejar.Cookie, request: object) -> bool:
        return False

    def return_ok(self, cookie: http.cookiejar.Cookie, request: object) -> bool:
        return False


class UpstreamClient(httpx.AsyncClient):
    """The shared upstream client; requests go straight to its transport.

    Upstream calls need none of ``AsyncClient.send``'s machinery: redirects are refused,
    there is no auth flow, and no cookies are kept. Skipping it (and caching parsed URLs)
    removes a large share of the router's CPU per call; the request and response are
    still httpx objects on httpx's public transport API.
    """

    def __init__(self, upstream: httpx.AsyncBaseTransport, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.upstream = upstream


@functools.lru_cache(maxsize=4096)
def _parsed_url(url: str) -> httpx.URL:
    # URLs are config base URL + a fixed path template + a validated model name: few and bounded.
    return httpx.URL(url)


def _build_request(
    client: httpx.AsyncClient, url: str, headers: Mapping[str, str], body: bytes, timeouts: Timeouts
) -> httpx.Request:
    if not isinstance(client, UpstreamClient):
        return client.build_request("POST", url, headers=headers, content=body, timeout=_httpx_timeout(timeouts))
    all_headers = {"user-agent": USER_AGENT, "content-length": str(len(body)), **headers}
    request = httpx.Request("POST", _parsed_url(url), headers=all_headers, content=body)
    request.extensions = {"timeout": _httpx_timeout(timeouts).as_dict()}
    return request


async def _send(client: httpx.AsyncClient, request: httpx.Request) -> httpx.Response:
    if isinstance(client, UpstreamClient):
        resp = await client.upstream.handle_async_request(request)
        resp.request = request
        return resp
    return await client.send(request, stream=True, follow_redirects=False)


def make_http_client(max_connections: int = 512, connect_timeout_s: float = 5.0) -> httpx.AsyncClient:
    """Create the shared upstream client: httpx over an aiohttp transport.

    No redirects, no proxies or CA overrides from the environment, no cookie
    persistence, ``max_connections`` pooled connections (keep-alive 30 s).
    Per-call deadlines are enforced by :func:`send_unary` / :func:`open_sse`.
    """
    ssl_ctx = ssl.create_default_context()
    limits = httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        keepalive_expiry=30.0,
    )

    def _session() -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=max_connections,
            limit_per_host=0,
            keepalive_timeout=30.0,
            ssl=ssl_ctx,
            ttl_dns_cache=10,
        )
        return aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            auto_decompress=False,
        )

    transport = AiohttpTransport(trust_env=False, limits=limits, client=_session)
    return UpstreamClient(
        transport,
        transport=transport,
        follow_redirects=False,
        trust_env=False,
        cookies=http.cookiejar.CookieJar(policy=_NoCookies()),
        timeout=httpx.Timeout(connect=connect_timeout_s, read=300.0, write=60.0, pool=60.0),
        headers={"user-agent": USER_AGENT},
    )


# --------------------------------------------------------------------------- helpers


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


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Read ``retry-after-ms`` or ``retry-after`` (seconds or HTTP date) as seconds."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            ms = float(raw_ms)
        except ValueError:
            ms = math.nan
        if math.isfinite(ms) and ms >= 0:
            return min(ms / 1000.0, 86400.0)
    raw = headers.get("retry-after")
    if not raw:
        return None
    raw = raw.strip()
    try:
        secs = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        secs = when.timestamp() - time.time()
        secs = max(0.0, secs)
    if not math.isfinite(secs) or secs < 0:
        return None
    return min(secs, 86400.0)


def _httpx_timeout(timeouts: Timeouts) -> httpx.Timeout:
    read = max(timeouts.first_byte_s, timeouts.idle_s)
    return httpx.Timeout(
        connect=timeouts.connect_s,
        read=read + 1.0,  # backstop only; our own deadlines fire first
        write=max(timeouts.idle_s, timeouts.connect_s) + 1.0,
        pool=timeouts.total_s + 1.0,
    )


class _Clock:
    """Tracks the first-byte, idle and total deadlines of one call."""

    __slots__ = ("_first", "_idle_s", "_loop", "_total", "got_first")

    def __init__(self, timeouts: Timeouts) -> None:
        self._loop = asyncio.get_running_loop()
        now = self._loop.time()
        self._total = now + timeouts.total_s
        self._first = min(self._total, now + timeouts.first_byte_s)
        self._idle_s = timeouts.idle_s
        self.got_first = False

    def next_deadline(self) -> tuple[float, str]:
        if not self.got_first:
            return self._first, ("first_byte" if self._first < self._total else "total")
        idle = self._loop.time() + self._idle_s
        if idle < self._total:
            return idle, "idle"
        return self._total, "total"


def _timeout_error(provider: str, phase: str) -> ProviderError:
    return ProviderError(ErrorKind.TIMEOUT, summarize(provider, None, None, f"{phase} timeout"))


def _classify(provider: str, exc: BaseException, *, after_headers: bool) -> ProviderError:
    """Map an httpx/aiohttp/OS exception to a ProviderError (no exception text is kept)."""
    cause = exc.__cause__ if isinstance(exc, httpx.HTTPError) else exc
    if isinstance(cause, aiohttp.ConnectionTimeoutError) or (
        isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout)
        and not isinstance(cause, aiohttp.ClientError)
    ):
        if isinstance(exc, httpx.PoolTimeout):
            return _timeout_error(provider, "pool")
        return ProviderError(ErrorKind.CONNECT_ERROR, summarize(provider, None, None, "connect timeout"))
    if isinstance(cause, aiohttp.SocketTimeoutError | asyncio.TimeoutError) or isinstance(
        exc, httpx.ReadTimeout | httpx.WriteTimeout
    ):
        return _timeout_error(provider, "read")
    if isinstance(cause, aiohttp.ClientConnectorError) or isinstance(exc, httpx.ConnectError):
        return ProviderError(ErrorKind.CONNECT_ERROR, summarize(provider, None, None, "connect failed"))
    if after_headers:
        return ProviderError(
            ErrorKind.PROTOCOL_ERROR, summarize(provider, None, None, "connection lost mid-response")
        )
    if isinstance(cause, aiohttp.ServerDisconnectedError | aiohttp.ClientResponseError) or isinstance(
        exc, httpx.RemoteProtocolError
    ):
        return ProviderError(ErrorKind.PROTOCOL_ERROR, summarize(provider, None, None, "bad or no response"))
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return ProviderError(ErrorKind.BAD_REQUEST, summarize(provider, None, None, "unsupported URL"))
    if isinstance(exc, httpx.TimeoutException):
        return _timeout_error(provider, "transport")
    return ProviderError(ErrorKind.CONNECT_ERROR, summarize(provider, None, None, "transport error"))


_TRANSPORT_ERRORS = (httpx.HTTPError, aiohttp.ClientError, OSError)


class _Body:
    """Reads a response body chunk by chunk under the call's deadlines."""

    __slots__ = ("_clock", "_it", "_provider", "_resp")

    def __init__(self, provider: str, resp: httpx.Response, clock: _Clock) -> None:
        self._provider = provider
        self._resp = resp
        self._clock = clock
        self._it = resp.aiter_bytes().__aiter__()

    async def read(self) -> bytes | None:
        """Next non-empty chunk, or None at the end of the body."""
        while True:
            deadline, phase = self._clock.next_deadline()
            try:
                async with asyncio.timeout_at(deadline):
                    chunk = await self._it.__anext__()
            except StopAsyncIteration:
                return None
            except TimeoutError:
                raise _timeout_error(self._provider, phase) from None
            except _TRANSPORT_ERRORS as exc:
                raise _classify(self._provider, exc, after_headers=True) from None
            if chunk:
                self._clock.got_first = True
                return chunk

    async def read_all(self, limit: int) -> bytes:
        """The whole body; PROTOCOL_ERROR if it exceeds ``limit`` bytes."""
        parts: list[bytes] = []
        size = 0
        while (chunk := await self.read()) is not None:
            size += len(chunk)
            if size > limit:
                raise ProviderError(
                    ErrorKind.PROTOCOL_ERROR, summarize(self._provider, None, None, "response too large")
                )
            parts.append(chunk)
        return b"".join(parts)

    async def read_prefix(self, limit: int) -> bytes:
        """Up to ``limit`` bytes (for error bodies); never raises."""
        parts: list[bytes] = []
        size = 0
        try:
            while size < limit and (chunk := await self.read()) is not None:
                parts.append(chunk)
                size += len(chunk)
        except ProviderError:
            pass
        return b"".join(parts)[:limit]


async def _open(
    provider: str,
    client: httpx.AsyncClient,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    timeouts: Timeouts,
    map_error: ErrorMapper,
) -> tuple[httpx.Response, _Body]:
    """Send the request; return a 2xx response and its body reader, or raise."""
    clock = _Clock(timeouts)
    request = _build_request(client, url, headers, body, timeouts)
    deadline, phase = clock.next_deadline()
    try:
        async with asyncio.timeout_at(deadline):
            resp = await _send(client, request)
    except TimeoutError:
        raise _timeout_error(provider, phase) from None
    except _TRANSPORT_ERRORS as exc:
        raise _classify(provider, exc, after_headers=False) from None
    try:
        reader = _Body(provider, resp, clock)
        status = resp.status_code
        if 200 <= status < 300:
            return resp, reader
        if 300 <= status < 400:
            raise ProviderError(
                ErrorKind.REDIRECT_REFUSED,
                summarize(provider, status, None, "redirect refused"),
                status_code=status,
            )
        err_body = await reader.read_prefix(MAX_ERROR_BODY_BYTES)
        err = map_error(status, resp.headers, err_body)
        raise err
    except BaseException:
        await _close(resp)
        raise


async def _close(resp: httpx.Response) -> None:
    try:
        await resp.aclose()
    except Exception:
        _LOGGER.debug("error while closing upstream response", exc_info=False)


async def send_unary(
    provider: str,
    client: httpx.AsyncClient,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    timeouts: Timeouts,
    map_error: ErrorMapper,
) -> tuple[httpx.Headers, bytes]:
    """POST ``body`` and return the headers and complete body of a 2xx answer."""
    resp, reader = await _open(provider, client, url, headers, body, timeouts, map_error)
    try:
        data = await reader.read_all(MAX_BODY_BYTES)
    finally:
        await _close(resp)
    return resp.headers, data


async def open_sse(
    provider: str,
    client: httpx.AsyncClient,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    timeouts: Timeouts,
    map_error: ErrorMapper,
) -> AsyncGenerator[SSEEvent, None]:
    """POST ``body`` and yield the SSE events of a 2xx event-stream answer.

    Async generator: wrap it in ``contextlib.aclosing`` so that closing the
    consumer closes the upstream response at once. It simply stops when the
    body ends; detecting a missing terminal event is the adapter's job.
    """
    resp, reader = await _open(provider, client, url, headers, body, timeouts, map_error)
    try:
        ctype = resp.headers.get("content-type", "")
        if "text/event-stream" not in ctype:
            raise ProviderError(
                ErrorKind.PROTOCOL_ERROR,
                summarize(provider, resp.status_code, None, "not an event stream"),
                status_code=resp.status_code,
            )
        parser = SSEParser()
        while (chunk := await reader.read()) is not None:
            try:
                events = parser.feed(chunk)
            except SSEProtocolError:
                raise ProviderError(
                    ErrorKind.PROTOCOL_ERROR, summarize(provider, None, None, "bad event stream")
                ) from None
            for event in events:
                yield event
    finally:
        await _close(resp)


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

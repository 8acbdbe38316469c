"""The router's HTTPS edge: OpenAI Chat Completions and Anthropic Messages over mTLS.

Routes: ``POST /v1/chat/completions``, ``GET /v1/models``, ``POST /v1/messages``. Each
request is translated into the engine's ``GenerateRequest`` and runs the very same call
as ``Router.Generate`` / ``GenerateStream`` (alias, team access, hold, lease, fallbacks,
breaker, settle, metrics, traces): this module adds no call logic of its own.

Identity is the client certificate, read exactly as on gRPC (the TLS context requires a
certificate chained to the igw CA; the one URI SAN is parsed by services.common.identity)
and the router's authorisation table applies: chat and messages as ``Generate``, models as
``ListModels``.

Limits: the body cap (``client_max_size``), the engine's size, message-count and in-flight
checks, a TLS handshake timeout, an idle/header timeout (aiohttp's keep-alive timer also
closes a connection whose request headers are not complete in time), a body read timeout,
a write timeout per streamed event (a stalled or half-open reader cannot hold a stream),
and a connection cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from igw.router.v1 import router_pb2
from services.common import errors as E
from services.common.identity import Identity, IdentityError, identity_from_der
from services.common.logs import method_var, request_id_var
from services.common.server import parse_listen
from services.common.server_metrics import LATENCY_BUCKETS
from services.common.tracing import server_span
from services.router.authz import POLICY
from services.router.edge import anthropic_api, openai_api
from services.router.edge.errors import HttpError, anthropic_error, bad_field, internal, openai_error
from services.router.edge.fields import dumps, sse
from services.router.service import Router
from services.router.translate import valid_request_id

_LOGGER = logging.getLogger(__name__)
_GENERATE = "/igw.router.v1.RouterService/Generate"
_LIST_MODELS = "/igw.router.v1.RouterService/ListModels"
COST_HEADER = "x-igw-cost-nanos"
REQUEST_ID_HEADER = "x-igw-request-id"
MAX_TIMEOUT_HEADER_S = 3600.0


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    """Timeouts and caps of the HTTPS listener."""

    handshake_timeout_s: float = 10.0
    idle_timeout_s: float = 30.0
    body_timeout_s: float = 60.0
    write_timeout_s: float = 60.0
    max_connections: int = 1024
    max_body_bytes: int = 16 * 1024 * 1024


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.handled = Counter("igw_http_server_handled", "HTTPS edge requests by API, route and HTTP status.",
                               ["api", "route", "status"], registry=registry)
        self.latency = Histogram("igw_http_server_handling_seconds", "Time to answer an HTTPS edge request.",
                                 ["api", "route"], buckets=LATENCY_BUCKETS, registry=registry)
        self.in_flight = Gauge("igw_http_server_in_flight", "HTTPS edge requests being handled now.",
                               registry=registry)
        self.connections = Gauge("igw_http_server_connections", "Open HTTPS edge connections.", registry=registry)
        self.refused = Counter("igw_http_server_refused_connections",
                               "HTTPS edge connections refused at the connection cap.", registry=registry)


class _Refuse:
    """A protocol that drops the connection at once (over the connection cap)."""

    def connection_made(self, transport: Any) -> None:
        transport.abort()

    def connection_lost(self, exc: BaseException | None) -> None:
        return None

    def data_received(self, data: bytes) -> None:
        return None

    def eof_received(self) -> bool:
        return False


Handler = Callable[[web.Request, Identity], Awaitable[web.StreamResponse]]


class EdgeServer:
    """The HTTPS listener; ``await start(host, port)`` returns the bound port."""

    def __init__(
        self, router: Router, listen: str, ssl_context: ssl.SSLContext, registry: CollectorRegistry, *,
        trust_domain: str, limits: EdgeLimits, tracer: Any = None,
    ) -> None:
        self.router, self.listen, self.ssl_context, self.limits = router, listen, ssl_context, limits
        self.trust_domain, self.tracer = trust_domain, tracer
        self.metrics = _Metrics(registry)
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> dict[str, int]:
        """Binds and serves; returns ``{"http_port": port}`` for the ready file."""
        host, port = parse_listen(self.listen)
        app = web.Application(client_max_size=self.limits.max_body_bytes, handler_args={"max_field_size": 16384})
        app.router.add_post("/v1/chat/completions", self._route("openai", "chat.completions", _GENERATE,
                                                                self._chat))
        app.router.add_get("/v1/models", self._route("openai", "models", _LIST_MODELS, self._models))
        app.router.add_post("/v1/messages", self._route("anthropic", "messages", _GENERATE, self._messages))
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        self._runner = web.AppRunner(app, handler_cancellation=True, keepalive_timeout=self.limits.idle_timeout_s,
                                     access_log=None)
        await self._runner.setup()
        inner = self._runner.server
        assert inner is not None

        def factory() -> Any:
            if len(inner.connections) >= self.limits.max_connections:
                self.metrics.refused.inc()
                return _Refuse()
            return inner()

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            factory, host, port, ssl=self.ssl_context, ssl_handshake_timeout=self.limits.handshake_timeout_s,
            backlog=1024,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self.metrics.connections.set_function(lambda: len(inner.connections))
        _LOGGER.info("HTTPS edge listening", extra={"http_port": self.port})
        return {"http_port": self.port}

    async def stop(self, timeout: float) -> None:
        """Stops accepting, lets in-flight requests finish within ``timeout``, then closes."""
        if self._server is not None:
            self._server.close()
        if self._runner is not None and self._runner.server is not None:
            with contextlib.suppress(Exception):
                await self._runner.server.shutdown(max(timeout, 0.1))
            await self._runner.cleanup()

    # ------------------------------------------------------------------ the guard

    def _route(self, api: str, route: str, method: str, handler: Handler) -> Callable[[web.Request], Any]:
        allowed = POLICY.allowed(method)
        render = openai_error if api == "openai" else anthropic_error

        async def wrapped(request: web.Request) -> web.StreamResponse:
            start = time.perf_counter()
            self.metrics.in_flight.inc()
            method_var.set(f"HTTP {request.method} {request.path}")
            request_id_var.set(uuid.uuid4().hex)
            status, reason = 500, ""
            try:
                ident = self._admit(request, allowed)
                with server_span(self.tracer, f"/igw.router.v1.Edge/{route}", request.headers.items()):
                    resp = await handler(request, ident)
                status, reason = resp.status, request.get("igw_reason", "")
                return resp
            except E.IgwError as err:
                out = render(err)
                status, reason = out.status, out.reason
                return _json_error(out)
            except asyncio.CancelledError:
                status, reason = 499, "CANCELLED"
                raise
            except Exception:
                _LOGGER.exception("unexpected error in the HTTPS edge")
                out = render(internal())
                status, reason = out.status, out.reason
                return _json_error(out)
            finally:
                elapsed = time.perf_counter() - start
                self.metrics.in_flight.dec()
                self.metrics.handled.labels(api, route, str(status)).inc()
                self.metrics.latency.labels(api, route).observe(elapsed)
                level = logging.INFO if status < 400 else logging.WARNING
                _LOGGER.log(level, "http", extra={"status": status, "reason": reason, "route": route,
                                                  "elapsed_ms": round(elapsed * 1000, 3)})

        return wrapped

    def _admit(self, request: web.Request, allowed: frozenset[Any]) -> Identity:
        ssl_obj = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = ssl_obj.getpeercert(binary_form=True) if ssl_obj is not None else None
        if not der:
            raise E.PermissionDenied("NO_CLIENT_CERTIFICATE", "a client certificate is required")
        try:
            ident = identity_from_der(der, self.trust_domain)
        except IdentityError as err:
            raise E.PermissionDenied(err.reason, str(err)) from None
        if ident.kind not in allowed:
            raise E.PermissionDenied("METHOD_NOT_ALLOWED", f"{ident.kind.value} identities may not call this",
                                     {"identity_kind": ident.kind.value})
        request_id = request.headers.get(REQUEST_ID_HEADER, "")
        if request_id:
            if not valid_request_id(request_id):
                raise bad_field("BAD_REQUEST_ID", REQUEST_ID_HEADER, "must be [A-Za-z0-9._:-], at most 128")
            request_id_var.set(request_id)
        return ident

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            raw = await asyncio.wait_for(request.read(), self.limits.body_timeout_s)
        except TimeoutError:
            raise E.InvalidArgument("BODY_TIMEOUT", "the request body did not arrive in time") from None
        except web.HTTPRequestEntityTooLarge:
            raise E.InvalidArgument("BODY_TOO_LARGE", f"request body is larger than {self.limits.max_body_bytes} "
                                    "bytes") from None
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise E.InvalidArgument("BAD_JSON", "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise E.InvalidArgument("BAD_JSON", "the request body must be a JSON object")
        messages, cap = body.get("messages"), self.router.config.limits.max_messages
        if isinstance(messages, list) and len(messages) > cap:  # refused before translating them all
            raise bad_field("TOO_MANY_MESSAGES", "messages", f"at most {cap} messages")
        return body

    def _timeout(self, request: web.Request, stream: bool) -> float | None:
        """The caller's own timeout, as the SDKs announce it, bounds a unary call."""
        if stream:
            return None
        for name in ("x-stainless-timeout", "x-stainless-read-timeout"):
            with contextlib.suppress(ValueError):
                value = float(request.headers.get(name, ""))
                if 0 < value:
                    return min(value, MAX_TIMEOUT_HEADER_S)
        return None

    # ------------------------------------------------------------------ routes

    async def _chat(self, request: web.Request, ident: Identity) -> web.StreamResponse:
        body = await self._body(request)
        req, stream, include_usage = openai_api.parse(body, request_id_var.get())
        created = int(time.time())
        if not stream:
            resp = await self.router.generate(ident, req, self._timeout(request, False))
            return _json(openai_api.response(resp, req.model, created), resp)
        chunks = openai_api.ChunkStream(req.model, created, include_usage)

        def frames(ev: router_pb2.GenerateStreamResponse) -> list[bytes]:
            return [sse(c) for c in chunks.events(ev)]

        def error_frame(err: E.IgwError) -> bytes:
            return sse(openai_error(err).body)

        return await self._stream(request, ident, req, frames, error_frame, b"data: [DONE]\n\n")

    async def _messages(self, request: web.Request, ident: Identity) -> web.StreamResponse:
        body = await self._body(request)
        req, stream = anthropic_api.parse(body, request_id_var.get())
        if not stream:
            resp = await self.router.generate(ident, req, self._timeout(request, False))
            return _json(anthropic_api.response(resp, req.model), resp)
        events = anthropic_api.EventStream(req.model)

        def frames(ev: router_pb2.GenerateStreamResponse) -> list[bytes]:
            return [sse(data, name) for name, data in events.events(ev)]

        def error_frame(err: E.IgwError) -> bytes:
            return sse(anthropic_error(err).body, "error")

        return await self._stream(request, ident, req, frames, error_frame, b"")

    async def _stream(
        self, request: web.Request, ident: Identity, req: router_pb2.GenerateRequest,
        frames: Callable[[router_pb2.GenerateStreamResponse], list[bytes]],
        error_frame: Callable[[E.IgwError], bytes], done: bytes,
    ) -> web.StreamResponse:
        """Relays one engine stream as SSE. Errors before the first event are plain HTTP errors."""
        events: AsyncIterator[router_pb2.GenerateStreamResponse] = self.router.generate_stream(ident, req, None)
        first = await events.__anext__()  # raises IgwError before anything is sent
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache",
                                           "x-request-id": first.start.request_id,
                                           "request-id": first.start.request_id})
        try:
            await resp.prepare(request)
            await self._write(resp, frames(first))
            async for ev in events:
                await self._write(resp, frames(ev))
            if done:
                await self._write(resp, [done])
            await asyncio.wait_for(resp.write_eof(), self.limits.write_timeout_s)
        except E.IgwError as err:  # the committed provider's stream broke: the API's in-stream error
            request["igw_reason"] = err.reason
            with contextlib.suppress(Exception):
                await self._write(resp, [error_frame(err)])
                await asyncio.wait_for(resp.write_eof(), self.limits.write_timeout_s)
        except (ConnectionError, TimeoutError) as exc:
            # The caller hung up, or stopped reading (a stalled or half-open peer): drop it.
            request["igw_reason"] = "WRITE_TIMEOUT" if isinstance(exc, TimeoutError) else "CLIENT_GONE"
            if request.transport is not None:
                request.transport.abort()
        except Exception:
            _LOGGER.exception("unexpected error in an HTTPS edge stream")
            request["igw_reason"] = "INTERNAL"
            with contextlib.suppress(Exception):
                await self._write(resp, [error_frame(internal())])
        finally:
            await _aclose(events)
        return resp

    async def _write(self, resp: web.StreamResponse, chunks: list[bytes]) -> None:
        if chunks:
            await asyncio.wait_for(resp.write(b"".join(chunks)), self.limits.write_timeout_s)

    async def _not_found(self, request: web.Request) -> web.StreamResponse:
        """Any other path or method (``/v1/messages/count_tokens`` included), in the API's shape."""
        self.metrics.handled.labels("none", "unknown", "404").inc()
        err = E.NotFound("NO_SUCH_ROUTE", "this igw edge does not serve that path")
        render = anthropic_error if request.path.startswith("/v1/messages") else openai_error
        return _json_error(render(err))

    async def _models(self, request: web.Request, ident: Identity) -> web.StreamResponse:
        cfg = self.router.config
        aliases = [(a.name, a.description) for a in sorted(cfg.aliases.values(), key=lambda a: a.name)
                   if not ident.team or a.allows(ident.team)]
        return web.Response(body=dumps(openai_api.models(aliases, int(time.time()))),
                            content_type="application/json")


def _json(body: dict[str, Any], resp: router_pb2.GenerateResponse) -> web.Response:
    return web.Response(body=dumps(body), content_type="application/json", headers={
        COST_HEADER: str(resp.cost_nanos), "x-request-id": resp.request_id, "request-id": resp.request_id})


def _json_error(err: HttpError) -> web.Response:
    return web.Response(status=err.status, body=dumps(err.body), content_type="application/json",
                        headers=err.headers)


async def _aclose(gen: Any) -> None:
    with contextlib.suppress(Exception):
        await gen.aclose()

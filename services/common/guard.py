"""The guard interceptor: what every call on a service's mTLS port passes before its handler.

In order: the caller's identity from its client certificate, the authorisation table (a
refused caller's request bytes are never decoded for the answer), UNAVAILABLE ``DRAINING``
once the service is stopping, the request's bytes decoded (garbage is INVALID_ARGUMENT
``MALFORMED_REQUEST``), a request id and the method in the logging context, a server span,
errors mapped once to status + ErrorInfo, and the RPC metrics and access log line.
Servicers read the caller's identity with :func:`current_identity`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import Any, cast

import grpc

from services.common import errors as E
from services.common import ids
from services.common.authz import Policy
from services.common.identity import Identity, IdentityError, identity_from_context
from services.common.logs import method_var, request_id_var
from services.common.server_metrics import RpcMetrics
from services.common.tracing import server_span

_LOGGER = logging.getLogger(__name__)
# How long the guard waits for a service to record a refused call before answering anyway.
_DENIAL_HOOK_TIMEOUT_S = 2.0
# (method, request or None for streams, caller's SPIFFE id or "unidentified:<reason>", reason)
DenialHook = Callable[[str, Any, str, str], Awaitable[None]]

# The identity of the call being handled, for servicers (set by the guard).
identity_var: ContextVar[Identity | None] = ContextVar("igw_identity", default=None)


def current_identity() -> Identity:
    """The verified identity of the caller of the RPC being handled."""
    ident = identity_var.get()
    if ident is None:
        raise E.Internal("NO_IDENTITY", "no identity in context")
    return ident


_ALWAYS_ANSWERED = ("/grpc.health.", "/grpc.reflection.")


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates, authorises, tags logs, maps errors and counts, before any handler runs."""

    def __init__(
        self, policy: Policy, trust_domain: str, domain: str, metrics: RpcMetrics, access_log: bool,
        tracer: Any = None, on_denied: DenialHook | None = None,
    ) -> None:
        self._tracer = tracer
        self._on_denied = on_denied
        self._policy = policy
        self._trust_domain = trust_domain
        self._domain = domain
        self._metrics = metrics
        self._access_log = access_log
        self._in_flight = metrics.in_flight.labels(domain.split(".")[0])
        self._labels: dict[str, Callable[[str], tuple[Any, Any]]] = {}
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}
        # Set when a stop begins: new calls get UNAVAILABLE DRAINING (clients send them to another
        # replica at once) while calls already in flight finish. Health and reflection still answer.
        self.draining = False

    def _refuse_if_draining(self, method: str) -> None:
        if self.draining and not method.startswith(_ALWAYS_ANSWERED):
            raise E.Unavailable("DRAINING", "this instance is shutting down; send the call to another one")

    def _method_metrics(self, method: str) -> Callable[[str], tuple[Any, Any]]:
        """For one method: status code -> (latency histogram, handled counter), label lookups cached."""
        cached = self._labels.get(method)
        if cached is None:
            svc, name = method.rsplit("/", 1)
            svc = svc.lstrip("/")
            children: dict[str, tuple[Any, Any]] = {}

            def by_code(code: str, _svc: str = svc, _name: str = name) -> tuple[Any, Any]:
                c = children.get(code)
                if c is None:
                    c = children[code] = (
                        self._metrics.latency.labels(_svc, _name, code),
                        self._metrics.handled.labels(_svc, _name, code),
                    )
                return c

            cached = self._labels[method] = by_code
        return cached

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # type: ignore[return-value]
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        # Registered handlers never change: wrap each one once, not on every call.
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap_handler(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap_handler(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        # Single-request methods receive raw bytes: the guard authorises the caller first and
        # decodes afterwards, so a denied caller's bytes are never parsed for the answer and
        # garbage is INVALID_ARGUMENT with ErrorInfo, never grpc's UNKNOWN with decoder text.
        allowed = self._policy.allowed(method)
        decode = handler.request_deserializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(method, allowed, handler.unary_unary, decode),
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(method, allowed, handler.unary_stream, decode),
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(method, allowed, handler.stream_unary, None),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(method, allowed, handler.stream_stream, None),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _authorize(self, method: str, allowed: frozenset[Any], context: Any) -> Identity:
        """The caller's identity, if the table lets it call ``method``; raises PermissionDenied."""
        try:
            ident = identity_from_context(context, self._trust_domain)
        except IdentityError as err:
            raise E.PermissionDenied(err.reason, str(err)) from None
        if ident.kind not in allowed:
            raise E.PermissionDenied(
                "METHOD_NOT_ALLOWED",
                f"{ident.kind.value} identities may not call {method}",
                {"method": method, "identity_kind": ident.kind.value},
            )
        identity_var.set(ident)
        return ident

    @staticmethod
    def _decode(method: str, decode: Callable[[bytes], Any] | None, raw: Any) -> Any:
        """The request message from its bytes; raises InvalidArgument (the decoder's text stays out)."""
        if decode is None:
            return raw
        try:
            return decode(raw)
        except Exception:
            raise E.InvalidArgument(
                "MALFORMED_REQUEST", "the request bytes are not a valid message for this method",
                {"method": method},
            ) from None

    @staticmethod
    def _decode_quietly(decode: Callable[[bytes], Any] | None, raw: Any) -> Any:
        """The request for the refusal record only (the verdict was made without it); None if garbage."""
        if decode is None:
            return raw
        try:
            return decode(raw)
        except Exception:
            return None

    def _tag(self, method: str, request: Any, context: Any) -> None:
        request_id = getattr(request, "request_id", "") if request is not None and not _is_iter(request) else ""
        if not ids.is_request_id(request_id):
            request_id = ""
            for key, value in context.invocation_metadata() or ():
                if key == "x-request-id" and ids.is_request_id(value):
                    request_id = value
                    break
        request_id_var.set(request_id or uuid.uuid4().hex)
        method_var.set(method)

    async def _denied(
        self, method: str, raw: Any, decode: Callable[[bytes], Any] | None, context: Any, err: E.IgwError,
    ) -> None:
        """Tells the service about a call the authorisation table refused (the vault audits them).

        The verdict is already made; only a service that records refusals decodes the bytes,
        best effort, for the record's fields."""
        if self._on_denied is None:
            return
        request = self._decode_quietly(decode, raw)
        try:
            actor = identity_from_context(context, self._trust_domain).spiffe_id
        except IdentityError as ident_err:
            actor = f"unidentified:{ident_err.reason}"
        try:
            await asyncio.wait_for(self._on_denied(method, request, actor, err.reason), _DENIAL_HOOK_TIMEOUT_S)
        except Exception:
            _LOGGER.exception("a refused call could not be recorded")

    async def _fail(self, context: Any, err: E.IgwError) -> None:
        await context.abort_with_status(E.to_status(err, self._domain))

    def _finish(self, method: str, start: float, code: str, err: BaseException | None, span: Any = None) -> None:
        hist, counter = self._method_metrics(method)(code)
        elapsed = time.perf_counter() - start
        hist.observe(elapsed)
        counter.inc()
        if self._access_log or (code not in ("OK", "CANCELLED") and err is not None):
            level = logging.INFO if code in ("OK",) else logging.WARNING
            reason = getattr(err, "reason", "") if err is not None else ""
            extra: dict[str, Any] = {"code": code, "reason": reason, "elapsed_ms": round(elapsed * 1000, 3)}
            ctx = span.get_span_context() if span is not None else None
            if ctx is not None and ctx.is_valid:
                # The call's span has ended; its ids still tie this line to the trace.
                extra["trace_id"] = f"{ctx.trace_id:032x}"
                extra["span_id"] = f"{ctx.span_id:016x}"
            _LOGGER.log(level, "rpc", extra=extra)

    def _wrap_unary(
        self, method: str, allowed: frozenset[Any], behavior: Any, decode: Callable[[bytes], Any] | None,
    ) -> Any:
        async def wrapped(request: Any, context: Any) -> Any:
            start = time.perf_counter()
            self._in_flight.inc()
            code, err = "OK", cast(BaseException | None, None)
            admitted = False
            span: Any = None
            try:
                self._authorize(method, allowed, context)
                admitted = True
                self._refuse_if_draining(method)
                request = self._decode(method, decode, request)
                self._tag(method, request, context)
                with server_span(self._tracer, method, context.invocation_metadata(), context) as span:
                    return await behavior(request, context)
            except E.IgwError as exc:
                code, err = exc.code.name, exc
                if not admitted:
                    await self._denied(method, request, decode, context, exc)
                await self._fail(context, exc)
            except grpc.aio.AbortError:
                code = (context.code() or grpc.StatusCode.UNKNOWN).name
                raise
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception as exc:
                code, err = "INTERNAL", exc
                _LOGGER.exception("unexpected error in handler")
                await self._fail(context, E.Internal("INTERNAL", "internal error"))
            finally:
                self._in_flight.dec()
                self._finish(method, start, code, err, span)

        return wrapped

    def _wrap_stream(
        self, method: str, allowed: frozenset[Any], behavior: Any, decode: Callable[[bytes], Any] | None,
    ) -> Any:
        if inspect.isasyncgenfunction(behavior):

            async def gen(request: Any, context: Any) -> AsyncIterator[Any]:
                start = time.perf_counter()
                self._in_flight.inc()
                code, err = "OK", cast(BaseException | None, None)
                admitted = False
                span: Any = None
                try:
                    self._authorize(method, allowed, context)
                    admitted = True
                    self._refuse_if_draining(method)
                    request = self._decode(method, decode, request)
                    self._tag(method, request, context)
                    with server_span(self._tracer, method, context.invocation_metadata(), context) as span:
                        async for item in behavior(request, context):
                            yield item
                except E.IgwError as exc:
                    code, err = exc.code.name, exc
                    if not admitted:
                        await self._denied(method, request, decode, context, exc)
                    await self._fail(context, exc)
                except grpc.aio.AbortError:
                    code = (context.code() or grpc.StatusCode.UNKNOWN).name
                    raise
                except (asyncio.CancelledError, GeneratorExit):
                    code = "CANCELLED"
                    raise
                except Exception as exc:
                    code, err = "INTERNAL", exc
                    _LOGGER.exception("unexpected error in stream handler")
                    await self._fail(context, E.Internal("INTERNAL", "internal error"))
                finally:
                    self._in_flight.dec()
                    self._finish(method, start, code, err, span)

            return gen
        return self._wrap_unary(method, allowed, behavior, decode)


def _is_iter(request: Any) -> bool:
    return hasattr(request, "__aiter__") or hasattr(request, "__anext__")


"""The shared gRPC server runtime: mTLS port, probe port, guard interceptor, lifecycle.

``ServiceRuntime`` builds one grpc.aio server on the mTLS port (the service's own
servicers, ``grpc.health.v1``, reflection) and a second plaintext server on the probe
port that serves health and nothing else. Every call on the mTLS port passes the guard
first: identity from the client certificate, the authorisation table, a request id in
the logging context, errors mapped once to status + ErrorInfo, and RPC metrics.

Health service names (the same on the mTLS port and the plaintext probe port):

- ``liveness``: SERVING while the process is up and its event loop answers; NOT_SERVING
  only once shutting down. A Kubernetes liveness probe restarts a process that stops answering.
- ``readiness``: SERVING only while the service can reach what it depends on (the service's
  ``readiness`` check, run every second: a cheap database query for the ledger and the vault,
  a healthy ledger and vault replica for the router) and is not draining.
- ``""`` and each service's full name (e.g. ``igw.ledger.v1.LedgerService``) mirror readiness.

Lifecycle: SERVING once both ports are bound; on SIGTERM/SIGINT health turns
NOT_SERVING, in-flight calls drain within the grace period, then the service's own
closers run (engines, channels, HTTP clients) and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import (
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

from services.common import errors as E
from services.common import ids
from services.common.authz import Policy
from services.common.identity import Identity, IdentityError, identity_from_context
from services.common.logs import method_var, request_id_var
from services.common.pki import describe_cert
from services.common.settings import RuntimeSettings
from services.common.tls import SERVER_OPTIONS, server_credentials
from services.common.tracing import server_span, setup_tracing, shutdown_tracing

_LOGGER = logging.getLogger(__name__)
_RID = ids.REQUEST_ID
# Extra seconds each closer gets past the grace period to release connections and files.
_CLOSE_FLOOR_S = 2.0
# How long the guard waits for a service to record a refused call before answering anyway.
_DENIAL_HOOK_TIMEOUT_S = 2.0
# (method, request or None for streams, caller's SPIFFE id or "unidentified:<reason>", reason)
DenialHook = Callable[[str, Any, str, str], Awaitable[None]]

# The identity of the call being handled, for servicers (set by the guard).
from contextvars import ContextVar  # noqa: E402

identity_var: ContextVar[Identity | None] = ContextVar("igw_identity", default=None)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def current_identity() -> Identity:
    """The verified identity of the caller of the RPC being handled."""
    ident = identity_var.get()
    if ident is None:
        raise E.Internal("NO_IDENTITY", "no identity in context")
    return ident


def cert_not_after(path: os.PathLike[str] | str) -> float:
    """The certificate's notAfter as Unix time (0 when the file cannot be read: the alert then fires)."""
    try:
        with open(path, "rb") as fh:
            return describe_cert(fh.read()).not_after.timestamp()
    except (OSError, ValueError):
        return 0.0


@dataclass
class RpcMetrics:
    """Per-method request counts and latency, on the service's own registry."""

    registry: CollectorRegistry
    handled: Counter = field(init=False)
    latency: Histogram = field(init=False)
    in_flight: Gauge = field(init=False)
    cert_expiry: Gauge = field(init=False)

    def __post_init__(self) -> None:
        # For the certificate-expiry alert (deploy/prometheus): read from the file at each scrape, so a
        # rotated certificate shows at once.
        self.cert_expiry = Gauge(
            "igw_tls_cert_expiry_timestamp_seconds", "notAfter of the certificate the service presents (Unix time).",
            ["service"], registry=self.registry,
        )
        self.handled = Counter(
            "igw_grpc_server_handled",
            "gRPC calls handled, by method and status code.",
            ["service", "method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "igw_grpc_server_handling_seconds",
            "Time to handle a gRPC call, by method and status code.",
            ["service", "method", "code"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "igw_grpc_server_in_flight", "gRPC calls being handled now.", ["service"], registry=self.registry
        )


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
        rid = getattr(request, "request_id", "") if request is not None and not _is_iter(request) else ""
        if not rid or not isinstance(rid, str) or not _RID.match(rid):
            rid = ""
            for key, value in context.invocation_metadata() or ():
                if key == "x-request-id" and isinstance(value, str) and _RID.match(value):
                    rid = value
                    break
        request_id_var.set(rid or uuid.uuid4().hex)
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


def parse_listen(addr: str) -> tuple[str, int]:
    """Splits ``host:port`` (port may be 0)."""
    host, _, port = addr.rpartition(":")
    return host or "127.0.0.1", int(port)


Registrar = Callable[[grpc.aio.Server], None]
Closer = Callable[[], Awaitable[None]]
#: True when the service can reach its dependencies (called every ``readiness_interval_s``).
ReadinessCheck = Callable[[], Awaitable[bool]]
LIVENESS = "liveness"
READINESS = "readiness"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def build_info() -> tuple[str, str]:
    """(version, commit) of this build: the package version, and IGW_BUILD_COMMIT or the git HEAD."""
    from importlib import metadata
    from pathlib import Path

    try:
        version = metadata.version("igw")
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    commit = os.environ.get("IGW_BUILD_COMMIT", "").strip()
    if not commit:
        git = Path(__file__).resolve().parents[2] / ".git"
        try:
            if git.is_file():  # a worktree: "gitdir: <path>"
                git = Path(git.read_text().split(":", 1)[1].strip())
            head = (git / "HEAD").read_text().strip()
            if head.startswith("ref:"):
                ref = head.split(":", 1)[1].strip()
                ref_file = git / ref
                if not ref_file.exists():
                    common = git / "commondir"
                    base = (git / common.read_text().strip()) if common.exists() else git
                    ref_file = base / ref
                    if not ref_file.exists():
                        packed = (base / "packed-refs").read_text().splitlines()
                        head = next((ln.split()[0] for ln in packed if ln.endswith(" " + ref)), "")
                    else:
                        head = ref_file.read_text().strip()
                else:
                    head = ref_file.read_text().strip()
            commit = head[:12]
        except (OSError, IndexError):
            commit = ""
    return version, commit or "unknown"


def add_standard_metrics(registry: CollectorRegistry, service: str) -> Gauge:
    """``process_*``, ``python_info`` and ``igw_build_info{version,commit}`` on ``registry``;
    returns the ``igw_ready`` gauge."""
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR):
        with contextlib.suppress(ValueError):  # already registered
            registry.register(collector)
    version, commit = build_info()
    info = Gauge("igw_build_info", "The running build (value 1).", ["service", "version", "commit"],
                 registry=registry)
    info.labels(service, version, commit).set(1)
    return Gauge("igw_ready", "1 while the readiness health status is SERVING.", registry=registry)


class Listener(Protocol):
    """Another port a service serves next to gRPC (the router's HTTPS edge)."""

    async def start(self) -> dict[str, int]:
        """Binds and serves; returns the ports to add to the ready file (e.g. ``{"http_port": n}``)."""

    async def stop(self, timeout: float) -> None:
        """Stops accepting and drains within ``timeout``."""


class ServiceRuntime:
    """One service's servers and lifecycle. Construct, ``await start()``, ``await wait()``."""

    def __init__(
        self,
        settings: RuntimeSettings,
        *,
        policy: Policy,
        registrars: Iterable[Registrar],
        service_names: Iterable[str],
        registry: CollectorRegistry | None = None,
        closers: Iterable[Closer] = (),
        access_log: bool = True,
        initially_serving: bool = True,
        on_denied: DenialHook | None = None,
        listeners: Iterable[Listener] = (),
        readiness: ReadinessCheck | None = None,
        readiness_interval_s: float = 1.0,
    ) -> None:
        self.settings = settings
        self._listeners = list(listeners)
        self.extra_ports: dict[str, int] = {}
        self.domain = f"{settings.service}.igw"
        self.registry = registry or CollectorRegistry()
        self.metrics = RpcMetrics(self.registry)
        self._ready_gauge = add_standard_metrics(self.registry, settings.service)
        self._readiness = readiness
        self.readiness_interval_s = readiness_interval_s
        self._deps_ok = True
        self._readiness_task: asyncio.Task[None] | None = None
        self.health = HealthServicer()
        self._service_names = list(service_names)
        self._closers = list(closers)
        self._stop_deadline: float | None = None
        self._stopping = asyncio.Event()
        self.tracer = setup_tracing(settings.service, settings.otlp_endpoint, settings.trace_file)
        options = SERVER_OPTIONS
        if settings.reuse_port:  # one of several worker processes on one port (the kernel spreads connections)
            options = (*(o for o in SERVER_OPTIONS if o[0] != "grpc.so_reuseport"), ("grpc.so_reuseport", 1))
        self.guard = GuardInterceptor(
            policy, settings.trust_domain, self.domain, self.metrics, access_log, self.tracer, on_denied,
        )
        self.server = grpc.aio.server(
            interceptors=[self.guard],
            options=options,
            maximum_concurrent_rpcs=None,
        )
        for register in registrars:
            register(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self._service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME],
            self.server,
        )
        self.probe_server = grpc.aio.server(options=options)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.probe_server)
        self.port = 0
        self.probe_port = 0
        self.metrics_port = 0
        self._metrics_httpd: Any = None
        self.serving = False
        self.initially_serving = initially_serving

    async def start(self, *, serving: bool | None = None) -> None:
        """Binds both ports and the metrics port; marks SERVING unless told otherwise."""
        serving = self.initially_serving if serving is None else serving
        s = self.settings
        host, port = parse_listen(s.listen)
        creds = server_credentials(s.tls_cert, s.tls_key, s.tls_ca)
        self.metrics.cert_expiry.labels(s.service).set_function(lambda: cert_not_after(s.tls_cert))
        self.port = self.server.add_secure_port(f"{host}:{port}", creds)
        phost, pport = parse_listen(s.probe_listen)
        self.probe_port = self.probe_server.add_insecure_port(f"{phost}:{pport}")
        await self.server.start()
        await self.probe_server.start()
        for listener in self._listeners:
            self.extra_ports.update(await listener.start())
        mhost, mport = parse_listen(s.metrics_listen)
        httpd, _thread = start_http_server(mport, addr=mhost, registry=self.registry)
        self._metrics_httpd = httpd
        self.metrics_port = httpd.server_address[1]
        await self.health.set(LIVENESS, _SERVING)
        if self._readiness is not None:
            self._deps_ok = await self._check_readiness()
            self._readiness_task = asyncio.get_running_loop().create_task(self._readiness_loop())
        await self.set_serving(serving)
        if s.ready_file is not None:
            tmp = s.ready_file.with_suffix(".tmp")
            tmp.write_text(
                json.dumps(
                    {
                        "service": s.service,
                        "pid": os.getpid(),
                        "grpc_port": self.port,
                        "probe_port": self.probe_port,
                        "metrics_port": self.metrics_port,
                        **self.extra_ports,
                    }
                )
            )
            tmp.replace(s.ready_file)
        _LOGGER.info(
            "listening",
            extra={"grpc_port": self.port, "probe_port": self.probe_port, "metrics_port": self.metrics_port,
                   **self.extra_ports},
        )

    async def set_serving(self, serving: bool) -> None:
        """Opens or closes the service (e.g. a sealed vault); readiness also needs its dependencies."""
        self.initially_serving = serving
        await self._publish()

    @property
    def ready(self) -> bool:
        """What ``readiness`` (and ``""`` and the service names) answer now."""
        return self.serving

    async def _publish(self) -> None:
        ready = self.initially_serving and self._deps_ok and self._stop_deadline is None
        changed = ready != self.serving
        self.serving = ready
        self._ready_gauge.set(1 if ready else 0)
        status = _SERVING if ready else _NOT_SERVING
        await self.health.set(READINESS, status)
        await self.health.set("", status)
        for name in self._service_names:
            await self.health.set(name, status)
        if changed and self.port:
            _LOGGER.log(logging.INFO if ready else logging.WARNING, "readiness changed", extra={"ready": ready})

    async def _check_readiness(self) -> bool:
        assert self._readiness is not None
        try:
            return bool(await asyncio.wait_for(self._readiness(), max(self.readiness_interval_s * 2, 1.0)))
        except Exception as err:  # a check that fails or hangs means "not ready", never a crash
            _LOGGER.debug("readiness check failed", extra={"error": f"{type(err).__name__}: {err}"})
            return False

    async def _readiness_loop(self) -> None:
        while self._stop_deadline is None:
            await asyncio.sleep(self.readiness_interval_s)
            ok = await self._check_readiness()
            if ok != self._deps_ok and self._stop_deadline is None:
                self._deps_ok = ok
                await self._publish()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT start a graceful stop."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)

    async def wait(self) -> None:
        """Blocks until asked to stop, then stops gracefully."""
        await self._stopping.wait()
        await self.stop()

    def time_left(self) -> float:
        """Seconds left of the grace period once a stop has begun (the whole grace before)."""
        if self._stop_deadline is None:
            return self.settings.grace_seconds
        return max(self._stop_deadline - time.monotonic(), 0.0)

    async def stop(self) -> None:
        """NOT_SERVING, drain in-flight calls, close everything: all within one grace period."""
        _LOGGER.info("shutting down", extra={"grace_seconds": self.settings.grace_seconds})
        self._stop_deadline = time.monotonic() + self.settings.grace_seconds
        self.guard.draining = True
        if self._readiness_task is not None:
            self._readiness_task.cancel()
        await self.health.enter_graceful_shutdown()
        self.serving = False
        self._ready_gauge.set(0)
        # Give probes a moment to see NOT_SERVING before the port goes away.
        await asyncio.sleep(min(0.5, self.settings.grace_seconds / 4))
        await asyncio.gather(self.server.stop(self.time_left()),
                             *(listener.stop(self.time_left()) for listener in self._listeners))
        for closer in reversed(self._closers):
            try:
                # Closers get what is left of the grace, and a moment more to release resources.
                await asyncio.wait_for(closer(), self.time_left() + _CLOSE_FLOOR_S)
            except TimeoutError:
                _LOGGER.error("a closer did not finish within the grace period")
            except Exception:
                _LOGGER.exception("error while closing")
        await self.probe_server.stop(0)
        shutdown_tracing()
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
        _LOGGER.info("stopped")

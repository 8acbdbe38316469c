"""OpenTelemetry traces across router, keyvault and ledger. Off by default.

When ``IGW_OTLP_ENDPOINT`` is set spans go to an OTLP/gRPC collector; when
``IGW_TRACE_FILE`` is set they are appended to a JSON-lines file (for local runs and
tests). The W3C trace context travels in gRPC metadata (``traceparent``): the router's
client interceptor injects it, every service's guard extracts it and opens a server
span. Spans carry names, codes, models and token counts; never prompts, completions or
secrets.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter, SpanExportResult

_provider: TracerProvider | None = None


class JsonFileExporter(SpanExporter):
    """Appends one JSON object per finished span to a file."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for s in spans:
            ctx = s.get_span_context()
            parent = s.parent
            lines.append(json.dumps({
                "name": s.name,
                "service": s.resource.attributes.get("service.name"),
                "trace_id": f"{ctx.trace_id:032x}" if ctx else "",
                "span_id": f"{ctx.span_id:016x}" if ctx else "",
                "parent_span_id": f"{parent.span_id:016x}" if parent else "",
                "kind": s.kind.name,
                "start_ns": s.start_time,
                "end_ns": s.end_time,
                "status": s.status.status_code.name,
                "attributes": dict(s.attributes or {}),
                "links": [f"{link.context.trace_id:032x}" for link in s.links or ()],
            }, default=str))
        with self._lock, self._path.open("a") as fh:
            fh.write("\n".join(lines) + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing to release."""


def otlp_insecure(endpoint: str) -> bool:
    """Plaintext only when asked for (``http://``) or to a collector on this host; TLS otherwise
    (``https://`` or a bare remote ``host:port``; CA from ``OTEL_EXPORTER_OTLP_CERTIFICATE``)."""
    if endpoint.startswith("http://"):
        return True
    if endpoint.startswith("https://"):
        return False
    host = endpoint.rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "127.0.0.1", "::1")


def setup_tracing(service: str, otlp_endpoint: str, trace_file: str) -> trace.Tracer | None:
    """Configures the process's tracer provider; returns None when tracing is off."""
    global _provider
    if not otlp_endpoint and not trace_file:
        return None
    if _provider is not None:
        return _provider.get_tracer("igw")
    provider = TracerProvider(resource=Resource.create({"service.name": f"igw-{service}"}))
    if trace_file:
        provider.add_span_processor(SimpleSpanProcessor(JsonFileExporter(Path(trace_file))))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=otlp_endpoint, insecure=otlp_insecure(otlp_endpoint))
        provider.add_span_processor(BatchSpanProcessor(exporter))
    _provider = provider
    return provider.get_tracer("igw")


def shutdown_tracing() -> None:
    """Flushes and stops the exporters."""
    if _provider is not None:
        _provider.shutdown()


def extract(metadata: Any) -> otel_context.Context:
    """The remote parent context from gRPC invocation metadata."""
    carrier = {k: v for k, v in (metadata or ()) if isinstance(v, str)}
    return propagate.extract(carrier)


class _ClientTracing(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Opens a CLIENT span per call and injects ``traceparent`` into the metadata."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        method = client_call_details.method
        name = method.decode() if isinstance(method, bytes) else method
        svc, _, rpc = name.lstrip("/").rpartition("/")
        with self._tracer.start_as_current_span(
            name.lstrip("/"), kind=trace.SpanKind.CLIENT, record_exception=False, set_status_on_exception=False,
        ) as span:
            span.set_attributes({"rpc.system": "grpc", "rpc.service": svc, "rpc.method": rpc})
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            metadata = list(client_call_details.metadata or ()) + list(carrier.items())
            details = client_call_details._replace(metadata=metadata)
            call = await continuation(details, request)
            try:
                await call  # keep the span open until the answer (or error) arrives
            except grpc.aio.AioRpcError as err:
                span.set_attribute("rpc.grpc.status_code", int(err.code().value[0]))
                span.set_status(trace.Status(trace.StatusCode.ERROR))
                raise
            span.set_attribute("rpc.grpc.status_code", 0)
            return call


def client_interceptors(tracer: trace.Tracer | None) -> list[Any]:
    """Interceptors for outgoing channels (empty when tracing is off)."""
    return [] if tracer is None else [_ClientTracing(tracer)]


def server_span(tracer: trace.Tracer | None, method: str, metadata: Any, context: Any = None) -> Any:
    """A context manager: a SERVER span child of the caller's trace, or nothing when off.

    The span carries ``rpc.grpc.status_code`` (the numeric status the call ended with) and is
    marked as an error for the codes that mean the server failed (OpenTelemetry's RPC conventions).
    """
    if tracer is None:
        return _NULL
    svc, _, name = method.lstrip("/").rpartition("/")
    return _ServerSpan(tracer, method.lstrip("/"), svc, name, extract(metadata), context)


# Status codes that are server errors for a SERVER span (OpenTelemetry RPC semantic conventions).
_SERVER_ERROR_CODES = frozenset(c.value[0] for c in (
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
))


def status_code_of(exc: BaseException | None, context: Any = None) -> int:
    """The numeric gRPC status a handler ended with, from its exception (or OK)."""
    import asyncio

    if exc is None:
        return 0
    code = getattr(exc, "code", None)
    if isinstance(code, grpc.StatusCode):
        return int(code.value[0])
    if isinstance(exc, grpc.aio.AbortError) and context is not None:
        c = context.code()
        if isinstance(c, grpc.StatusCode):
            return int(c.value[0])
        return 2
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return 1
    return 13


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NULL = _Null()


class _ServerSpan:
    def __init__(
        self, tracer: trace.Tracer, span_name: str, svc: str, name: str, parent: Any, context: Any = None,
    ) -> None:
        self._context = context
        self._cm = tracer.start_as_current_span(
            span_name, context=parent, kind=trace.SpanKind.SERVER, record_exception=False,
            set_status_on_exception=False,
            attributes={"rpc.system": "grpc", "rpc.service": svc, "rpc.method": name},
        )
        self._span: Any = None

    def __enter__(self) -> Any:
        self._span = self._cm.__enter__()
        return self._span

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> Any:
        span = self._span
        if span is not None and span.is_recording():
            code = status_code_of(exc, self._context)
            span.set_attribute("rpc.grpc.status_code", code)
            if code in _SERVER_ERROR_CODES:
                span.set_status(trace.Status(trace.StatusCode.ERROR))
        return self._cm.__exit__(exc_type, exc, tb)


def annotate_genai(
    alias: str, provider: str, provider_type: str, model: str, input_tokens: int, output_tokens: int,
    cost_nanos: int, request_id: str, *, max_tokens: int = 0, finish_reason: str = "",
) -> None:
    """GenAI semantic-convention attributes on the current span (no content, ever)."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    if max_tokens:
        span.set_attribute("gen_ai.request.max_tokens", max_tokens)
    if finish_reason:
        span.set_attribute("gen_ai.response.finish_reasons", [finish_reason])
    span.set_attributes({
        "gen_ai.operation.name": "chat",
        "gen_ai.system": provider_type,
        "gen_ai.provider.name": provider_type,
        "gen_ai.request.model": alias,
        "gen_ai.response.model": model,
        "gen_ai.usage.input_tokens": input_tokens,
        "gen_ai.usage.output_tokens": output_tokens,
        "igw.provider": provider,
        "igw.cost_nanos": cost_nanos,
        "igw.request_id": request_id,
    })


@contextlib.contextmanager
def attempt_span(
    provider_type: str, provider: str, deployment: str, model: str, attempt: int, *, keep_open: bool = False,
    server_url: str = "",
) -> Iterator[trace.Span | None]:
    """A CLIENT span per upstream attempt (``chat <provider model>``), so fallbacks show in the
    trace; None (and no cost) when the call is not traced. No content, no error text, ever.

    The span is current inside the block. With ``keep_open`` it is not ended when the block exits
    normally (a stream's attempt lasts until its last event): the caller ends it with
    :func:`end_span`. An exception out of the block always ends it.
    """
    if _provider is None or not trace.get_current_span().is_recording():
        yield None
        return
    span = _provider.get_tracer("igw").start_span(
        f"chat {model}", kind=trace.SpanKind.CLIENT, record_exception=False, set_status_on_exception=False,
        attributes={
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": provider_type,
            "gen_ai.request.model": model, "igw.provider": provider, "igw.deployment": deployment,
            "igw.attempt": attempt, **_server_attributes(server_url),
        },
    )
    try:
        with trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
            yield span
    except BaseException:
        span.end()
        raise
    if not keep_open:
        span.end()


def _server_attributes(url: str) -> dict[str, Any]:
    """``server.address`` / ``server.port`` of the provider's base URL (host only, never a path or query)."""
    if not url:
        return {}
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if not parts.hostname:
        return {}
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return {"server.address": parts.hostname, "server.port": port}


def end_span(span: trace.Span | None) -> None:
    """Ends a span kept open by ``attempt_span(keep_open=True)`` (no-op when not traced)."""
    if span is not None:
        span.end()


def attempt_failed(span: trace.Span | None, error_type: str) -> None:
    """Marks an attempt span failed with a bounded error type (an ErrorKind value)."""
    if span is not None:
        span.set_attribute("error.type", error_type)
        span.set_status(trace.Status(trace.StatusCode.ERROR))


def attempt_usage(span: trace.Span | None, input_tokens: int, output_tokens: int) -> None:
    """Token counts on a successful attempt span."""
    if span is not None:
        span.set_attributes({"gen_ai.usage.input_tokens": input_tokens, "gen_ai.usage.output_tokens": output_tokens})


def current_span_context() -> trace.SpanContext | None:
    """The current span's context when the call is traced, else None (cheap when tracing is off)."""
    if _provider is None:
        return None
    ctx = trace.get_current_span().get_span_context()
    return ctx if ctx.is_valid else None


@contextlib.contextmanager
def linked_span(name: str, contexts: Sequence[trace.SpanContext | None], attributes: dict[str, Any]) -> Iterator[None]:
    """A new root span linked to ``contexts`` (work done for many traced calls at once, such as a
    settle batch); nothing when tracing is off or none of the calls was traced."""
    links = [] if _provider is None else [trace.Link(c) for c in contexts if c is not None]
    if _provider is None or not links:
        yield
        return
    with _provider.get_tracer("igw").start_as_current_span(
        name, context=otel_context.Context(), kind=trace.SpanKind.INTERNAL, links=links, attributes=attributes,
    ):
        yield

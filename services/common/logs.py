"""Logging: JSON lines (or readable text), a request id per call, redaction as a backstop.

The request id and method of the call being handled live in ContextVars set by the
server interceptor, so every log line written while handling a call carries them.
Nothing here logs request or response bodies; the redaction filter is a second line
of defence that masks anything shaped like a provider key if one slips through.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time

from opentelemetry import trace

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("igw_request_id", default="")
method_var: contextvars.ContextVar[str] = contextvars.ContextVar("igw_method", default="")

# Shapes of provider keys: OpenAI/Anthropic "sk-...", Google "AIza...", bearer tokens.
_SECRET_SHAPES = re.compile(
    r"(sk-[A-Za-z0-9_\-]{8,}|AIza[0-9A-Za-z_\-]{20,}|(?i:bearer)\s+[A-Za-z0-9._\-]{8,})"
)

_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()) | {"message", "asctime"}


def redact(text: str) -> str:
    """Masks anything shaped like a provider key or bearer token."""
    return _SECRET_SHAPES.sub("[REDACTED]", text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, request_id, method, extras."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        request_id = request_id_var.get()
        if request_id:
            out["request_id"] = request_id
        method = method_var.get()
        if method:
            out["method"] = method
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            # Log lines join their trace: the same ids the spans carry (W3C hex).
            out["trace_id"] = f"{ctx.trace_id:032x}"
            out["span_id"] = f"{ctx.span_id:016x}"
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """Readable one-line text for local runs, redacted likewise."""

    def __init__(self, service: str) -> None:
        super().__init__("%(asctime)s %(levelname)s " + service + " %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = request_id_var.get()
        return redact(f"{line} [rid={request_id}]" if request_id else line)


def configure_logging(service: str, fmt: str = "json", level: str = "INFO") -> None:
    """Configures the root logger once: to stderr, JSON or text."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else TextFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries that would log URLs or bodies at DEBUG stay at WARNING.
    for noisy in ("httpx", "httpcore", "aiohttp", "grpc", "sqlalchemy.engine", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

"""Incremental Server-Sent Events parser (WHATWG event-stream rules).

Feed raw bytes as they arrive, in chunks split anywhere; get complete events
back. Handles ``\\n``, ``\\r\\n`` and ``\\r`` line endings (including a
``\\r\\n`` split across chunks), multi-line ``data:``, ``event:`` / ``id:`` /
``retry:`` fields, comment lines and a leading UTF-8 BOM.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["SSEEvent", "SSEParser", "SSEProtocolError"]

_EOL = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


class SSEProtocolError(ValueError):
    """The byte stream is not a usable event stream (e.g. a line is too long)."""


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched event. ``event`` defaults to ``"message"``."""

    event: str
    data: str
    id: str = ""


class SSEParser:
    """Stateful, incremental event-stream parser."""

    __slots__ = ("_buf", "_data", "_event", "_has_data", "_id", "_max_line", "_pending_cr", "_started")

    def __init__(self, max_line_bytes: int = 4 * 1024 * 1024) -> None:
        self._buf = b""
        self._pending_cr = False
        self._started = False
        self._max_line = max_line_bytes
        self._event = ""
        self._data: list[str] = []
        self._has_data = False
        self._id = ""

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Consume ``chunk`` and return the events it completed."""
        if not chunk:
            return []
        if self._pending_cr:
            self._pending_cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        buf = self._buf + chunk if self._buf else chunk
        if not self._started:
            if len(buf) < len(_BOM) and _BOM.startswith(buf):
                self._buf = buf
                return []
            if buf.startswith(_BOM):
                buf = buf[len(_BOM) :]
            self._started = True
        events: list[SSEEvent] = []
        pos = 0
        end = len(buf)
        for m in _EOL.finditer(buf):
            self._line(buf[pos : m.start()], events)
            pos = m.end()
            if pos == end and m.group() == b"\r":
                # Might be the first half of a CRLF split across chunks.
                self._pending_cr = True
        self._buf = buf[pos:]
        if len(self._buf) > self._max_line:
            raise SSEProtocolError("event-stream line too long")
        return events

    @property
    def has_partial_event(self) -> bool:
        """True if bytes of an undispatched event are buffered (stream cut mid-event)."""
        return bool(self._buf) or self._has_data or bool(self._event)

    def _line(self, raw: bytes, out: list[SSEEvent]) -> None:
        if not raw:
            if self._has_data:
                out.append(SSEEvent(self._event or "message", "\n".join(self._data), self._id))
            self._event = ""
            self._data = []
            self._has_data = False
            return
        if raw[:1] == b":":
            return
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            line = raw.decode("utf-8", errors="replace")
        field, sep, value = line.partition(":")
        if sep and value[:1] == " ":
            value = value[1:]
        if field == "data":
            self._data.append(value)
            self._has_data = True
        elif field == "event":
            self._event = value
        elif field == "id":
            if "\x00" not in value:
                self._id = value
        # "retry" and unknown fields are ignored.

"""Output of `igw`: tables for people, JSON for scripts, one-line errors."""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

import grpc
from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from igw.client import BudgetExceeded, IgwError
from services.cli.parsing import nanos_to_dollars

__all__ = [
    "format_duration",
    "format_error",
    "format_timestamp",
    "message_to_dict",
    "print_json",
    "print_table",
    "with_dollars",
]


def with_dollars(value: Any) -> Any:
    """Adds a ``<name>_usd`` dollar string next to every ``<name>_nanos`` field (recursively)."""
    if isinstance(value, list):
        return [with_dollars(v) for v in value]
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for key, item in value.items():
        out[key] = with_dollars(item)
        if key.endswith("_nanos") and isinstance(item, int | str):
            try:
                out[key[: -len("_nanos")] + "_usd"] = nanos_to_dollars(int(item)).removeprefix("$")
            except ValueError:
                pass
    return out


def message_to_dict(message: Message) -> dict[str, Any]:
    """A protobuf message as a JSON-ready dict: proto field names, defaults included, dollars added."""
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    result: dict[str, Any] = with_dollars(data)
    return result


def print_json(value: Message | Mapping[str, Any] | Sequence[Any], out: TextIO | None = None) -> None:
    """Prints a message (or plain data) as indented JSON."""
    data = message_to_dict(value) if isinstance(value, Message) else with_dollars(value)
    print(json.dumps(data, indent=2, sort_keys=False), file=out or sys.stdout)


def print_table(
    headers: Sequence[str], rows: Iterable[Sequence[object]], out: TextIO | None = None, empty: str = ""
) -> None:
    """Prints aligned columns; numbers and dollar amounts are right-aligned."""
    stream = out or sys.stdout
    body = [["" if cell is None else str(cell) for cell in row] for row in rows]
    if not body:
        if empty:
            print(empty, file=stream)
        return
    widths = [len(h) for h in headers]
    for row in body:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    numeric = [
        any(_is_numeric(row[i]) for row in body) and all(_is_numeric(row[i]) for row in body if row[i] not in ("", "-"))
        for i in range(len(headers))
    ]

    def line(cells: Sequence[str]) -> str:
        parts = [cell.rjust(widths[i]) if numeric[i] else cell.ljust(widths[i]) for i, cell in enumerate(cells)]
        return "  ".join(parts).rstrip()

    print(line([h.upper() for h in headers]), file=stream)
    for row in body:
        print(line(row), file=stream)


def _is_numeric(cell: str) -> bool:
    text = cell.lstrip("-").lstrip("$").replace(",", "").replace(".", "", 1)
    return text.isdigit()


def format_timestamp(ts: Timestamp, *, date_only: bool = False) -> str:
    """A Timestamp as ``2026-11-20 10:00:00Z`` (``-`` when unset)."""
    if not ts.seconds and not ts.nanos:
        return "-"
    value: dt.datetime = ts.ToDatetime(tzinfo=dt.UTC)
    return value.strftime("%Y-%m-%d") if date_only else value.strftime("%Y-%m-%d %H:%M:%SZ")


def format_duration(duration: Duration) -> str:
    """A Duration as ``90d``, ``1h``, ``250ms`` (``-`` when unset)."""
    total_ms = duration.seconds * 1000 + duration.nanos // 1_000_000
    if total_ms <= 0:
        return "-"
    if total_ms < 1000:
        return f"{total_ms}ms"
    seconds = total_ms // 1000
    if total_ms % 1000 and seconds < 60:
        return f"{total_ms / 1000:.2f}s"
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts)


def format_error(err: grpc.RpcError | IgwError) -> str:
    """``error: <CODE> <reason>: <message>`` (+ what remains for BUDGET_EXCEEDED, the retry delay),
    then one line per router attempt when every candidate of a model failed."""
    from igw.client import error_from_rpc_error

    error = err if isinstance(err, IgwError) else error_from_rpc_error(err)
    head = f"error: {error.code_name}"
    if error.reason:
        head += f" {error.reason}"
    line = f"{head}: {error.message}" if error.message else head
    if isinstance(error, BudgetExceeded):
        parts = []
        for label, nanos in (
            ("remaining", error.remaining_nanos),
            ("call needs up to", error.requested_nanos),
            ("limit", error.limit_nanos),
            ("spent", error.spent_nanos),
            ("held", error.held_nanos),
        ):
            if nanos is not None:
                parts.append(f"{label} {nanos_to_dollars(nanos)}")
        who = "/".join(error.metadata[k] for k in ("team", "agent") if error.metadata.get(k))
        window = error.metadata.get("window", "")
        scope = " ".join(x for x in (who, window.lower().removeprefix("budget_window_")) if x)
        if scope:
            parts.append(f"budget {scope}")
        if parts:
            line += " (" + ", ".join(parts) + ")"
    else:
        # Each attempt gets a line of its own below (the root cause of a failed call).
        plain = {k: v for k, v in error.metadata.items() if not k.startswith("attempt_")}
        if plain:
            line += " [" + " ".join(f"{k}={v}" for k, v in sorted(plain.items())) + "]"
    if error.retry_delay is not None:
        line += f" (retry after {error.retry_delay:g}s)"
    lines = [" ".join(line.split("\n"))]
    for n, att in enumerate(error.attempts, start=1):
        parts = [f"  attempt {n}: {att.get('deployment', '?')}", att.get("outcome", "?").lower()]
        if att.get("http_status"):
            parts.append(f"HTTP {att['http_status']}")
        if att.get("cause") and att["cause"].lower() != att.get("outcome", "").lower():
            parts.append(f"({att['cause']})")
        lines.append(" ".join(parts))
    return "\n".join(lines)

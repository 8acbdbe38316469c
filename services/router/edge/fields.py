"""Typed reads of untrusted JSON for both HTTP dialects, each failure a 400 naming the field.

Also what both dialects share: image inputs, the ``igw`` extension object (cost, request id,
serving deployment) and SSE framing.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from igw.router.v1 import router_pb2
from services.router.edge.errors import bad_field

_DATA_URL = re.compile(r"^data:(image/[a-z+.-]+);base64,(.*)$", re.DOTALL)
MAX_BASE64_CHARS = 8 * 1024 * 1024  # ~6 MiB decoded; translate.prepare checks 5 MiB exactly


def obj(value: Any, param: str) -> dict[str, Any]:
    """A JSON object."""
    if not isinstance(value, dict):
        raise bad_field("BAD_FIELD", param, "must be an object")
    return value


def arr(value: Any, param: str) -> list[Any]:
    """A JSON array."""
    if not isinstance(value, list):
        raise bad_field("BAD_FIELD", param, "must be an array")
    return value


def string(value: Any, param: str) -> str:
    """A JSON string."""
    if not isinstance(value, str):
        raise bad_field("BAD_FIELD", param, "must be a string")
    return value


def opt_int(body: dict[str, Any], key: str) -> int | None:
    """An optional integer (not a bool)."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_field("BAD_FIELD", key, "must be an integer")
    if not 0 < value < 2**31:
        raise bad_field("BAD_FIELD", key, "is out of range")
    return value


def opt_num(body: dict[str, Any], key: str) -> float | None:
    """An optional number."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_field("BAD_FIELD", key, "must be a number")
    return float(value)


def stops(value: Any, param: str) -> list[str]:
    """A stop sequence or a list of them."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [string(s, f"{param}[{i}]") for i, s in enumerate(arr(value, param))]


def schema_json(value: Any, param: str) -> str:
    """A JSON-schema object, re-serialised for the engine."""
    if value is None:
        return ""
    return json.dumps(obj(value, param), separators=(",", ":"))


def image_url_part(url: str, param: str) -> router_pb2.ContentPart:
    """An image by ``https://`` URL, or inline as a ``data:image/...;base64,`` URL."""
    m = _DATA_URL.match(url)
    if m is None:
        return router_pb2.ContentPart(image_url=url)
    return image_bytes_part(m.group(1), m.group(2), param)


def image_bytes_part(mime: str, data_b64: str, param: str) -> router_pb2.ContentPart:
    """Inline image bytes from base64 (sizes and types are checked by the engine)."""
    if len(data_b64) > MAX_BASE64_CHARS:
        raise bad_field("BAD_IMAGE", param, "image is larger than 5 MiB")
    try:
        data = base64.b64decode(data_b64, validate=True)
    except (binascii.Error, ValueError):
        raise bad_field("BAD_IMAGE", param, "image data is not valid base64") from None
    return router_pb2.ContentPart(image_bytes=router_pb2.ImageBytes(data=data, mime_type=mime))


def arguments(value: Any, param: str) -> str:
    """Tool-call arguments as a JSON text (OpenAI sends a string, Anthropic an object)."""
    if isinstance(value, str):
        return value or "{}"
    return json.dumps(obj(value, param), separators=(",", ":"))


def parse_arguments(text: str) -> dict[str, Any]:
    """Tool-call arguments as an object (Anthropic's ``input``); non-objects are wrapped."""
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {"value": value}


def igw_extension(resp: router_pb2.GenerateResponse) -> dict[str, Any]:
    """The documented ``igw`` extension object: what the call cost and who served it."""
    return {
        "request_id": resp.request_id,
        "cost_nanos": resp.cost_nanos,
        "usage_estimated": resp.usage.estimated,
        "served_by": {"deployment": resp.served_by.deployment, "provider": resp.served_by.provider,
                      "provider_model": resp.served_by.provider_model},
        "attempts": len(resp.attempts),
    }


def dumps(value: Any) -> bytes:
    """Compact JSON bytes."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def sse(data: Any, event: str | None = None) -> bytes:
    """One server-sent event (``data`` is JSON-encoded unless it is already a string)."""
    payload = data if isinstance(data, str) else dumps(data).decode()
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()

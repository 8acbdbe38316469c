"""Agent request (protobuf) → provider-neutral ChatRequest, with every size and name checked.

Also computes the prompt-token upper bound used to size the budget hold: every token
of a byte-level tokenizer covers at least one byte, so the UTF-8 byte count of all text
bounds the token count from above; images count a fixed upper bound each.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from dataclasses import dataclass

from igw.router.v1 import router_pb2
from services.common import ids
from services.common.errors import InvalidArgument
from services.router.providers.domain import ChatRequest, ContentPart, FinishReason, Message, ToolCall, ToolDef
from services.router.routing import Limits

_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
_CALL_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}\Z")
_REQUEST_ID = ids.REQUEST_ID
_IMAGE_MIME = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
MAX_IMAGE_BYTES = 5 * 1024 * 1024
IMAGE_TOKEN_BOUND = 2000  # above every provider's per-image charge for a 5 MiB image
MESSAGE_OVERHEAD_TOKENS = 8
MAX_TOOLS = 128
MAX_STOP = 8
MAX_NAME_CHARS = 64

_ROLE = {
    router_pb2.ROLE_SYSTEM: "system",
    router_pb2.ROLE_USER: "user",
    router_pb2.ROLE_ASSISTANT: "assistant",
    router_pb2.ROLE_TOOL: "tool",
}

FINISH_TO_PB = {
    FinishReason.STOP: router_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: router_pb2.FINISH_REASON_LENGTH,
    FinishReason.TOOL_CALLS: router_pb2.FINISH_REASON_TOOL_CALLS,
    FinishReason.CONTENT_FILTER: router_pb2.FINISH_REASON_CONTENT_FILTER,
    FinishReason.OTHER: router_pb2.FINISH_REASON_OTHER,
}


@dataclass(frozen=True, slots=True)
class Prepared:
    """A validated request: the neutral ChatRequest (model filled per deployment) and its bounds."""

    chat: ChatRequest
    prompt_tokens_upper_bound: int
    has_images: bool
    has_tools: bool


def _bad(reason: str, message: str) -> InvalidArgument:
    return InvalidArgument(reason, message)


def _valid_name(name: str) -> bool:
    """A participant name: 1-64 characters, none of them control, format or unassigned (category C)."""
    return 0 < len(name) <= MAX_NAME_CHARS and not any(unicodedata.category(ch)[0] == "C" for ch in name)


def valid_request_id(value: str) -> bool:
    """Whether an agent-supplied request id is acceptable."""
    return bool(_REQUEST_ID.match(value))


def prepare(req: router_pb2.GenerateRequest, limits: Limits) -> Prepared:
    """Validates the agent's request and converts it; raises InvalidArgument."""
    if req.ByteSize() > limits.max_request_bytes:
        raise _bad("REQUEST_TOO_LARGE", f"request is larger than {limits.max_request_bytes} bytes")
    if not req.messages:
        raise _bad("NO_MESSAGES", "at least one message is required")
    if len(req.messages) > limits.max_messages:
        raise _bad("TOO_MANY_MESSAGES", f"at most {limits.max_messages} messages")
    if len(req.tools) > MAX_TOOLS:
        raise _bad("TOO_MANY_TOOLS", f"at most {MAX_TOOLS} tools")
    if len(req.stop) > MAX_STOP or any(not s or len(s) > 256 for s in req.stop):
        raise _bad("BAD_STOP_SEQUENCES", f"at most {MAX_STOP} stop sequences of 1-256 characters")
    max_out = req.max_output_tokens or limits.default_output_tokens
    if max_out < 1 or max_out > limits.max_output_tokens:
        raise _bad("BAD_MAX_OUTPUT_TOKENS", f"max_output_tokens must be in [1, {limits.max_output_tokens}]")
    temperature = req.temperature if req.HasField("temperature") else None
    if temperature is not None and not (0.0 <= temperature <= 2.0 and math.isfinite(temperature)):
        raise _bad("BAD_TEMPERATURE", "temperature must be in [0, 2]")
    top_p = req.top_p if req.HasField("top_p") else None
    if top_p is not None and not (0.0 <= top_p <= 1.0 and math.isfinite(top_p)):
        raise _bad("BAD_TOP_P", "top_p must be in [0, 1]")

    bound = 0
    has_images = False
    messages: list[Message] = []
    call_ids: set[str] = set()  # ids of the assistant tool calls seen so far
    for i, m in enumerate(req.messages):
        role = _ROLE.get(m.role)
        if role is None:
            raise _bad("BAD_ROLE", f"messages[{i}].role is not set")
        if m.name and not _valid_name(m.name):
            raise _bad("BAD_NAME", f"messages[{i}].name must be 1-{MAX_NAME_CHARS} characters, no control characters")
        parts: list[ContentPart] = []
        for p in m.parts:
            kind = p.WhichOneof("kind")
            if kind == "text":
                parts.append(ContentPart("text", text=p.text))
                bound += len(p.text.encode())
            elif kind == "image_url":
                if not p.image_url.startswith("https://") or len(p.image_url) > 2048:
                    raise _bad("BAD_IMAGE", f"messages[{i}]: image URLs must be https and short")
                parts.append(ContentPart("image_url", url=p.image_url))
                bound += IMAGE_TOKEN_BOUND
                has_images = True
            elif kind == "image_bytes":
                data = p.image_bytes.data
                if p.image_bytes.mime_type not in _IMAGE_MIME or not data or len(data) > MAX_IMAGE_BYTES:
                    raise _bad("BAD_IMAGE", f"messages[{i}]: image must be PNG/JPEG/GIF/WebP up to 5 MiB")
                parts.append(ContentPart("image_bytes", data=data, mime_type=p.image_bytes.mime_type))
                bound += IMAGE_TOKEN_BOUND
                has_images = True
            else:
                raise _bad("EMPTY_PART", f"messages[{i}] has an empty content part")
        calls: list[ToolCall] = []
        for c in m.tool_calls:
            if role != "assistant":
                raise _bad("BAD_TOOL_CALL", f"messages[{i}]: only assistant messages carry tool calls")
            if not _TOOL_NAME.match(c.name) or not _CALL_ID.match(c.id):
                raise _bad("BAD_TOOL_CALL", f"messages[{i}]: tool call id or name is malformed")
            _json_object(c.arguments_json or "{}", f"messages[{i}].tool_calls arguments")
            calls.append(ToolCall(c.id, c.name, c.arguments_json or "{}"))
            call_ids.add(c.id)
            bound += len(c.arguments_json.encode()) + len(c.name)
        if role == "tool":
            if not _CALL_ID.match(m.tool_call_id) or (m.name and not _TOOL_NAME.match(m.name)):
                raise _bad("BAD_TOOL_RESULT", f"messages[{i}]: tool results need a valid tool_call_id")
            # Providers map results to calls (Gemini by the call's function name): an orphan cannot be sent.
            if m.tool_call_id not in call_ids:
                raise _bad("BAD_TOOL_RESULT", f"messages[{i}]: tool_call_id matches no earlier assistant tool call")
        if not parts and not calls:
            raise _bad("EMPTY_MESSAGE", f"messages[{i}] has no content")
        messages.append(Message(role, tuple(parts), tuple(calls), m.tool_call_id, m.name))  # type: ignore[arg-type]
        bound += MESSAGE_OVERHEAD_TOKENS
    tools: list[ToolDef] = []
    for t in req.tools:
        if not _TOOL_NAME.match(t.name):
            raise _bad("BAD_TOOL", "tool names are [A-Za-z0-9_-], at most 64 characters")
        _json_object(t.parameters_json_schema or "{}", f"tool {t.name} schema")
        tools.append(ToolDef(t.name, t.description, t.parameters_json_schema or '{"type":"object"}'))
        bound += len(t.name) + len(t.description.encode()) + len(t.parameters_json_schema.encode()) + 16
    choice = req.tool_choice
    if choice and choice not in ("auto", "none", "required") and choice not in {t.name for t in tools}:
        raise _bad("BAD_TOOL_CHOICE", "tool_choice must be auto, none, required or a tool's name")
    chat = ChatRequest(
        model="",
        messages=tuple(messages),
        max_output_tokens=max_out,
        tools=tuple(tools),
        tool_choice=choice,
        temperature=temperature,
        top_p=top_p,
        stop=tuple(req.stop),
    )
    return Prepared(chat, bound + 16, has_images, bool(tools))


def _json_object(text: str, what: str) -> None:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise _bad("BAD_JSON", f"{what} is not valid JSON") from None
    if not isinstance(value, dict):
        raise _bad("BAD_JSON", f"{what} must be a JSON object")

"""Provider-neutral request/response types shared by every provider adapter.

Conventions:

* ``Usage.input_tokens`` is the *total* prompt size including cached tokens;
  ``cached_input_tokens`` is the subset that was served from a prompt cache
  (OpenAI and Gemini report it this way; the Anthropic adapter adds its
  ``cache_read_input_tokens`` / ``cache_creation_input_tokens`` back in).
* Tool-call arguments travel as JSON text (``arguments_json``) so that the
  router never has to re-encode them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal, TypeAlias

__all__ = [
    "ChatRequest",
    "ChatResponse",
    "ContentPart",
    "FinishReason",
    "Message",
    "PartKind",
    "Role",
    "StreamEnd",
    "StreamEvent",
    "TextDelta",
    "Timeouts",
    "ToolCall",
    "ToolCallDelta",
    "ToolDef",
    "Usage",
]

PartKind: TypeAlias = Literal["text", "image_url", "image_bytes"]
Role: TypeAlias = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True, slots=True)
class ContentPart:
    """One piece of message content: text, an image by URL, or inline image bytes."""

    kind: PartKind
    text: str = ""
    url: str = ""
    data: bytes = b""
    mime_type: str = ""

    def __repr__(self) -> str:
        # Never dump prompt text or image bytes into logs via repr().
        return (
            f"ContentPart(kind={self.kind!r}, text_len={len(self.text)}, "
            f"url_len={len(self.url)}, data_len={len(self.data)}, mime_type={self.mime_type!r})"
        )


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A tool invocation requested by the model."""

    id: str
    name: str
    arguments_json: str


@dataclass(frozen=True, slots=True)
class Message:
    """A conversation turn.

    ``tool_calls`` is used on assistant messages; ``tool_call_id`` (and, for
    Gemini, ``name``) on tool-result messages.
    """

    role: Role
    parts: tuple[ContentPart, ...]
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""
    name: str = ""

    @property
    def text(self) -> str:
        """Concatenation of the text parts."""
        return "".join(p.text for p in self.parts if p.kind == "text")


@dataclass(frozen=True, slots=True)
class ToolDef:
    """A function the model may call; ``parameters_json`` is a JSON Schema as JSON text."""

    name: str
    description: str
    parameters_json: str


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A provider-neutral chat completion request.

    ``tool_choice`` is ``''`` (provider default), ``'auto'``, ``'none'``,
    ``'required'`` or the name of one tool.
    """

    model: str
    messages: tuple[Message, ...]
    max_output_tokens: int
    tools: tuple[ToolDef, ...] = ()
    tool_choice: str = ""
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage. ``reported`` is False when the numbers were estimated by us."""

    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0
    reported: bool = True


class FinishReason(enum.Enum):
    """Why the model stopped generating."""

    STOP = "stop"
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"
    CONTENT_FILTER = "content_filter"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class ChatResponse:
    """A complete (unary) answer."""

    text: str
    tool_calls: tuple[ToolCall, ...]
    finish_reason: FinishReason
    usage: Usage
    response_id: str

    def __repr__(self) -> str:
        return (
            f"ChatResponse(text_len={len(self.text)}, tool_calls={len(self.tool_calls)}, "
            f"finish_reason={self.finish_reason}, usage={self.usage!r}, "
            f"response_id={self.response_id!r})"
        )


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A fragment of streamed text."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A fragment of a streamed tool call.

    ``id`` and ``name`` are set on the first delta of a given ``index`` only
    (empty afterwards); ``arguments_fragment`` pieces concatenate to the
    arguments JSON.
    """

    index: int
    id: str
    name: str
    arguments_fragment: str


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """The last event of a successful stream."""

    finish_reason: FinishReason
    usage: Usage
    response_id: str = ""


@dataclass(frozen=True, slots=True)
class UsageSoFar:
    """Usage the provider reported before the end of the stream (Anthropic ``message_start`` and
    ``message_delta``, Gemini chunks' ``usageMetadata``): running totals, the latest wins. A
    stream cut before its ``StreamEnd`` is charged with these numbers rather than estimates."""

    usage: Usage


StreamEvent: TypeAlias = TextDelta | ToolCallDelta | UsageSoFar | StreamEnd


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Deadlines for one upstream call, in seconds.

    ``connect_s`` bounds TCP/TLS connect, ``first_byte_s`` runs from sending
    the request to the first body byte, ``idle_s`` bounds each gap between
    body chunks, ``total_s`` bounds the whole call (including streaming).
    """

    connect_s: float
    first_byte_s: float
    idle_s: float
    total_s: float

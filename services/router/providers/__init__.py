"""Provider adapters: translate a provider-neutral ChatRequest to each provider's HTTP API."""

from __future__ import annotations

from .base import (
    SAFE_NAME,
    ProviderAdapter,
    build_url,
    check_url_name,
    make_http_client,
)
from .domain import (
    ChatRequest,
    ChatResponse,
    ContentPart,
    FinishReason,
    Message,
    StreamEnd,
    StreamEvent,
    TextDelta,
    Timeouts,
    ToolCall,
    ToolCallDelta,
    ToolDef,
    Usage,
    UsageSoFar,
)
from .errors import ErrorKind, ProviderError
from .registry import get_adapter

__all__ = [
    "SAFE_NAME",
    "ChatRequest",
    "ChatResponse",
    "ContentPart",
    "ErrorKind",
    "FinishReason",
    "Message",
    "ProviderAdapter",
    "ProviderError",
    "StreamEnd",
    "StreamEvent",
    "TextDelta",
    "Timeouts",
    "ToolCall",
    "ToolCallDelta",
    "ToolDef",
    "Usage",
    "UsageSoFar",
    "build_url",
    "check_url_name",
    "get_adapter",
    "make_http_client",
]

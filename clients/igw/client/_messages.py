"""Builders for conversation messages, tools and the GenerateRequest."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeAlias

from igw.client._errors import ClientConfigError
from igw.router.v1 import router_pb2

__all__ = [
    "MessageLike",
    "MessagesArg",
    "ToolLike",
    "assistant",
    "build_request",
    "new_request_id",
    "system",
    "tool",
    "tool_result",
    "user",
]

#: A message: the proto, or a dict like ``{"role": "user", "content": "hi"}``.
MessageLike: TypeAlias = "router_pb2.Message | Mapping[str, Any]"
#: A prompt string (one user message) or a sequence of messages.
MessagesArg: TypeAlias = "str | Sequence[router_pb2.Message | Mapping[str, Any]]"
#: A tool: the proto, or ``{"name": ..., "description": ..., "parameters": {json schema}}``.
ToolLike: TypeAlias = "router_pb2.ToolDefinition | Mapping[str, Any]"

_ROLES = {
    "system": router_pb2.ROLE_SYSTEM,
    "user": router_pb2.ROLE_USER,
    "assistant": router_pb2.ROLE_ASSISTANT,
    "tool": router_pb2.ROLE_TOOL,
}


def new_request_id() -> str:
    """A fresh request id (uuid4 hex): the gateway deduplicates retries of one call by it."""
    return uuid.uuid4().hex


def _parts(content: str | Iterable[router_pb2.ContentPart | str]) -> list[router_pb2.ContentPart]:
    if isinstance(content, str):
        return [router_pb2.ContentPart(text=content)]
    return [router_pb2.ContentPart(text=p) if isinstance(p, str) else p for p in content]


def user(content: str | Iterable[router_pb2.ContentPart | str]) -> router_pb2.Message:
    """A user message: text, or a list of parts (text, image URL, image bytes)."""
    return router_pb2.Message(role=router_pb2.ROLE_USER, parts=_parts(content))


def system(text: str) -> router_pb2.Message:
    """A system message (instructions for the model)."""
    return router_pb2.Message(role=router_pb2.ROLE_SYSTEM, parts=_parts(text))


def assistant(text: str = "", tool_calls: Iterable[router_pb2.ToolCall | Mapping[str, Any]] = ()) -> router_pb2.Message:
    """A previous answer of the model, with the tool calls it made (to continue a tool loop)."""
    calls = [_tool_call(c) for c in tool_calls]
    return router_pb2.Message(role=router_pb2.ROLE_ASSISTANT, parts=_parts(text) if text else [], tool_calls=calls)


def tool_result(call_id: str, name: str, content: str | Mapping[str, Any] | Sequence[Any]) -> router_pb2.Message:
    """The result of tool call ``call_id`` of tool ``name``; non-text content is sent as JSON."""
    text = content if isinstance(content, str) else json.dumps(content, separators=(",", ":"))
    return router_pb2.Message(role=router_pb2.ROLE_TOOL, parts=_parts(text), tool_call_id=call_id, name=name)


def tool(name: str, parameters: Mapping[str, Any] | str, description: str = "") -> router_pb2.ToolDefinition:
    """A tool definition; ``parameters`` is a JSON Schema (a dict or its JSON text)."""
    schema = parameters if isinstance(parameters, str) else json.dumps(parameters, separators=(",", ":"))
    return router_pb2.ToolDefinition(name=name, description=description, parameters_json_schema=schema)


def _tool_call(value: router_pb2.ToolCall | Mapping[str, Any]) -> router_pb2.ToolCall:
    if isinstance(value, router_pb2.ToolCall):
        return value
    args = value.get("arguments_json", value.get("arguments", "{}"))
    if not isinstance(args, str):
        args = json.dumps(args, separators=(",", ":"))
    return router_pb2.ToolCall(id=str(value.get("id", "")), name=str(value.get("name", "")), arguments_json=args)


def _message(value: router_pb2.Message | Mapping[str, Any]) -> router_pb2.Message:
    if isinstance(value, router_pb2.Message):
        return value
    role_name = str(value.get("role", "")).lower()
    if role_name not in _ROLES:
        raise ClientConfigError(
            f"message role must be one of {sorted(_ROLES)}, got {value.get('role')!r}", reason="BAD_MESSAGE"
        )
    content = value.get("content", "")
    if role_name == "tool":
        return tool_result(str(value.get("tool_call_id", "")), str(value.get("name", "")), content)
    if role_name == "assistant":
        return assistant(str(content or ""), value.get("tool_calls", ()))
    return router_pb2.Message(role=_ROLES[role_name], parts=_parts(content))


def _tool_def(value: router_pb2.ToolDefinition | Mapping[str, Any]) -> router_pb2.ToolDefinition:
    if isinstance(value, router_pb2.ToolDefinition):
        return value
    params = value.get("parameters", value.get("parameters_json_schema", {"type": "object"}))
    return tool(str(value["name"]), params, str(value.get("description", "")))


def build_request(
    model: str,
    messages: MessagesArg,
    *,
    system: str | None = None,
    tools: Sequence[ToolLike] | None = None,
    tool_choice: str | None = None,
    max_output_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    stop: Sequence[str] | None = None,
    request_id: str | None = None,
    run_id: str | None = None,
    run_cap_nanos: int | None = None,
) -> router_pb2.GenerateRequest:
    """Builds a GenerateRequest; a request id is generated when none is given. ``run_id``
    names the run (task) the call belongs to; ``run_cap_nanos`` caps the run's spend (the first
    call of a run with a cap creates the run's budget)."""
    if not model:
        raise ClientConfigError("model alias is required", reason="BAD_REQUEST")
    msgs: list[router_pb2.Message] = []
    if system is not None:
        msgs.append(router_pb2.Message(role=router_pb2.ROLE_SYSTEM, parts=_parts(system)))
    if isinstance(messages, str):
        msgs.append(user(messages))
    else:
        msgs.extend(_message(m) for m in messages)
    request = router_pb2.GenerateRequest(
        model=model,
        messages=msgs,
        tools=[_tool_def(t) for t in tools or ()],
        tool_choice=tool_choice or "",
        max_output_tokens=max_output_tokens or 0,
        stop=list(stop or ()),
        request_id=request_id or new_request_id(),
        run_id=run_id or "",
        run_cap_nanos=run_cap_nanos or 0,
    )
    if temperature is not None:
        request.temperature = temperature
    if top_p is not None:
        request.top_p = top_p
    return request

"""Anthropic Messages <-> the engine's GenerateRequest / GenerateResponse.

Request fields read: ``model`` (an igw alias), ``max_tokens`` (required, as on the API),
``system`` (text or text blocks), ``messages`` (text, ``image`` with a base64 or URL source,
``tool_use`` and ``tool_result`` blocks; ``thinking`` blocks of earlier turns are dropped),
``tools`` (custom tools with ``input_schema``), ``tool_choice``, ``stop_sequences``,
``temperature``, ``top_p``, ``stream``. ``top_k``, ``metadata``, ``thinking`` and
``service_tier`` are accepted and ignored.

Usage follows the API: ``input_tokens`` excludes cache reads, which are
``cache_read_input_tokens``. Responses carry the ``igw`` extension object (request id,
``cost_nanos``, serving deployment); streams carry it on ``message_delta``.
"""

from __future__ import annotations

from typing import Any

from igw.router.v1 import router_pb2
from services.router.edge.errors import bad_field
from services.router.edge.fields import (
    arguments,
    arr,
    igw_extension,
    image_bytes_part,
    obj,
    opt_int,
    opt_num,
    parse_arguments,
    schema_json,
    stops,
    string,
)

STOP = {
    router_pb2.FINISH_REASON_STOP: "end_turn", router_pb2.FINISH_REASON_LENGTH: "max_tokens",
    router_pb2.FINISH_REASON_TOOL_CALLS: "tool_use", router_pb2.FINISH_REASON_CONTENT_FILTER: "refusal",
}
_IGNORED_BLOCKS = {"thinking", "redacted_thinking"}


def _image(block: dict[str, Any], param: str) -> router_pb2.ContentPart:
    src = obj(block.get("source"), f"{param}.source")
    if src.get("type") == "base64":
        return image_bytes_part(string(src.get("media_type"), f"{param}.source.media_type"),
                                string(src.get("data"), f"{param}.source.data"), f"{param}.source")
    if src.get("type") == "url":
        return router_pb2.ContentPart(image_url=string(src.get("url"), f"{param}.source.url"))
    raise bad_field("BAD_FIELD", f"{param}.source.type", "must be base64 or url")


def _blocks(content: Any, param: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [obj(b, f"{param}[{j}]") for j, b in enumerate(arr(content, param))]


def _simple_parts(content: Any, param: str) -> list[router_pb2.ContentPart]:
    """Text and image blocks (system prompt, tool results)."""
    out = []
    for j, b in enumerate(_blocks(content, param)):
        if b.get("type") == "text":
            out.append(router_pb2.ContentPart(text=string(b.get("text"), f"{param}[{j}].text")))
        elif b.get("type") == "image":
            out.append(_image(b, f"{param}[{j}]"))
        else:
            raise bad_field("BAD_FIELD", f"{param}[{j}].type", "only text and image blocks are supported here")
    return out


def _messages(m: Any, i: int) -> list[router_pb2.Message]:
    """One API message: tool results become tool messages ahead of the user's own content."""
    param = f"messages[{i}]"
    msg = obj(m, param)
    role = msg.get("role")
    if role not in ("user", "assistant"):
        raise bad_field("BAD_ROLE", f"{param}.role", "must be user or assistant")
    main = router_pb2.Message(role=router_pb2.ROLE_USER if role == "user" else router_pb2.ROLE_ASSISTANT)
    out: list[router_pb2.Message] = []
    for j, b in enumerate(_blocks(msg.get("content"), f"{param}.content")):
        bp, kind = f"{param}.content[{j}]", b.get("type")
        if kind == "text":
            main.parts.add(text=string(b.get("text"), f"{bp}.text"))
        elif kind == "image":
            main.parts.append(_image(b, bp))
        elif kind == "tool_use" and role == "assistant":
            main.tool_calls.add(id=string(b.get("id"), f"{bp}.id"), name=string(b.get("name"), f"{bp}.name"),
                                arguments_json=arguments(b.get("input", {}), f"{bp}.input"))
        elif kind == "tool_result" and role == "user":
            result = router_pb2.Message(role=router_pb2.ROLE_TOOL,
                                        tool_call_id=string(b.get("tool_use_id"), f"{bp}.tool_use_id"))
            result.parts.extend(_simple_parts(b.get("content", ""), f"{bp}.content") or
                                [router_pb2.ContentPart(text="")])
            if b.get("is_error") is True and result.parts[0].HasField("text"):
                result.parts[0].text = "[tool error] " + result.parts[0].text
            out.append(result)
        elif kind in _IGNORED_BLOCKS and role == "assistant":
            continue
        else:
            raise bad_field("BAD_FIELD", f"{bp}.type", f"a {role} message cannot carry a {kind!s:.32} block")
    if main.parts or main.tool_calls:
        out.append(main)
    return out


def _tool_choice(value: Any) -> str:
    if value is None:
        return ""
    choice = obj(value, "tool_choice")
    kind = choice.get("type")
    if kind in ("auto", "none"):
        return str(kind)
    if kind == "any":
        return "required"
    if kind == "tool":
        return string(choice.get("name"), "tool_choice.name")
    raise bad_field("BAD_FIELD", "tool_choice.type", "must be auto, any, tool or none")


def parse(body: dict[str, Any], request_id: str) -> tuple[router_pb2.GenerateRequest, bool]:
    """(the engine's request, stream?); raises InvalidArgument naming the field."""
    model = string(body.get("model"), "model")
    max_tokens = opt_int(body, "max_tokens")
    if max_tokens is None:
        raise bad_field("BAD_FIELD", "max_tokens", "Field required")
    req = router_pb2.GenerateRequest(model=model, max_output_tokens=max_tokens, request_id=request_id)
    if body.get("system") is not None:
        req.messages.add(role=router_pb2.ROLE_SYSTEM, parts=_simple_parts(body["system"], "system"))
    for i, m in enumerate(arr(body.get("messages"), "messages")):
        req.messages.extend(_messages(m, i))
    for i, t in enumerate(arr(body.get("tools") or [], "tools")):
        tool = obj(t, f"tools[{i}]")
        if tool.get("type", "custom") != "custom":
            raise bad_field("BAD_FIELD", f"tools[{i}].type", "only custom tools are supported")
        req.tools.add(name=string(tool.get("name"), f"tools[{i}].name"),
                      description=string(tool.get("description", ""), f"tools[{i}].description"),
                      parameters_json_schema=schema_json(tool.get("input_schema"), f"tools[{i}].input_schema"))
    req.tool_choice = _tool_choice(body.get("tool_choice"))
    for key in ("temperature", "top_p"):
        value = opt_num(body, key)
        if value is not None:
            setattr(req, key, value)
    req.stop.extend(stops(body.get("stop_sequences"), "stop_sequences"))
    return req, body.get("stream") is True


def _usage(u: router_pb2.Usage) -> dict[str, Any]:
    return {"input_tokens": max(u.input_tokens - u.cached_input_tokens, 0), "output_tokens": u.output_tokens,
            "cache_read_input_tokens": u.cached_input_tokens, "cache_creation_input_tokens": 0}


def response(resp: router_pb2.GenerateResponse, model: str) -> dict[str, Any]:
    """A ``message`` object."""
    content: list[dict[str, Any]] = [{"type": "text", "text": resp.text}] if resp.text else []
    content += [{"type": "tool_use", "id": c.id, "name": c.name, "input": parse_arguments(c.arguments_json)}
                for c in resp.tool_calls]
    return {"id": f"msg_{resp.request_id}", "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": STOP.get(resp.finish_reason, "end_turn"), "stop_sequence": None,
            "usage": _usage(resp.usage), "igw": igw_extension(resp)}


class EventStream:
    """Turns the engine's stream events into the Messages API's event sequence:
    message_start, ping, (content_block_start, content_block_delta*, content_block_stop)*,
    message_delta, message_stop."""

    def __init__(self, model: str) -> None:
        self.model = model
        self._next = 0
        self._open: tuple[str, int] | None = None  # ("text", -1) or ("tool", engine index)

    def _close(self) -> list[tuple[str, dict[str, Any]]]:
        if self._open is None:
            return []
        self._open = None
        return [("content_block_stop", {"type": "content_block_stop", "index": self._next - 1})]

    def _start(self, key: tuple[str, int], block: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        out = self._close()
        self._open = key
        out.append(("content_block_start", {"type": "content_block_start", "index": self._next,
                                            "content_block": block}))
        self._next += 1
        return out

    def _delta(self, delta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return "content_block_delta", {"type": "content_block_delta", "index": self._next - 1, "delta": delta}

    def events(self, ev: router_pb2.GenerateStreamResponse) -> list[tuple[str, dict[str, Any]]]:
        """(event name, data) pairs for one engine event."""
        kind = ev.WhichOneof("event")
        if kind == "start":
            message: dict[str, Any] = {"id": f"msg_{ev.start.request_id}", "type": "message", "role": "assistant",
                       "model": self.model, "content": [], "stop_reason": None, "stop_sequence": None,
                       "usage": {"input_tokens": 0, "output_tokens": 0}}
            return [("message_start", {"type": "message_start", "message": message}), ("ping", {"type": "ping"})]
        if kind == "text_delta":
            out = [] if self._open == ("text", -1) else self._start(("text", -1), {"type": "text", "text": ""})
            out.append(self._delta({"type": "text_delta", "text": ev.text_delta.text}))
            return out
        if kind == "tool_call_delta":
            d = ev.tool_call_delta
            out = []
            if self._open != ("tool", d.index):
                out = self._start(("tool", d.index), {"type": "tool_use", "id": d.id, "name": d.name, "input": {}})
            if d.arguments_fragment:
                out.append(self._delta({"type": "input_json_delta", "partial_json": d.arguments_fragment}))
            return out
        if kind == "final":
            f = ev.final
            delta = {"type": "message_delta",
                     "delta": {"stop_reason": STOP.get(f.finish_reason, "end_turn"), "stop_sequence": None},
                     "usage": _usage(f.usage), "igw": igw_extension(f)}
            return [*self._close(), ("message_delta", delta), ("message_stop", {"type": "message_stop"})]
        return []

"""OpenAI Chat Completions <-> the engine's GenerateRequest / GenerateResponse.

Request fields read: ``model`` (an igw alias), ``messages`` (system/developer, user, assistant
with ``tool_calls``, tool with ``tool_call_id``; text and ``image_url`` parts, ``data:`` URLs
inline), ``tools`` (``type: function``), ``tool_choice``, ``max_completion_tokens`` /
``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``n`` (1 only), ``stream`` and
``stream_options.include_usage``. Fields that only tune a provider (``user``, ``seed``,
``parallel_tool_calls``, ``metadata``, ``store``, ...) are accepted and ignored.

Responses add one documented extension object, ``igw`` (request id, ``cost_nanos``, serving
deployment), which the SDK keeps as an extra attribute; streams carry it on their last chunk.
"""

from __future__ import annotations

from typing import Any

from igw.router.v1 import router_pb2
from services.router.edge.errors import bad_field
from services.router.edge.fields import (
    arguments,
    arr,
    igw_extension,
    image_url_part,
    obj,
    opt_int,
    opt_num,
    schema_json,
    stops,
    string,
)

_ROLES = {"system": router_pb2.ROLE_SYSTEM, "developer": router_pb2.ROLE_SYSTEM, "user": router_pb2.ROLE_USER,
          "assistant": router_pb2.ROLE_ASSISTANT, "tool": router_pb2.ROLE_TOOL}
FINISH = {
    router_pb2.FINISH_REASON_STOP: "stop", router_pb2.FINISH_REASON_LENGTH: "length",
    router_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls", router_pb2.FINISH_REASON_CONTENT_FILTER: "content_filter",
}


def _parts(content: Any, param: str) -> list[router_pb2.ContentPart]:
    if content is None:
        return []
    if isinstance(content, str):
        return [router_pb2.ContentPart(text=content)]
    out = []
    for j, part in enumerate(arr(content, param)):
        p = obj(part, f"{param}[{j}]")
        kind = p.get("type")
        if kind == "text":
            out.append(router_pb2.ContentPart(text=string(p.get("text"), f"{param}[{j}].text")))
        elif kind == "refusal":
            out.append(router_pb2.ContentPart(text=string(p.get("refusal"), f"{param}[{j}].refusal")))
        elif kind == "image_url":
            ref = p.get("image_url")
            url = ref if isinstance(ref, str) else obj(ref, f"{param}[{j}].image_url").get("url")
            out.append(image_url_part(string(url, f"{param}[{j}].image_url.url"), f"{param}[{j}].image_url"))
        else:
            raise bad_field("BAD_FIELD", f"{param}[{j}].type", "only text and image_url parts are supported")
    return out


def _message(m: Any, i: int) -> router_pb2.Message:
    param = f"messages[{i}]"
    msg = obj(m, param)
    role = _ROLES.get(msg.get("role"))  # type: ignore[arg-type]
    if role is None:
        raise bad_field("BAD_ROLE", f"{param}.role", "must be system, developer, user, assistant or tool")
    out = router_pb2.Message(role=role, parts=_parts(msg.get("content"), f"{param}.content"))
    if msg.get("name") is not None:
        out.name = string(msg["name"], f"{param}.name")
    if role == router_pb2.ROLE_TOOL:
        out.tool_call_id = string(msg.get("tool_call_id"), f"{param}.tool_call_id")
    for j, c in enumerate(arr(msg.get("tool_calls") or [], f"{param}.tool_calls")):
        cp = f"{param}.tool_calls[{j}]"
        call = obj(c, cp)
        fn = obj(call.get("function"), f"{cp}.function")
        out.tool_calls.add(id=string(call.get("id"), f"{cp}.id"), name=string(fn.get("name"), f"{cp}.function.name"),
                           arguments_json=arguments(fn.get("arguments", "{}"), f"{cp}.function.arguments"))
    return out


def _tool_choice(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    fn = obj(obj(value, "tool_choice").get("function"), "tool_choice.function")
    return string(fn.get("name"), "tool_choice.function.name")


def parse(body: dict[str, Any], request_id: str) -> tuple[router_pb2.GenerateRequest, bool, bool]:
    """(the engine's request, stream?, include usage in the stream?); raises InvalidArgument."""
    model = string(body.get("model"), "model")
    messages = arr(body.get("messages"), "messages")
    n = opt_int(body, "n")
    if n not in (None, 1):
        raise bad_field("BAD_FIELD", "n", "only n=1 is supported")
    req = router_pb2.GenerateRequest(model=model, messages=[_message(m, i) for i, m in enumerate(messages)],
                                     request_id=request_id)
    for i, t in enumerate(arr(body.get("tools") or [], "tools")):
        tool = obj(t, f"tools[{i}]")
        if tool.get("type", "function") != "function":
            raise bad_field("BAD_FIELD", f"tools[{i}].type", "only function tools are supported")
        fn = obj(tool.get("function"), f"tools[{i}].function")
        req.tools.add(name=string(fn.get("name"), f"tools[{i}].function.name"),
                      description=string(fn.get("description", ""), f"tools[{i}].function.description"),
                      parameters_json_schema=schema_json(fn.get("parameters"), f"tools[{i}].function.parameters"))
    req.tool_choice = _tool_choice(body.get("tool_choice"))
    max_out = opt_int(body, "max_completion_tokens") or opt_int(body, "max_tokens")
    if max_out is not None:
        req.max_output_tokens = max_out
    for key in ("temperature", "top_p"):
        value = opt_num(body, key)
        if value is not None:
            setattr(req, key, value)
    req.stop.extend(stops(body.get("stop"), "stop"))
    stream = body.get("stream") is True
    options = body.get("stream_options")
    include_usage = bool(options and obj(options, "stream_options").get("include_usage") is True)
    return req, stream, include_usage


def _usage(u: router_pb2.Usage) -> dict[str, Any]:
    return {"prompt_tokens": u.input_tokens, "completion_tokens": u.output_tokens,
            "total_tokens": u.input_tokens + u.output_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_input_tokens}}


def _tool_calls(resp: router_pb2.GenerateResponse) -> list[dict[str, Any]]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments_json or "{}"}}
            for c in resp.tool_calls]


def response(resp: router_pb2.GenerateResponse, model: str, created: int) -> dict[str, Any]:
    """A ``chat.completion`` object."""
    message: dict[str, Any] = {"role": "assistant", "content": resp.text or None, "refusal": None}
    if resp.tool_calls:
        message["tool_calls"] = _tool_calls(resp)
    return {
        "id": f"chatcmpl-{resp.request_id}", "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": FINISH.get(resp.finish_reason, "stop")}],
        "usage": _usage(resp.usage), "system_fingerprint": None, "igw": igw_extension(resp),
    }


class ChunkStream:
    """Turns the engine's stream events into ``chat.completion.chunk`` objects."""

    def __init__(self, model: str, created: int, include_usage: bool) -> None:
        self.model, self.created, self.include_usage = model, created, include_usage
        self.id = ""

    def _chunk(self, delta: dict[str, Any] | None, finish: str | None = None) -> dict[str, Any]:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}

    def events(self, ev: router_pb2.GenerateStreamResponse) -> list[dict[str, Any]]:
        """The chunks for one engine event (the final one yields the finish and usage chunks)."""
        kind = ev.WhichOneof("event")
        if kind == "start":
            self.id = f"chatcmpl-{ev.start.request_id}"
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "text_delta":
            return [self._chunk({"content": ev.text_delta.text})]
        if kind == "tool_call_delta":
            d = ev.tool_call_delta
            call: dict[str, Any] = {"index": d.index, "function": {"arguments": d.arguments_fragment}}
            if d.id:
                call["id"], call["type"] = d.id, "function"
            if d.name:
                call["function"]["name"] = d.name
            return [self._chunk({"tool_calls": [call]})]
        if kind == "final":
            last = self._chunk({}, FINISH.get(ev.final.finish_reason, "stop"))
            out = [last]
            if self.include_usage:
                last = self._chunk(None)
                last["usage"] = _usage(ev.final.usage)
                out.append(last)
            last["igw"] = igw_extension(ev.final)
            return out
        return []


def models(aliases: list[tuple[str, str]], created: int) -> dict[str, Any]:
    """``GET /v1/models``: the caller's team's aliases."""
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "igw",
                                        "description": desc} for name, desc in aliases]}

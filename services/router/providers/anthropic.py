"""Anthropic Messages API adapter."""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import httpx

from .base import (
    USER_AGENT,
    build_url,
    check_body_model,
    check_secret,
    dumps,
    estimate_usage,
    image_mime,
    load_json_arg,
    open_sse,
    parse_json_object,
    parse_retry_after,
    protocol_error,
    send_unary,
    token_count,
    try_json_object,
)
from .domain import (
    ChatRequest,
    ChatResponse,
    FinishReason,
    Message,
    StreamEnd,
    StreamEvent,
    TextDelta,
    Timeouts,
    ToolCall,
    ToolCallDelta,
    Usage,
    UsageSoFar,
)
from .errors import ErrorKind, ProviderError, safe_token, summarize

__all__ = ["ANTHROPIC_VERSION", "AnthropicAdapter"]

_LOGGER = logging.getLogger(__name__)

ANTHROPIC_VERSION = "2023-06-01"

_FINISH = {
    "end_turn": FinishReason.STOP,
    "stop_sequence": FinishReason.STOP,
    "max_tokens": FinishReason.LENGTH,
    "tool_use": FinishReason.TOOL_CALLS,
    "refusal": FinishReason.CONTENT_FILTER,
}

_KINDS = {
    "rate_limit_error": ErrorKind.RATE_LIMITED,
    "overloaded_error": ErrorKind.OVERLOADED,
    "authentication_error": ErrorKind.AUTH_FAILED,
    "permission_error": ErrorKind.AUTH_FAILED,
    "invalid_request_error": ErrorKind.BAD_REQUEST,
    "not_found_error": ErrorKind.BAD_REQUEST,
    "request_too_large": ErrorKind.BAD_REQUEST,
    "api_error": ErrorKind.SERVER_ERROR,
    "timeout_error": ErrorKind.TIMEOUT,
}


class AnthropicAdapter:
    """Messages API over ``{base_url}/v1/messages``."""

    name: str = "anthropic"

    def __repr__(self) -> str:
        return "AnthropicAdapter()"

    # ------------------------------------------------------------------ request

    def build_body(self, req: ChatRequest, *, stream: bool) -> dict[str, Any]:
        """The JSON body for ``req`` (raises ValueError on untranslatable input)."""
        check_body_model(req.model)
        system = "\n\n".join(m.text for m in req.messages if m.role == "system")
        messages: list[dict[str, Any]] = []
        for m in req.messages:
            if m.role == "system":
                continue
            role = "assistant" if m.role == "assistant" else "user"
            blocks = _blocks(m)
            if not blocks:
                continue
            if messages and messages[-1]["role"] == role:
                messages[-1]["content"].extend(blocks)
            else:
                messages.append({"role": role, "content": blocks})
        body: dict[str, Any] = {
            "model": req.model,
            "max_tokens": req.max_output_tokens,
            "messages": messages,
        }
        if system:
            body["system"] = system
        if req.tools:
            body["tools"] = [
                {
                    "name": t.name,
                    "description": t.description,
                    "input_schema": load_json_arg(t.parameters_json, "tool parameters"),
                }
                for t in req.tools
            ]
        if req.tool_choice:
            choice = {"auto": {"type": "auto"}, "none": {"type": "none"}, "required": {"type": "any"}}
            body["tool_choice"] = choice.get(req.tool_choice, {"type": "tool", "name": req.tool_choice})
        if req.temperature is not None:
            body["temperature"] = req.temperature
        if req.top_p is not None:
            body["top_p"] = req.top_p
        if req.stop:
            body["stop_sequences"] = list(req.stop)
        if stream:
            body["stream"] = True
        return body

    def _prepare(
        self, base_url: str, secret: str, req: ChatRequest, *, stream: bool
    ) -> tuple[str, dict[str, str], bytes]:
        body = dumps(self.build_body(req, stream=stream))
        check_secret(self.name, secret)
        url = build_url(base_url, "/v1/messages")
        headers = {
            "content-type": "application/json",
            "accept": "text/event-stream" if stream else "application/json",
            "x-api-key": secret,
            "anthropic-version": ANTHROPIC_VERSION,
            "user-agent": USER_AGENT,
        }
        return url, headers, body

    # ------------------------------------------------------------------ unary

    async def complete(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        secret: str,
        req: ChatRequest,
        timeouts: Timeouts,
    ) -> ChatResponse:
        """Unary Messages call."""
        url, headers, body = self._prepare(base_url, secret, req, stream=False)
        _, data = await send_unary(self.name, client, url, headers, body, timeouts, self.map_error)
        return self.parse_response(data, req)

    def parse_response(self, data: bytes, req: ChatRequest) -> ChatResponse:
        """Translate a Messages JSON body (usage counted from the text when none is reported)."""
        name = self.name
        obj = parse_json_object(name, data)
        if obj.get("type") == "error":
            raise self._typed_error(obj.get("error"), None)
        content = obj.get("content")
        if not isinstance(content, list):
            raise protocol_error(name, "response has no content")
        texts: list[str] = []
        calls: list[ToolCall] = []
        for block in content:
            if not isinstance(block, dict):
                raise protocol_error(name, "unexpected content block")
            btype = block.get("type")
            if btype == "text":
                text = block.get("text")
                if not isinstance(text, str):
                    raise protocol_error(name, "unexpected text block")
                texts.append(text)
            elif btype == "tool_use":
                calls.append(
                    ToolCall(
                        id=str(block.get("id") or f"call_{len(calls)}"),
                        name=str(block.get("name") or ""),
                        arguments_json=dumps(block.get("input") or {}).decode("utf-8"),
                    )
                )
        usage = _usage(name, obj.get("usage"), None)
        if usage is None:
            usage = estimate_usage(req, "".join(texts) + "".join(c.arguments_json for c in calls))
        message_id = obj.get("id")
        return ChatResponse(
            text="".join(texts),
            tool_calls=tuple(calls),
            finish_reason=_FINISH.get(str(obj.get("stop_reason")), FinishReason.OTHER),
            usage=usage,
            response_id=message_id if isinstance(message_id, str) else "",
        )

    # ------------------------------------------------------------------ streaming

    async def stream(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        secret: str,
        req: ChatRequest,
        timeouts: Timeouts,
    ) -> AsyncIterator[StreamEvent]:
        """Streaming Messages call (terminated by ``message_stop``)."""
        name = self.name
        url, headers, body = self._prepare(base_url, secret, req, stream=True)
        start_usage: dict[str, Any] = {}
        final_usage: dict[str, Any] = {}
        stop_reason: str | None = None
        message_id = ""
        done = False
        tool_ordinal: dict[int, int] = {}  # content block index -> tool call ordinal
        out_text: list[str] = []  # to count usage when the stream reports none
        async with aclosing(open_sse(name, client, url, headers, body, timeouts, self.map_error)) as events:
            async for ev in events:
                obj = parse_json_object(name, ev.data)
                etype = obj.get("type") or ev.event
                if etype == "content_block_delta":
                    delta = obj.get("delta")
                    if not isinstance(delta, dict):
                        raise protocol_error(name, "bad content_block_delta")
                    dtype = delta.get("type")
                    if dtype == "text_delta":
                        text = delta.get("text")
                        if not isinstance(text, str):
                            raise protocol_error(name, "bad text_delta")
                        if text:
                            out_text.append(text)
                            yield TextDelta(text)
                    elif dtype == "input_json_delta":
                        frag = delta.get("partial_json")
                        if not isinstance(frag, str):
                            raise protocol_error(name, "bad input_json_delta")
                        ordinal = tool_ordinal.get(_index(name, obj))
                        if ordinal is None:
                            raise protocol_error(name, "input_json_delta for unknown block")
                        if frag:
                            out_text.append(frag)
                            yield ToolCallDelta(ordinal, "", "", frag)
                elif etype == "content_block_start":
                    block = obj.get("content_block")
                    if not isinstance(block, dict):
                        raise protocol_error(name, "bad content_block_start")
                    if block.get("type") == "tool_use":
                        ordinal = len(tool_ordinal)
                        tool_ordinal[_index(name, obj)] = ordinal
                        yield ToolCallDelta(
                            ordinal,
                            str(block.get("id") or f"call_{ordinal}"),
                            str(block.get("name") or ""),
                            "",
                        )
                    elif block.get("type") == "text" and block.get("text"):
                        out_text.append(str(block["text"]))
                        yield TextDelta(str(block["text"]))
                elif etype == "message_start":
                    msg = obj.get("message")
                    if not isinstance(msg, dict):
                        raise protocol_error(name, "bad message_start")
                    if isinstance(msg.get("id"), str):
                        message_id = msg["id"]
                    u = msg.get("usage")
                    start_usage = u if isinstance(u, dict) else {}
                    so_far = _usage(name, start_usage, final_usage)
                    if so_far is not None:
                        yield UsageSoFar(so_far)
                elif etype == "message_delta":
                    delta = obj.get("delta")
                    if isinstance(delta, dict) and delta.get("stop_reason"):
                        stop_reason = str(delta["stop_reason"])
                    u = obj.get("usage")
                    if isinstance(u, dict):
                        final_usage.update(u)
                        so_far = _usage(name, start_usage, final_usage)
                        if so_far is not None:
                            yield UsageSoFar(so_far)
                elif etype == "message_stop":
                    done = True
                    break
                elif etype == "error":
                    raise self._typed_error(obj.get("error"), None, in_stream=True)
                # ping, content_block_stop and unknown events are ignored.
        if not done:
            raise protocol_error(name, "stream ended without message_stop")
        usage = _usage(name, start_usage, final_usage)
        if usage is None:
            usage = estimate_usage(req, "".join(out_text))
        yield StreamEnd(_FINISH.get(str(stop_reason), FinishReason.OTHER), usage, message_id)

    # ------------------------------------------------------------------ errors

    def map_error(self, status: int, headers: httpx.Headers, body: bytes) -> ProviderError:
        """Map a non-2xx answer to a ProviderError (no provider text kept)."""
        err = try_json_object(body).get("error")
        retry = parse_retry_after(headers)
        error = self._typed_error(err, status, retry_after_s=retry)
        _LOGGER.debug("%s: upstream HTTP %d (%s)", self.name, status, error.kind.name)
        return error

    def _typed_error(
        self,
        err: object,
        status: int | None,
        *,
        retry_after_s: float | None = None,
        in_stream: bool = False,
    ) -> ProviderError:
        err = err if isinstance(err, dict) else {}
        etype = safe_token(err.get("type"))
        kind = _KINDS.get(etype or "")
        if kind is None:
            kind = _status_kind(status)
        if kind is ErrorKind.BAD_REQUEST and etype == "invalid_request_error":
            message = err.get("message")
            # The message is only inspected, never copied.
            if isinstance(message, str) and "prompt is too long" in message.lower():
                kind = ErrorKind.CONTEXT_TOO_LONG
        return ProviderError(
            kind,
            summarize(self.name, status, etype, "stream error" if in_stream else ""),
            status_code=status,
            retry_after_s=retry_after_s,
        )


def _status_kind(status: int | None) -> ErrorKind:
    if status is None:
        return ErrorKind.SERVER_ERROR
    if status == 429:
        return ErrorKind.RATE_LIMITED
    if status in (401, 403):
        return ErrorKind.AUTH_FAILED
    if status in (503, 529):
        return ErrorKind.OVERLOADED
    if status >= 500:
        return ErrorKind.SERVER_ERROR
    return ErrorKind.BAD_REQUEST


def _index(provider: str, obj: dict[str, Any]) -> int:
    idx = obj.get("index")
    if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
        raise protocol_error(provider, "bad content block index")
    return idx


def _usage(provider: str, start: object, final: dict[str, Any] | None) -> Usage | None:
    """Combine message_start usage with the running totals of message_delta (never summed)."""
    merged: dict[str, Any] = dict(start) if isinstance(start, dict) else {}
    if final:
        merged.update({k: v for k, v in final.items() if v is not None})
    if "input_tokens" not in merged and "output_tokens" not in merged:
        return None
    uncached = token_count(provider, merged.get("input_tokens"))
    cache_read = token_count(provider, merged.get("cache_read_input_tokens"))
    cache_write = token_count(provider, merged.get("cache_creation_input_tokens"))
    return Usage(
        input_tokens=uncached + cache_read + cache_write,
        output_tokens=token_count(provider, merged.get("output_tokens")),
        cached_input_tokens=cache_read,
    )


def _blocks(msg: Message) -> list[dict[str, Any]]:
    if msg.role == "tool":
        if not msg.tool_call_id:
            raise ValueError("tool message needs tool_call_id")
        return [{"type": "tool_result", "tool_use_id": msg.tool_call_id, "content": msg.text}]
    blocks: list[dict[str, Any]] = []
    for p in msg.parts:
        if p.kind == "text":
            if p.text:
                blocks.append({"type": "text", "text": p.text})
        elif p.kind == "image_url":
            blocks.append({"type": "image", "source": {"type": "url", "url": p.url}})
        else:
            blocks.append(
                {
                    "type": "image",
                    "source": {
                        "type": "base64",
                        "media_type": image_mime(p.mime_type),
                        "data": base64.b64encode(p.data).decode("ascii"),
                    },
                }
            )
    for tc in msg.tool_calls:
        args = load_json_arg(tc.arguments_json, "tool call arguments")
        if not isinstance(args, dict):
            raise ValueError("tool call arguments must be a JSON object")
        blocks.append({"type": "tool_use", "id": tc.id, "name": tc.name, "input": args})
    return blocks

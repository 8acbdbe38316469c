"""OpenAI Chat Completions adapter (also used for OpenAI-compatible servers such as vLLM/Ollama)."""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, Literal

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
    ContentPart,
    FinishReason,
    Message,
    StreamEnd,
    StreamEvent,
    TextDelta,
    Timeouts,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from .errors import ErrorKind, ProviderError, safe_token, summarize

__all__ = ["OpenAIAdapter"]

_LOGGER = logging.getLogger(__name__)

_FINISH = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "tool_calls": FinishReason.TOOL_CALLS,
    "function_call": FinishReason.TOOL_CALLS,
    "content_filter": FinishReason.CONTENT_FILTER,
}

_REFUSAL_CODES = frozenset({"content_policy_violation", "content_filter"})
_STREAM_KINDS = {
    "rate_limit_exceeded": ErrorKind.RATE_LIMITED,
    "requests": ErrorKind.RATE_LIMITED,
    "tokens": ErrorKind.RATE_LIMITED,
    "context_length_exceeded": ErrorKind.CONTEXT_TOO_LONG,
    "content_policy_violation": ErrorKind.CONTENT_REFUSED,
    "content_filter": ErrorKind.CONTENT_REFUSED,
    "invalid_request_error": ErrorKind.BAD_REQUEST,
    "overloaded": ErrorKind.OVERLOADED,
    "engine_overloaded": ErrorKind.OVERLOADED,
    "server_error": ErrorKind.SERVER_ERROR,
}


class OpenAIAdapter:
    """Chat Completions over ``{base_url}/chat/completions``.

    ``kind="openai"`` sends ``max_completion_tokens``; ``"openai_compatible"``
    sends ``max_tokens``. When the server reports no usage, tokens are
    estimated (``Usage.reported=False``).
    """

    def __init__(self, kind: Literal["openai", "openai_compatible"] = "openai") -> None:
        self.name: str = kind
        self._max_field = "max_completion_tokens" if kind == "openai" else "max_tokens"

    def __repr__(self) -> str:
        return f"OpenAIAdapter({self.name!r})"

    # ------------------------------------------------------------------ request

    def build_body(self, req: ChatRequest, *, stream: bool) -> dict[str, Any]:
        """The JSON body for ``req`` (raises ValueError on untranslatable input)."""
        check_body_model(req.model)
        body: dict[str, Any] = {
            "model": req.model,
            "messages": [_message(m) for m in req.messages],
            self._max_field: req.max_output_tokens,
        }
        if req.tools:
            body["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": load_json_arg(t.parameters_json, "tool parameters"),
                    },
                }
                for t in req.tools
            ]
        if req.tool_choice:
            if req.tool_choice in ("auto", "none", "required"):
                body["tool_choice"] = req.tool_choice
            else:
                body["tool_choice"] = {"type": "function", "function": {"name": req.tool_choice}}
        if req.temperature is not None:
            body["temperature"] = req.temperature
        if req.top_p is not None:
            body["top_p"] = req.top_p
        if req.stop:
            body["stop"] = list(req.stop)
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    def _prepare(
        self, base_url: str, secret: str, req: ChatRequest, *, stream: bool
    ) -> tuple[str, dict[str, str], bytes]:
        body = dumps(self.build_body(req, stream=stream))
        check_secret(self.name, secret)
        url = build_url(base_url, "/chat/completions")
        headers = {
            "content-type": "application/json",
            "accept": "text/event-stream" if stream else "application/json",
            "authorization": f"Bearer {secret}",
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
        """Unary Chat Completions call."""
        url, headers, body = self._prepare(base_url, secret, req, stream=False)
        _, data = await send_unary(self.name, client, url, headers, body, timeouts, self.map_error)
        return self.parse_response(data, req)

    def parse_response(self, data: bytes, req: ChatRequest) -> ChatResponse:
        """Translate a Chat Completions JSON body."""
        name = self.name
        obj = parse_json_object(name, data)
        choices = obj.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise protocol_error(name, "response has no choices")
        message = choices[0].get("message")
        if not isinstance(message, dict):
            raise protocol_error(name, "response has no message")
        content = message.get("content")
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        else:
            raise protocol_error(name, "unexpected content type")
        calls: list[ToolCall] = []
        raw_calls = message.get("tool_calls") or []
        if not isinstance(raw_calls, list):
            raise protocol_error(name, "unexpected tool_calls type")
        for i, tc in enumerate(raw_calls):
            fn = tc.get("function") if isinstance(tc, dict) else None
            if not isinstance(fn, dict):
                raise protocol_error(name, "unexpected tool call shape")
            args = fn.get("arguments") or ""
            if not isinstance(args, str):
                args = dumps(args).decode()
            calls.append(
                ToolCall(
                    id=str(tc.get("id") or f"call_{i}"),
                    name=str(fn.get("name") or ""),
                    arguments_json=args,
                )
            )
        finish = _FINISH.get(str(choices[0].get("finish_reason")), FinishReason.OTHER)
        if not text and not calls and isinstance(message.get("refusal"), str):
            finish = FinishReason.CONTENT_FILTER
        usage = self._usage(obj.get("usage"))
        if usage is None:
            usage = estimate_usage(req, text + "".join(c.arguments_json for c in calls))
        response_id = obj.get("id")
        return ChatResponse(
            text=text,
            tool_calls=tuple(calls),
            finish_reason=finish,
            usage=usage,
            response_id=response_id if isinstance(response_id, str) else "",
        )

    def _usage(self, raw: object) -> Usage | None:
        if not isinstance(raw, dict):
            return None
        details = raw.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        return Usage(
            input_tokens=token_count(self.name, raw.get("prompt_tokens")),
            output_tokens=token_count(self.name, raw.get("completion_tokens")),
            cached_input_tokens=token_count(self.name, cached),
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
        """Streaming Chat Completions call (``data: [DONE]`` terminated)."""
        name = self.name
        url, headers, body = self._prepare(base_url, secret, req, stream=True)
        finish: FinishReason | None = None
        usage: Usage | None = None
        response_id = ""
        done = False
        out_text: list[str] = []
        seen_tools: set[int] = set()
        async with aclosing(open_sse(name, client, url, headers, body, timeouts, self.map_error)) as events:
            async for ev in events:
                data = ev.data
                if data == "[DONE]":
                    done = True
                    break
                obj = parse_json_object(name, data)
                err = obj.get("error")
                if err:
                    raise self._stream_error(err)
                if not response_id and isinstance(obj.get("id"), str):
                    response_id = obj["id"]
                u = self._usage(obj.get("usage"))
                if u is not None:
                    usage = u
                choices = obj.get("choices") or []
                if not isinstance(choices, list):
                    raise protocol_error(name, "unexpected choices type")
                for ch in choices:
                    if not isinstance(ch, dict) or ch.get("index", 0) != 0:
                        continue
                    delta = ch.get("delta") or {}
                    if not isinstance(delta, dict):
                        raise protocol_error(name, "unexpected delta type")
                    content = delta.get("content")
                    if isinstance(content, str) and content:
                        out_text.append(content)
                        yield TextDelta(content)
                    for tc in delta.get("tool_calls") or ():
                        if not isinstance(tc, dict):
                            raise protocol_error(name, "unexpected tool call delta")
                        idx = tc.get("index", 0)
                        if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
                            raise protocol_error(name, "bad tool call index")
                        fn = tc.get("function") or {}
                        frag = (fn.get("arguments") or "") if isinstance(fn, dict) else ""
                        if not isinstance(frag, str):
                            raise protocol_error(name, "bad tool call arguments")
                        if idx in seen_tools:
                            tid, tname = "", ""
                        else:
                            seen_tools.add(idx)
                            tid = str(tc.get("id") or f"call_{idx}")
                            tname = str(fn.get("name") or "") if isinstance(fn, dict) else ""
                        out_text.append(frag)
                        yield ToolCallDelta(idx, tid, tname, frag)
                    fr = ch.get("finish_reason")
                    if fr:
                        finish = _FINISH.get(str(fr), FinishReason.OTHER)
        if not done:
            raise protocol_error(name, "stream ended without [DONE]")
        if usage is None:
            usage = estimate_usage(req, "".join(out_text))
        yield StreamEnd(finish or FinishReason.OTHER, usage, response_id)

    # ------------------------------------------------------------------ errors

    def map_error(self, status: int, headers: httpx.Headers, body: bytes) -> ProviderError:
        """Map a non-2xx answer to a ProviderError (no provider text kept)."""
        err = try_json_object(body).get("error")
        err = err if isinstance(err, dict) else {}
        code = safe_token(err.get("code"))
        etype = safe_token(err.get("type"))
        token = code or etype
        retry = parse_retry_after(headers)
        if status == 429:
            kind = ErrorKind.RATE_LIMITED
        elif status in (401, 403):
            kind = ErrorKind.AUTH_FAILED
        elif code == "context_length_exceeded":
            kind = ErrorKind.CONTEXT_TOO_LONG
        elif code in _REFUSAL_CODES or etype in _REFUSAL_CODES:
            kind = ErrorKind.CONTENT_REFUSED
        elif status in (503, 529):
            kind = ErrorKind.OVERLOADED
        elif status == 408:
            kind = ErrorKind.TIMEOUT
        elif status >= 500:
            kind = ErrorKind.SERVER_ERROR
        else:
            kind = ErrorKind.BAD_REQUEST
        _LOGGER.debug("%s: upstream HTTP %d (%s)", self.name, status, kind.name)
        return ProviderError(
            kind, summarize(self.name, status, token), status_code=status, retry_after_s=retry
        )

    def _stream_error(self, err: object) -> ProviderError:
        err = err if isinstance(err, dict) else {}
        code = safe_token(err.get("code"))
        etype = safe_token(err.get("type"))
        kind = _STREAM_KINDS.get(code or "") or _STREAM_KINDS.get(etype or "") or ErrorKind.SERVER_ERROR
        return ProviderError(kind, summarize(self.name, None, code or etype, "stream error"))


def _data_url(part: ContentPart) -> str:
    mime = image_mime(part.mime_type)
    return f"data:{mime};base64,{base64.b64encode(part.data).decode('ascii')}"


def _content(msg: Message) -> str | list[dict[str, Any]]:
    if all(p.kind == "text" for p in msg.parts):
        return msg.text
    out: list[dict[str, Any]] = []
    for p in msg.parts:
        if p.kind == "text":
            out.append({"type": "text", "text": p.text})
        elif p.kind == "image_url":
            out.append({"type": "image_url", "image_url": {"url": p.url}})
        else:
            out.append({"type": "image_url", "image_url": {"url": _data_url(p)}})
    return out


def _message(msg: Message) -> dict[str, Any]:
    if msg.role == "tool":
        if not msg.tool_call_id:
            raise ValueError("tool message needs tool_call_id")
        return {"role": "tool", "tool_call_id": msg.tool_call_id, "content": msg.text}
    if msg.role == "assistant":
        out: dict[str, Any] = {"role": "assistant"}
        if msg.tool_calls:
            out["content"] = msg.text or None
            out["tool_calls"] = [
                {
                    "id": tc.id,
                    "type": "function",
                    "function": {"name": tc.name, "arguments": tc.arguments_json},
                }
                for tc in msg.tool_calls
            ]
        else:
            out["content"] = msg.text
    elif msg.role == "system":
        out = {"role": "system", "content": msg.text}
    elif msg.role == "user":
        out = {"role": "user", "content": _content(msg)}
    else:
        raise ValueError("unknown message role")
    if msg.name:
        out["name"] = msg.name
    return out


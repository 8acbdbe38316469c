"""Google Gemini ``generateContent`` / ``streamGenerateContent`` adapter.

The key travels in the ``x-goog-api-key`` header, never in ``?key=``.
Gemini function calls carry no ids: we assign ``call_<n>`` (n = ordinal of the
call in the response) and map tool results back to function names through
the ids of earlier assistant tool calls (or ``Message.name``).
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import httpx

from .base import (
    USER_AGENT,
    build_url,
    check_secret,
    check_url_name,
    dumps,
    estimate_usage,
    image_mime,
    load_json_arg,
    open_sse,
    parse_json_object,
    protocol_error,
    send_unary,
    token_count,
    try_json_object,
)
from .domain import (
    ChatRequest,
    ChatResponse,
    FinishReason,
    StreamEnd,
    StreamEvent,
    TextDelta,
    Timeouts,
    ToolCall,
    ToolCallDelta,
    Usage,
    UsageSoFar,
)
from .errors import ProviderError
from .gemini_errors import typed_error

__all__ = ["GeminiAdapter"]

_LOGGER = logging.getLogger(__name__)

_FINISH = {
    "STOP": FinishReason.STOP,
    "MAX_TOKENS": FinishReason.LENGTH,
    "SAFETY": FinishReason.CONTENT_FILTER,
    "RECITATION": FinishReason.CONTENT_FILTER,
    "PROHIBITED_CONTENT": FinishReason.CONTENT_FILTER,
    "BLOCKLIST": FinishReason.CONTENT_FILTER,
    "SPII": FinishReason.CONTENT_FILTER,
    "IMAGE_SAFETY": FinishReason.CONTENT_FILTER,
}


class GeminiAdapter:
    """Gemini API over ``{base_url}/v1beta/models/{model}:generateContent``."""

    name: str = "gemini"

    def __repr__(self) -> str:
        return "GeminiAdapter()"

    # ------------------------------------------------------------------ request

    def build_body(self, req: ChatRequest) -> dict[str, Any]:
        """The JSON body for ``req`` (raises ValueError on untranslatable input)."""
        system = "\n\n".join(m.text for m in req.messages if m.role == "system")
        call_names: dict[str, str] = {}
        contents: list[dict[str, Any]] = []
        for m in req.messages:
            if m.role == "system":
                continue
            parts: list[dict[str, Any]] = []
            if m.role == "tool":
                fname = m.name or call_names.get(m.tool_call_id, "")
                if not fname:
                    raise ValueError("tool result cannot be matched to a function name")
                parts.append({"functionResponse": {"name": fname, "response": _tool_response(m.text)}})
                role = "user"
            else:
                role = "model" if m.role == "assistant" else "user"
                for p in m.parts:
                    if p.kind == "text":
                        if p.text:
                            parts.append({"text": p.text})
                    elif p.kind == "image_url":
                        fd: dict[str, Any] = {"fileUri": p.url}
                        if p.mime_type:
                            fd["mimeType"] = p.mime_type
                        parts.append({"fileData": fd})
                    else:
                        parts.append(
                            {
                                "inlineData": {
                                    "mimeType": image_mime(p.mime_type),
                                    "data": base64.b64encode(p.data).decode("ascii"),
                                }
                            }
                        )
                for tc in m.tool_calls:
                    call_names[tc.id] = tc.name
                    args = load_json_arg(tc.arguments_json, "tool call arguments")
                    if not isinstance(args, dict):
                        raise ValueError("tool call arguments must be a JSON object")
                    parts.append({"functionCall": {"name": tc.name, "args": args}})
            if not parts:
                continue
            if contents and contents[-1]["role"] == role:
                contents[-1]["parts"].extend(parts)
            else:
                contents.append({"role": role, "parts": parts})
        body: dict[str, Any] = {"contents": contents}
        if system:
            body["systemInstruction"] = {"parts": [{"text": system}]}
        if req.tools:
            body["tools"] = [
                {
                    "functionDeclarations": [
                        {
                            "name": t.name,
                            "description": t.description,
                            # Full JSON Schema (anyOf, $ref, additionalProperties...) goes in
                            # parametersJsonSchema; `parameters` takes only an OpenAPI subset.
                            "parametersJsonSchema": load_json_arg(t.parameters_json, "tool parameters"),
                        }
                        for t in req.tools
                    ]
                }
            ]
        if req.tool_choice:
            modes = {"auto": "AUTO", "none": "NONE", "required": "ANY"}
            fcc: dict[str, Any] = {"mode": modes.get(req.tool_choice, "ANY")}
            if req.tool_choice not in modes:
                fcc["allowedFunctionNames"] = [req.tool_choice]
            body["toolConfig"] = {"functionCallingConfig": fcc}
        gen: dict[str, Any] = {"maxOutputTokens": req.max_output_tokens}
        if req.temperature is not None:
            gen["temperature"] = req.temperature
        if req.top_p is not None:
            gen["topP"] = req.top_p
        if req.stop:
            gen["stopSequences"] = list(req.stop)
        body["generationConfig"] = gen
        return body

    def _prepare(
        self, base_url: str, secret: str, req: ChatRequest, *, stream: bool
    ) -> tuple[str, dict[str, str], bytes]:
        model = check_url_name(req.model)
        body = dumps(self.build_body(req))
        check_secret(self.name, secret)
        if stream:
            url = build_url(
                base_url, f"/v1beta/models/{model}:streamGenerateContent?alt=sse", allowed_query="alt=sse"
            )
        else:
            url = build_url(base_url, f"/v1beta/models/{model}:generateContent")
        headers = {
            "content-type": "application/json",
            "accept": "text/event-stream" if stream else "application/json",
            "x-goog-api-key": secret,
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
        """Unary generateContent call."""
        url, headers, body = self._prepare(base_url, secret, req, stream=False)
        _, data = await send_unary(self.name, client, url, headers, body, timeouts, self.map_error)
        return self.parse_response(data, req)

    def parse_response(self, data: bytes, req: ChatRequest) -> ChatResponse:
        """Translate a GenerateContentResponse JSON body (usage counted from the text when none is reported)."""
        obj = parse_json_object(self.name, data)
        acc = _Accumulator(self.name)
        list(acc.feed(obj))
        return acc.response(req)

    # ------------------------------------------------------------------ streaming

    async def stream(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        secret: str,
        req: ChatRequest,
        timeouts: Timeouts,
    ) -> AsyncIterator[StreamEvent]:
        """streamGenerateContent?alt=sse; the chunk carrying finishReason ends the stream."""
        name = self.name
        url, headers, body = self._prepare(base_url, secret, req, stream=True)
        acc = _Accumulator(name)
        async with aclosing(open_sse(name, client, url, headers, body, timeouts, self.map_error)) as events:
            async for ev in events:
                obj = parse_json_object(name, ev.data)
                if obj.get("error"):
                    raise typed_error(name, obj["error"], None, in_stream=True)
                for event in acc.feed(obj):
                    yield event
        if not acc.finished:
            raise protocol_error(name, "stream ended without finishReason")
        resp = acc.response(req)
        yield StreamEnd(resp.finish_reason, resp.usage, resp.response_id)

    # ------------------------------------------------------------------ errors

    def map_error(self, status: int, headers: httpx.Headers, body: bytes) -> ProviderError:
        """Map a non-2xx answer to a ProviderError (no provider text kept)."""
        error = typed_error(self.name, try_json_object(body).get("error"), status)
        _LOGGER.debug("%s: upstream HTTP %d (%s)", self.name, status, error.kind.name)
        return error


def _usage_of(provider: str, u: dict[str, Any]) -> Usage:
    """A ``usageMetadata`` object as Usage (thinking tokens are output tokens)."""
    return Usage(
        input_tokens=token_count(provider, u.get("promptTokenCount")),
        output_tokens=token_count(provider, u.get("candidatesTokenCount"))
        + token_count(provider, u.get("thoughtsTokenCount")),
        cached_input_tokens=token_count(provider, u.get("cachedContentTokenCount")),
    )


class _Accumulator:
    """Folds GenerateContentResponse chunks into events and a final response."""

    def __init__(self, provider: str) -> None:
        self._provider = provider
        self.texts: list[str] = []
        self.calls: list[ToolCall] = []
        self.finish: str | None = None
        self.blocked = False
        self.usage: dict[str, Any] | None = None
        self.response_id = ""

    @property
    def finished(self) -> bool:
        return self.finish is not None or self.blocked

    def feed(self, obj: dict[str, Any]) -> list[StreamEvent]:
        provider = self._provider
        events: list[StreamEvent] = []
        if isinstance(obj.get("responseId"), str) and not self.response_id:
            self.response_id = obj["responseId"]
        usage = obj.get("usageMetadata")
        if isinstance(usage, dict):
            self.usage = usage  # running total: keep the last
            if "promptTokenCount" in usage:
                events.append(UsageSoFar(_usage_of(provider, usage)))
        feedback = obj.get("promptFeedback")
        if isinstance(feedback, dict) and feedback.get("blockReason"):
            self.blocked = True
        candidates = obj.get("candidates")
        if candidates is None:
            if not self.blocked and usage is None:
                raise protocol_error(provider, "response has no candidates")
            return events
        if not isinstance(candidates, list):
            raise protocol_error(provider, "unexpected candidates type")
        for cand in candidates[:1]:
            if not isinstance(cand, dict):
                raise protocol_error(provider, "unexpected candidate")
            content = cand.get("content") or {}
            parts = (content.get("parts") or []) if isinstance(content, dict) else None
            if not isinstance(parts, list):
                raise protocol_error(provider, "unexpected parts")
            for part in parts:
                if not isinstance(part, dict) or part.get("thought"):
                    continue
                if "text" in part:
                    text = part["text"]
                    if not isinstance(text, str):
                        raise protocol_error(provider, "unexpected text part")
                    if text:
                        self.texts.append(text)
                        events.append(TextDelta(text))
                elif "functionCall" in part:
                    fc = part["functionCall"]
                    if not isinstance(fc, dict):
                        raise protocol_error(provider, "unexpected functionCall")
                    ordinal = len(self.calls)
                    cid = fc.get("id")
                    call = ToolCall(
                        id=cid if isinstance(cid, str) and cid else f"call_{ordinal}",
                        name=str(fc.get("name") or ""),
                        arguments_json=dumps(fc.get("args") or {}).decode("utf-8"),
                    )
                    self.calls.append(call)
                    events.append(ToolCallDelta(ordinal, call.id, call.name, call.arguments_json))
            fr = cand.get("finishReason")
            if isinstance(fr, str) and fr and fr != "FINISH_REASON_UNSPECIFIED":
                self.finish = fr
        return events

    def response(self, req: ChatRequest) -> ChatResponse:
        provider = self._provider
        if self.blocked and self.finish is None:
            finish = FinishReason.CONTENT_FILTER
        elif self.finish is None:
            raise protocol_error(provider, "response has no finishReason")
        elif self.finish == "STOP" and self.calls:
            finish = FinishReason.TOOL_CALLS
        else:
            finish = _FINISH.get(self.finish, FinishReason.OTHER)
        u = self.usage or {}
        text = "".join(self.texts)
        if u:
            usage = _usage_of(provider, u)
        else:
            usage = estimate_usage(req, text + "".join(c.arguments_json for c in self.calls))
        return ChatResponse(
            text=text,
            tool_calls=tuple(self.calls),
            finish_reason=finish,
            usage=usage,
            response_id=self.response_id,
        )


def _tool_response(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return {"result": text}
    return value if isinstance(value, dict) else {"result": value}

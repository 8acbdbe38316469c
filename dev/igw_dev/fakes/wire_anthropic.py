"""The Anthropic Messages wire format of the fake."""


from __future__ import annotations

from typing import Any

from .common import _RATE_LIMIT, _TOOL_FRAGMENTS, _WORDS, _dumps, _fmt_secs
from .conversation import _Conv, _Plan
from .wire_openai import _Wire


class _AnthropicWire(_Wire):
    def ok_headers(self, response_id: str) -> dict[str, str]:
        n = next(self.state.counter)
        return {
            "request-id": response_id,
            "anthropic-ratelimit-requests-limit": str(_RATE_LIMIT),
            "anthropic-ratelimit-requests-remaining": str(_RATE_LIMIT - 1 - n % _RATE_LIMIT),
            "anthropic-ratelimit-requests-reset": "2030-01-01T00:00:00Z",
            "anthropic-ratelimit-tokens-limit": "2000000",
            "anthropic-ratelimit-tokens-remaining": "1999000",
        }

    def rate_headers(self) -> dict[str, str]:
        return {"anthropic-ratelimit-requests-remaining": "0", "anthropic-ratelimit-tokens-remaining": "0"}

    def _usage(self, plan: _Plan, output: int) -> dict[str, Any]:
        return {
            "input_tokens": plan.input_tokens - plan.cached_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": plan.cached_tokens,
            "output_tokens": output,
        }

    def _stop(self, plan: _Plan) -> str:
        return {"stop": "end_turn", "length": "max_tokens", "tool": "tool_use"}[plan.finish]

    def unary(self, conv: _Conv, plan: _Plan, response_id: str, usage: bool) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if plan.preface:
            content.append({"type": "text", "text": plan.preface})
        if plan.text:
            content.append({"type": "text", "text": plan.text})
        if plan.tool_name:
            content.append(
                {"type": "tool_use", "id": "toolu_fake_0", "name": plan.tool_name, "input": {"city": "Paris"}}
            )
        out: dict[str, Any] = {
            "id": response_id,
            "type": "message",
            "role": "assistant",
            "model": conv.model,
            "content": content,
            "stop_reason": self._stop(plan),
            "stop_sequence": None,
        }
        if usage:
            out["usage"] = self._usage(plan, plan.output_tokens)
        return out

    @staticmethod
    def _ev(name: str, data: dict[str, Any]) -> bytes:
        return b"event: " + name.encode() + b"\ndata: " + _dumps(data) + b"\n\n"

    def stream_prefix(self, conv: _Conv, response_id: str) -> list[bytes]:
        plan_usage = {"input_tokens": 0, "output_tokens": 1}
        return [
            self._ev(
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": response_id,
                        "type": "message",
                        "role": "assistant",
                        "model": conv.model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": plan_usage,
                    },
                },
            ),
            self._ev(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            ),
        ]

    def text_event(self, conv: _Conv, response_id: str, text: str) -> bytes:
        return self._ev(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
        )

    def stream_events(self, conv: _Conv, plan: _Plan, response_id: str, usage: bool) -> list[bytes]:
        start_usage = self._usage(plan, 1) if usage else {}
        out = [
            self._ev(
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": response_id,
                        "type": "message",
                        "role": "assistant",
                        "model": conv.model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": start_usage,
                    },
                },
            )
        ]
        index = 0
        text = plan.preface or plan.text
        if text or not plan.tool_name:
            out.append(
                self._ev(
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": 0,
                        "content_block": {"type": "text", "text": ""},
                    },
                )
            )
            out.append(self._ev("ping", {"type": "ping"}))
            for piece in _WORDS.findall(text):
                out.append(self.text_event(conv, response_id, piece))
            out.append(self._ev("content_block_stop", {"type": "content_block_stop", "index": 0}))
            index = 1
        if plan.tool_name:
            out.append(
                self._ev(
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {
                            "type": "tool_use",
                            "id": "toolu_fake_0",
                            "name": plan.tool_name,
                            "input": {},
                        },
                    },
                )
            )
            for frag in _TOOL_FRAGMENTS:
                out.append(
                    self._ev(
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": index,
                            "delta": {"type": "input_json_delta", "partial_json": frag},
                        },
                    )
                )
            out.append(self._ev("content_block_stop", {"type": "content_block_stop", "index": index}))
        delta: dict[str, Any] = {
            "type": "message_delta",
            "delta": {"stop_reason": self._stop(plan), "stop_sequence": None},
        }
        if usage:
            delta["usage"] = {"output_tokens": plan.output_tokens}
        out.append(self._ev("message_delta", delta))
        out.append(self._ev("message_stop", {"type": "message_stop"}))
        return out

    _TYPES: dict[int, str] = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        500: "api_error",
        503: "overloaded_error",
        504: "timeout_error",
        529: "overloaded_error",
    }

    def error_body(
        self, status: int, error_type: str | None, message: str | None, retry_after: float | None
    ) -> tuple[dict[str, Any], dict[str, str]]:
        etype = error_type or self._TYPES.get(status, "api_error")
        headers: dict[str, str] = {"request-id": "req_fake_err"}
        if retry_after is not None:
            headers["retry-after"] = _fmt_secs(retry_after)
        if status == 429:
            headers.update(self.rate_headers())
        body = {"type": "error", "error": {"type": etype, "message": message or "Error"}}
        return body, headers

    def stream_error_event(self, status: int, error_type: str | None, message: str | None) -> bytes:
        body, _ = self.error_body(status, error_type, message, None)
        return self._ev("error", body)

    def auth_error(self, key: str) -> tuple[int, dict[str, Any]]:
        return 401, {
            "type": "error",
            "error": {"type": "authentication_error", "message": "invalid x-api-key"},
        }

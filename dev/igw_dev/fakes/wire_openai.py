"""The OpenAI Chat Completions wire format (and the base every fake wire format shares)."""


from __future__ import annotations

import time
from typing import Any

from .common import _RATE_LIMIT, _TOOL_ARGS, _TOOL_FRAGMENTS, _WORDS, FakeState, _dumps, _fmt_secs
from .conversation import _Conv, _Plan

# --------------------------------------------------------------------------- wire formats


class _Wire:
    """Per-provider encoding of answers and errors."""

    sse_headers: dict[str, str] = {"content-type": "text/event-stream", "cache-control": "no-cache"}

    def __init__(self, state: FakeState) -> None:
        self.state = state

    # success
    def unary(self, conv: _Conv, plan: _Plan, response_id: str, usage: bool) -> dict[str, Any]:
        raise NotImplementedError

    def stream_events(self, conv: _Conv, plan: _Plan, response_id: str, usage: bool) -> list[bytes]:
        raise NotImplementedError

    def text_event(self, conv: _Conv, response_id: str, text: str) -> bytes:
        raise NotImplementedError

    def stream_prefix(self, conv: _Conv, response_id: str) -> list[bytes]:
        return []

    # errors
    def error_body(
        self, status: int, error_type: str | None, message: str | None, retry_after: float | None
    ) -> tuple[dict[str, Any], dict[str, str]]:
        raise NotImplementedError

    def stream_error_event(self, status: int, error_type: str | None, message: str | None) -> bytes:
        body, _ = self.error_body(status, error_type, message, None)
        return b"data: " + _dumps(body) + b"\n\n"

    def auth_error(self, key: str) -> tuple[int, dict[str, Any]]:
        raise NotImplementedError

    def ok_headers(self, response_id: str) -> dict[str, str]:
        return {}

    def rate_headers(self) -> dict[str, str]:
        return {}


class _OpenAIWire(_Wire):
    def ok_headers(self, response_id: str) -> dict[str, str]:
        n = next(self.state.counter)
        return {
            "x-request-id": response_id,
            "openai-processing-ms": "1",
            "x-ratelimit-limit-requests": str(_RATE_LIMIT),
            "x-ratelimit-remaining-requests": str(_RATE_LIMIT - 1 - n % _RATE_LIMIT),
            "x-ratelimit-reset-requests": "6ms",
            "x-ratelimit-limit-tokens": "2000000",
            "x-ratelimit-remaining-tokens": "1999000",
            "x-ratelimit-reset-tokens": "30ms",
        }

    def rate_headers(self) -> dict[str, str]:
        return {"x-ratelimit-remaining-requests": "0", "x-ratelimit-remaining-tokens": "0"}

    def _usage(self, plan: _Plan) -> dict[str, Any]:
        return {
            "prompt_tokens": plan.input_tokens,
            "completion_tokens": plan.output_tokens,
            "total_tokens": plan.input_tokens + plan.output_tokens,
            "prompt_tokens_details": {"cached_tokens": plan.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }

    def unary(self, conv: _Conv, plan: _Plan, response_id: str, usage: bool) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": plan.text or None, "refusal": None}
        finish = {"stop": "stop", "length": "length", "tool": "tool_calls"}[plan.finish]
        if plan.tool_name:
            message["tool_calls"] = [
                {
                    "id": "call_fake_0",
                    "type": "function",
                    "function": {"name": plan.tool_name, "arguments": _TOOL_ARGS},
                }
            ]
        out: dict[str, Any] = {
            "id": response_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": conv.model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "system_fingerprint": "fp_fake",
        }
        if usage:
            out["usage"] = self._usage(plan)
        return out

    def _chunk(self, conv: _Conv, response_id: str, delta: dict[str, Any], finish: str | None) -> bytes:
        return (
            b"data: "
            + _dumps(
                {
                    "id": response_id,
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": conv.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                    "usage": None,
                }
            )
            + b"\n\n"
        )

    def stream_prefix(self, conv: _Conv, response_id: str) -> list[bytes]:
        return [self._chunk(conv, response_id, {"role": "assistant", "content": "", "refusal": None}, None)]

    def text_event(self, conv: _Conv, response_id: str, text: str) -> bytes:
        return self._chunk(conv, response_id, {"content": text}, None)

    def stream_events(self, conv: _Conv, plan: _Plan, response_id: str, usage: bool) -> list[bytes]:
        out = self.stream_prefix(conv, response_id)
        if plan.tool_name:
            out.append(
                self._chunk(
                    conv,
                    response_id,
                    {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_fake_0",
                                "type": "function",
                                "function": {"name": plan.tool_name, "arguments": ""},
                            }
                        ]
                    },
                    None,
                )
            )
            for frag in _TOOL_FRAGMENTS:
                out.append(
                    self._chunk(
                        conv, response_id, {"tool_calls": [{"index": 0, "function": {"arguments": frag}}]}, None
                    )
                )
        for piece in _WORDS.findall(plan.text):
            out.append(self.text_event(conv, response_id, piece))
        finish = {"stop": "stop", "length": "length", "tool": "tool_calls"}[plan.finish]
        out.append(self._chunk(conv, response_id, {}, finish))
        if usage and conv.include_usage:
            out.append(
                b"data: "
                + _dumps(
                    {
                        "id": response_id,
                        "object": "chat.completion.chunk",
                        "created": 0,
                        "model": conv.model,
                        "choices": [],
                        "usage": self._usage(plan),
                    }
                )
                + b"\n\n"
            )
        out.append(b"data: [DONE]\n\n")
        return out

    _DEFAULTS: dict[int, tuple[str, str | None, str]] = {
        400: ("invalid_request_error", None, "Invalid request."),
        401: ("invalid_request_error", "invalid_api_key", "Invalid authentication."),
        403: ("invalid_request_error", "unsupported_country_region_territory", "Forbidden."),
        404: ("invalid_request_error", "model_not_found", "The model does not exist."),
        422: ("invalid_request_error", None, "Unprocessable."),
        429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
        500: ("server_error", None, "The server had an error while processing your request."),
        502: ("server_error", None, "Bad gateway."),
        503: ("server_error", None, "The engine is currently overloaded, please try again later."),
        504: ("server_error", None, "Gateway timeout."),
    }

    def error_body(
        self, status: int, error_type: str | None, message: str | None, retry_after: float | None
    ) -> tuple[dict[str, Any], dict[str, str]]:
        etype, code, msg = self._DEFAULTS.get(status, ("server_error", None, "Error."))
        if error_type:
            code = error_type
        headers: dict[str, str] = {}
        if retry_after is not None:
            headers["retry-after"] = _fmt_secs(retry_after)
            headers["retry-after-ms"] = str(int(retry_after * 1000))
        if status == 429:
            headers.update(self.rate_headers())
        return {"error": {"message": message or msg, "type": etype, "param": None, "code": code}}, headers

    def auth_error(self, key: str) -> tuple[int, dict[str, Any]]:
        return 401, {
            "error": {
                "message": f"Incorrect API key provided: {key}. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        }

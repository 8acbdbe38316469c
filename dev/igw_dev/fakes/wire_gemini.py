"""The Gemini generateContent wire format of the fake."""


from __future__ import annotations

from typing import Any

from .common import _WORDS, _dumps, _words
from .conversation import _Conv, _Plan
from .wire_openai import _Wire


class _GeminiWire(_Wire):
    sse_headers = {"content-type": "text/event-stream", "cache-control": "no-cache"}

    def _usage(self, plan: _Plan, output: int) -> dict[str, Any]:
        u: dict[str, Any] = {
            "promptTokenCount": plan.input_tokens,
            "candidatesTokenCount": output,
            "totalTokenCount": plan.input_tokens + output,
        }
        if plan.cached_tokens:
            u["cachedContentTokenCount"] = plan.cached_tokens
        return u

    def _finish(self, plan: _Plan) -> str:
        return "MAX_TOKENS" if plan.finish == "length" else "STOP"

    def _chunk(
        self, conv: _Conv, response_id: str, parts: list[dict[str, Any]], finish: str | None, usage: Any
    ) -> dict[str, Any]:
        cand: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
        if finish:
            cand["finishReason"] = finish
        out: dict[str, Any] = {"candidates": [cand]}
        if usage is not None:
            out["usageMetadata"] = usage
        out["modelVersion"] = conv.model
        out["responseId"] = response_id
        return out

    def unary(self, conv: _Conv, plan: _Plan, response_id: str, usage: bool) -> dict[str, Any]:
        parts: list[dict[str, Any]] = []
        if plan.text:
            parts.append({"text": plan.text})
        if plan.tool_name:
            parts.append({"functionCall": {"name": plan.tool_name, "args": {"city": "Paris"}}})
        return self._chunk(
            conv, response_id, parts, self._finish(plan), self._usage(plan, plan.output_tokens) if usage else None
        )

    @staticmethod
    def _data(obj: dict[str, Any]) -> bytes:
        return b"data: " + _dumps(obj) + b"\r\n\r\n"

    def text_event(self, conv: _Conv, response_id: str, text: str) -> bytes:
        return self._data(self._chunk(conv, response_id, [{"text": text}], None, None))

    def stream_events(self, conv: _Conv, plan: _Plan, response_id: str, usage: bool) -> list[bytes]:
        out: list[bytes] = []
        if plan.tool_name:
            out.append(
                self._data(
                    self._chunk(
                        conv,
                        response_id,
                        [{"functionCall": {"name": plan.tool_name, "args": {"city": "Paris"}}}],
                        self._finish(plan),
                        self._usage(plan, plan.output_tokens) if usage else None,
                    )
                )
            )
            return out
        pieces = _WORDS.findall(plan.text) or [""]
        so_far = 0
        for i, piece in enumerate(pieces):
            so_far += _words(piece)
            last = i == len(pieces) - 1
            out.append(
                self._data(
                    self._chunk(
                        conv,
                        response_id,
                        [{"text": piece}],
                        self._finish(plan) if last else None,
                        self._usage(plan, so_far) if usage else None,
                    )
                )
            )
        return out

    _STATUSES: dict[int, str] = {
        400: "INVALID_ARGUMENT",
        401: "UNAUTHENTICATED",
        403: "PERMISSION_DENIED",
        404: "NOT_FOUND",
        429: "RESOURCE_EXHAUSTED",
        500: "INTERNAL",
        503: "UNAVAILABLE",
        504: "DEADLINE_EXCEEDED",
    }

    def error_body(
        self, status: int, error_type: str | None, message: str | None, retry_after: float | None
    ) -> tuple[dict[str, Any], dict[str, str]]:
        gstatus = error_type or self._STATUSES.get(status, "INTERNAL")
        err: dict[str, Any] = {"code": status, "message": message or "Error.", "status": gstatus}
        if status == 429:
            details: list[dict[str, Any]] = [
                {
                    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                    "violations": [{"quotaMetric": "generativelanguage.googleapis.com/generate_requests"}],
                }
            ]
            if retry_after is not None:
                details.append(
                    {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{retry_after:g}s"}
                )
            err["details"] = details
        return {"error": err}, {}

    def stream_error_event(self, status: int, error_type: str | None, message: str | None) -> bytes:
        body, _ = self.error_body(status, error_type, message, None)
        return self._data(body)

    def auth_error(self, key: str) -> tuple[int, dict[str, Any]]:
        return 400, {
            "error": {
                "code": 400,
                "message": "API key not valid. Please pass a valid API key.",
                "status": "INVALID_ARGUMENT",
                "details": [
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": "API_KEY_INVALID",
                        "domain": "googleapis.com",
                    }
                ],
            }
        }

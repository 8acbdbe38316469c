"""Fake LLM providers: real HTTP servers speaking OpenAI, Anthropic and Gemini wire formats.

Deterministic behaviour (so tests can verify translation exactly):

* Reply text: ``"echo: " + <last user text>[:40]``; if the last message is a
  tool result: ``"tool said: " + <result text>[:40]``.
* If the request has tools and the last user text contains "weather", the
  answer is a call of the *first* tool with arguments ``{"city": "Paris"}``
  (streamed as several fragments). The Anthropic fake puts a text block
  ``"Let me check."`` before the ``tool_use`` block, like the real API.
* Tokens: input = number of whitespace-separated words in all message texts
  (system included); cached input = input minus the words of the last
  message (a "prefix cache"); output = words of the reply text plus words of
  the tool-call arguments JSON. If output would exceed the request's max
  tokens, the reply is cut to that many words and finishes with "length".

Fault injection via ``POST /_fake/faults`` (a JSON list of rules, replacing
the current ones; ``DELETE`` clears). A rule::

    {"match_model": "*", "status": 429, "retry_after": 2, "times": 1,
     "probability": 1.0, "delay_ms": 0, "mode": "error",
     "error_type": null, "message": null, "location": null,
     "interval_ms": null, "match_stream": null}

Modes: error, malformed_json, truncated_stream, slow_drip, endless, hang,
redirect, stream_error, echo_key_error, no_usage (normal answer without
usage), ok (normal answer after ``delay_ms``).

Other endpoints: ``GET/DELETE /_fake/requests`` (last 1000 requests),
``GET /_fake/stats`` (includes ``cancelled_streams``: streams whose client
went away early), ``GET /healthz``.

The Gemini fake checks function declarations as the API does: ``parametersJsonSchema``
(full JSON Schema, must describe an object) and ``parameters`` (the OpenAPI subset,
refusing JSON-Schema-only keywords such as ``$ref``, ``$defs``, ``additionalProperties``)
are mutually exclusive; a violation is a 400 INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from aiohttp import web

__all__ = [
    "FAULT_MODES",
    "KINDS",
    "FakeHandle",
    "FakeProcess",
    "FakeState",
    "FaultRule",
    "base_url_for",
    "build_app",
    "start_fake",
]

_LOGGER = logging.getLogger(__name__)

Kind = Literal["openai", "anthropic", "gemini"]
KINDS: tuple[str, ...] = ("openai", "anthropic", "gemini")
FAULT_MODES = frozenset(
    {
        "error",
        "malformed_json",
        "truncated_stream",
        "slow_drip",
        "endless",
        "hang",
        "redirect",
        "stream_error",
        "echo_key_error",
        "no_usage",
        "ok",
    }
)

_TOOL_ARGS = '{"city": "Paris"}'
_TOOL_FRAGMENTS = ('{"ci', 'ty": "Pa', 'ris"}')
_ANTHROPIC_TOOL_PREFACE = "Let me check."
_WORDS = re.compile(r"\S+\s*")
_DEFAULT_REDIRECT = "http://169.254.169.254/latest/meta-data/"
_RATE_LIMIT = 10_000



def base_url_for(kind: str, host: str, port: int) -> str:
    """The base URL an adapter expects for a fake of ``kind``."""
    root = f"http://{host}:{port}"
    return f"{root}/v1" if kind in ("openai", "openai_compatible") else root


def _words(text: str) -> int:
    return len(text.split())


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- faults / state


@dataclass(slots=True)
class FaultRule:
    """One fault-injection rule (see module docstring)."""

    match_model: str = "*"
    status: int | None = None
    retry_after: float | None = None
    times: int | None = None
    probability: float = 1.0
    delay_ms: int = 0
    mode: str = "error"
    error_type: str | None = None
    message: str | None = None
    location: str | None = None
    interval_ms: int | None = None
    match_stream: bool | None = None

    @classmethod
    def from_json(cls, raw: Any) -> FaultRule:
        """Validate and build a rule from decoded JSON."""
        if not isinstance(raw, dict):
            raise ValueError("rule must be an object")
        known = set(cls.__dataclass_fields__)
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown rule fields: {sorted(unknown)}")
        rule = cls(**raw)
        if rule.mode not in FAULT_MODES:
            raise ValueError(f"unknown mode {rule.mode!r}")
        if not 0.0 <= float(rule.probability) <= 1.0:
            raise ValueError("probability must be in [0, 1]")
        return rule


@dataclass
class FakeState:
    """Mutable state of one fake server."""

    kind: str
    api_key: str | None = None
    delay_ms: int = 0
    chunk_delay_ms: int = 0
    rules: list[FaultRule] = field(default_factory=list)
    requests: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=1000))
    stats: dict[str, int] = field(default_factory=dict)
    by_status: dict[str, int] = field(default_factory=dict)
    rng: random.Random = field(default_factory=lambda: random.Random(1234))
    counter: itertools.count[int] = field(default_factory=itertools.count)

    def bump(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    def pick_fault(self, model: str, stream: bool) -> FaultRule | None:
        for rule in self.rules:
            if rule.match_model not in ("*", model):
                continue
            if rule.match_stream is not None and rule.match_stream != stream:
                continue
            if rule.times is not None and rule.times <= 0:
                continue
            if rule.probability < 1.0 and self.rng.random() >= rule.probability:
                continue
            if rule.times is not None:
                rule.times -= 1
            self.bump("faults_applied")
            return rule
        return None


STATE_KEY: web.AppKey[FakeState] = web.AppKey("igw_fake_state", FakeState)


# --------------------------------------------------------------------------- conversation model


@dataclass(slots=True)
class _Conv:
    model: str
    stream: bool
    input_words: int
    last_words: int
    last_user: str
    tool_result: str | None
    tool_names: list[str]
    max_tokens: int | None
    include_usage: bool = True


@dataclass(slots=True)
class _Plan:
    text: str
    tool_name: str | None
    finish: Literal["stop", "length", "tool"]
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    preface: str = ""


def _plan(conv: _Conv, kind: str) -> _Plan:
    cached = max(0, conv.input_words - conv.last_words)
    if conv.tool_result is not None:
        text = "tool said: " + conv.tool_result[:40]
    elif conv.tool_names and "weather" in conv.last_user.lower():
        preface = _ANTHROPIC_TOOL_PREFACE if kind == "anthropic" else ""
        return _Plan(
            text="",
            tool_name=conv.tool_names[0],
            finish="tool",
            input_tokens=conv.input_words,
            cached_tokens=cached,
            output_tokens=_words(_TOOL_ARGS) + _words(preface),
            preface=preface,
        )
    else:
        text = "echo: " + conv.last_user[:40]
    finish: Literal["stop", "length", "tool"] = "stop"
    if conv.max_tokens is not None and _words(text) > conv.max_tokens:
        text = "".join(_WORDS.findall(text)[: max(conv.max_tokens, 0)]).rstrip()
        finish = "length"
    return _Plan(text, None, finish, conv.input_words, cached, _words(text))


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def _conv_openai(body: dict[str, Any]) -> _Conv:
    msgs = body.get("messages") or []
    total = 0
    last_words = 0
    last_user = ""
    tool_result: str | None = None
    for m in msgs:
        text = _text_of(m.get("content"))
        w = _words(text)
        total += w
        last_words = w
        if m.get("role") == "user":
            last_user = text
    if msgs and msgs[-1].get("role") == "tool":
        tool_result = _text_of(msgs[-1].get("content"))
    tools = [t.get("function", {}).get("name", "") for t in body.get("tools") or []]
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    opts = body.get("stream_options") or {}
    return _Conv(
        model=str(body.get("model", "")),
        stream=bool(body.get("stream")),
        input_words=total,
        last_words=last_words,
        last_user=last_user,
        tool_result=tool_result,
        tool_names=tools,
        max_tokens=max_tokens if isinstance(max_tokens, int) else None,
        include_usage=bool(opts.get("include_usage")),
    )


def _conv_anthropic(body: dict[str, Any]) -> _Conv:
    system = body.get("system")
    total = _words(_text_of(system) if isinstance(system, list) else str(system or ""))
    last_words = 0
    last_user = ""
    tool_result: str | None = None
    for m in body.get("messages") or []:
        content = m.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        w = 0
        results = []
        texts = []
        for b in blocks:
            if b.get("type") == "text":
                texts.append(str(b.get("text", "")))
            elif b.get("type") == "tool_result":
                c = b.get("content")
                results.append(_text_of(c) if isinstance(c, list) else str(c or ""))
        w = sum(_words(t) for t in texts + results)
        total += w
        last_words = w
        tool_result = None
        if m.get("role") == "user":
            if texts:
                last_user = " ".join(texts)
            if results and not texts:
                tool_result = results[-1]
    tools = [str(t.get("name", "")) for t in body.get("tools") or []]
    mt = body.get("max_tokens")
    return _Conv(
        model=str(body.get("model", "")),
        stream=bool(body.get("stream")),
        input_words=total,
        last_words=last_words,
        last_user=last_user,
        tool_result=tool_result,
        tool_names=tools,
        max_tokens=mt if isinstance(mt, int) else None,
    )


# JSON Schema keywords the OpenAPI-subset `parameters` field does not know (the API answers
# "Invalid JSON payload received. Unknown name ..."); they belong in `parametersJsonSchema`.
_OPENAPI_SUBSET_UNKNOWN = frozenset({"$ref", "$defs", "$schema", "additionalProperties", "const", "oneOf"})


def _schema_keys(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = set(node)
        for value in node.values():
            found |= _schema_keys(value)
        return found
    if isinstance(node, list):
        return set().union(*(_schema_keys(v) for v in node)) if node else set()
    return set()


def gemini_tools_error(body: dict[str, Any]) -> str | None:
    """Why the Gemini API would refuse the request's function declarations, or None."""
    for tool in body.get("tools") or []:
        for decl in (tool or {}).get("functionDeclarations") or []:
            has_params, has_json = "parameters" in decl, "parametersJsonSchema" in decl
            if has_params and has_json:
                return "parameters and parametersJsonSchema are mutually exclusive"
            if has_json:
                schema = decl["parametersJsonSchema"]
                if not isinstance(schema, dict) or schema.get("type") != "object":
                    return "parametersJsonSchema must describe an object"
            if has_params:
                unknown = _schema_keys(decl["parameters"]) & _OPENAPI_SUBSET_UNKNOWN
                if unknown:
                    return f"Invalid JSON payload received. Unknown name {sorted(unknown)[0]!r} in parameters"
    return None


def _conv_gemini(body: dict[str, Any], model: str, stream: bool) -> _Conv:
    si = body.get("systemInstruction") or {}
    total = sum(_words(str(p.get("text", ""))) for p in si.get("parts") or [])
    last_words = 0
    last_user = ""
    tool_result: str | None = None
    for c in body.get("contents") or []:
        texts = [str(p["text"]) for p in c.get("parts") or [] if "text" in p]
        results = [
            json.dumps(p["functionResponse"].get("response"), separators=(",", ":"))
            for p in c.get("parts") or []
            if "functionResponse" in p
        ]
        w = sum(_words(t) for t in texts) + sum(_words(r) for r in results)
        total += w
        last_words = w
        tool_result = None
        if c.get("role", "user") == "user":
            if texts:
                last_user = " ".join(texts)
            if results and not texts:
                tool_result = results[-1]
    tools = [
        str(d.get("name", "")) for t in body.get("tools") or [] for d in t.get("functionDeclarations") or []
    ]
    mt = (body.get("generationConfig") or {}).get("maxOutputTokens")
    return _Conv(
        model=model,
        stream=stream,
        input_words=total,
        last_words=last_words,
        last_user=last_user,
        tool_result=tool_result,
        tool_names=tools,
        max_tokens=mt if isinstance(mt, int) else None,
    )


# --------------------------------------------------------------------------- wire formats


class _Wire:
    """Per-provider encoding of answers and errors."""

    sse_headers: dict[str, str] = {"content-type": "text/event-stream", "cache-control": "no-cache"}

    def __init__(self, state: FakeState) -> None:
        self.state = state

    # success
    def unary(self, conv: _Conv, plan: _Plan, rid: str, usage: bool) -> dict[str, Any]:
        raise NotImplementedError

    def stream_events(self, conv: _Conv, plan: _Plan, rid: str, usage: bool) -> list[bytes]:
        raise NotImplementedError

    def text_event(self, conv: _Conv, rid: str, text: str) -> bytes:
        raise NotImplementedError

    def stream_prefix(self, conv: _Conv, rid: str) -> list[bytes]:
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

    def ok_headers(self, rid: str) -> dict[str, str]:
        return {}

    def rate_headers(self) -> dict[str, str]:
        return {}


class _OpenAIWire(_Wire):
    def ok_headers(self, rid: str) -> dict[str, str]:
        n = next(self.state.counter)
        return {
            "x-request-id": rid,
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

    def unary(self, conv: _Conv, plan: _Plan, rid: str, usage: bool) -> dict[str, Any]:
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
            "id": rid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": conv.model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "system_fingerprint": "fp_fake",
        }
        if usage:
            out["usage"] = self._usage(plan)
        return out

    def _chunk(self, conv: _Conv, rid: str, delta: dict[str, Any], finish: str | None) -> bytes:
        return (
            b"data: "
            + _dumps(
                {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": conv.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                    "usage": None,
                }
            )
            + b"\n\n"
        )

    def stream_prefix(self, conv: _Conv, rid: str) -> list[bytes]:
        return [self._chunk(conv, rid, {"role": "assistant", "content": "", "refusal": None}, None)]

    def text_event(self, conv: _Conv, rid: str, text: str) -> bytes:
        return self._chunk(conv, rid, {"content": text}, None)

    def stream_events(self, conv: _Conv, plan: _Plan, rid: str, usage: bool) -> list[bytes]:
        out = self.stream_prefix(conv, rid)
        if plan.tool_name:
            out.append(
                self._chunk(
                    conv,
                    rid,
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
                        conv, rid, {"tool_calls": [{"index": 0, "function": {"arguments": frag}}]}, None
                    )
                )
        for piece in _WORDS.findall(plan.text):
            out.append(self.text_event(conv, rid, piece))
        finish = {"stop": "stop", "length": "length", "tool": "tool_calls"}[plan.finish]
        out.append(self._chunk(conv, rid, {}, finish))
        if usage and conv.include_usage:
            out.append(
                b"data: "
                + _dumps(
                    {
                        "id": rid,
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


class _AnthropicWire(_Wire):
    def ok_headers(self, rid: str) -> dict[str, str]:
        n = next(self.state.counter)
        return {
            "request-id": rid,
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

    def unary(self, conv: _Conv, plan: _Plan, rid: str, usage: bool) -> dict[str, Any]:
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
            "id": rid,
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

    def stream_prefix(self, conv: _Conv, rid: str) -> list[bytes]:
        plan_usage = {"input_tokens": 0, "output_tokens": 1}
        return [
            self._ev(
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": rid,
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

    def text_event(self, conv: _Conv, rid: str, text: str) -> bytes:
        return self._ev(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
        )

    def stream_events(self, conv: _Conv, plan: _Plan, rid: str, usage: bool) -> list[bytes]:
        start_usage = self._usage(plan, 1) if usage else {}
        out = [
            self._ev(
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": rid,
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
                out.append(self.text_event(conv, rid, piece))
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
        self, conv: _Conv, rid: str, parts: list[dict[str, Any]], finish: str | None, usage: Any
    ) -> dict[str, Any]:
        cand: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
        if finish:
            cand["finishReason"] = finish
        out: dict[str, Any] = {"candidates": [cand]}
        if usage is not None:
            out["usageMetadata"] = usage
        out["modelVersion"] = conv.model
        out["responseId"] = rid
        return out

    def unary(self, conv: _Conv, plan: _Plan, rid: str, usage: bool) -> dict[str, Any]:
        parts: list[dict[str, Any]] = []
        if plan.text:
            parts.append({"text": plan.text})
        if plan.tool_name:
            parts.append({"functionCall": {"name": plan.tool_name, "args": {"city": "Paris"}}})
        return self._chunk(
            conv, rid, parts, self._finish(plan), self._usage(plan, plan.output_tokens) if usage else None
        )

    @staticmethod
    def _data(obj: dict[str, Any]) -> bytes:
        return b"data: " + _dumps(obj) + b"\r\n\r\n"

    def text_event(self, conv: _Conv, rid: str, text: str) -> bytes:
        return self._data(self._chunk(conv, rid, [{"text": text}], None, None))

    def stream_events(self, conv: _Conv, plan: _Plan, rid: str, usage: bool) -> list[bytes]:
        out: list[bytes] = []
        if plan.tool_name:
            out.append(
                self._data(
                    self._chunk(
                        conv,
                        rid,
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
                        rid,
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


def _fmt_secs(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


# --------------------------------------------------------------------------- handlers


class _Provider:
    """The request handler of one fake provider."""

    def __init__(self, state: FakeState) -> None:
        self.state = state
        kind = state.kind
        self.wire: _Wire = {
            "openai": _OpenAIWire,
            "anthropic": _AnthropicWire,
            "gemini": _GeminiWire,
        }[kind](state)

    # -- helpers
    def _key(self, request: web.Request) -> str:
        kind = self.state.kind
        if kind == "openai":
            auth = request.headers.get("authorization", "")
            return auth[7:] if auth[:7].lower() == "bearer " else ""
        if kind == "anthropic":
            key = request.headers.get("x-api-key", "")
            if not key:
                auth = request.headers.get("authorization", "")
                key = auth[7:] if auth[:7].lower() == "bearer " else ""
            return key
        return request.headers.get("x-goog-api-key", "") or request.query.get("key", "")

    def _json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
        self.state.by_status[str(status)] = self.state.by_status.get(str(status), 0) + 1
        return web.Response(
            status=status, body=_dumps(body), content_type="application/json", headers=headers
        )

    def _error(self, rule: FaultRule | None, status: int, key: str = "", echo: bool = False) -> web.Response:
        message = rule.message if rule else None
        if echo:
            message = f"Incorrect API key provided: {key}."
        body, headers = self.wire.error_body(
            status, rule.error_type if rule else None, message, rule.retry_after if rule else None
        )
        return self._json(status, body, headers)

    # -- entry points
    async def openai(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, None, None)

    async def anthropic(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, None, None)

    async def gemini(self, request: web.Request) -> web.StreamResponse:
        tail = request.match_info["tail"]
        model, sep, method = tail.rpartition(":")
        if not sep or method not in ("generateContent", "streamGenerateContent"):
            return self._json(404, {"error": {"code": 404, "message": "Not found", "status": "NOT_FOUND"}})
        return await self._handle(request, model, method == "streamGenerateContent")

    async def _handle(
        self, request: web.Request, model: str | None, gstream: bool | None
    ) -> web.StreamResponse:
        state = self.state
        state.bump("requests")
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else {}
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            body = None
        state.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "raw_path": request.raw_path,
                "query": dict(request.query),
                "query_string": request.query_string,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "body": body,
            }
        )
        key = self._key(request)
        if (state.api_key is not None and key != state.api_key) or not key:
            state.bump("auth_failures")
            status, err = self.wire.auth_error(key)
            return self._json(status, err)
        if body is None:
            return self._error(None, 400)
        if state.kind == "openai":
            conv = _conv_openai(body)
        elif state.kind == "anthropic":
            conv = _conv_anthropic(body)
        else:
            problem = gemini_tools_error(body)
            if problem is not None:
                body_, _ = self.wire.error_body(400, "INVALID_ARGUMENT", problem, None)
                return self._json(400, body_)
            conv = _conv_gemini(body, model or "", bool(gstream))
        sse = conv.stream and (state.kind != "gemini" or request.query.get("alt") == "sse")
        if conv.stream:
            state.bump("streams")
        rule = state.pick_fault(conv.model, conv.stream) if state.rules else None
        try:
            delay = state.delay_ms + (rule.delay_ms if rule else 0)
            if delay > 0:
                await asyncio.sleep(delay / 1000.0)
            return await self._respond(request, conv, rule, key, sse)
        except (asyncio.CancelledError, ConnectionResetError):
            state.bump("cancelled_requests")
            if conv.stream:
                state.bump("cancelled_streams")
            raise

    async def _respond(
        self, request: web.Request, conv: _Conv, rule: FaultRule | None, key: str, sse: bool
    ) -> web.StreamResponse:
        state = self.state
        mode = rule.mode if rule else "ok"
        rid = f"fake-{state.kind}-{state.stats.get('requests', 0)}"
        if mode == "error" and rule is not None:
            return self._error(rule, rule.status or 500)
        if mode == "echo_key_error":
            return self._error(rule, (rule.status if rule else None) or 401, key, echo=True)
        if mode == "redirect":
            location = (rule.location if rule else None) or _DEFAULT_REDIRECT
            status = (rule.status if rule else None) or 307
            state.by_status[str(status)] = state.by_status.get(str(status), 0) + 1
            return web.Response(status=status, headers={"location": location})
        if mode == "hang":
            await asyncio.sleep(3600)
            return self._error(rule, 504)
        plan = _plan(conv, state.kind)
        usage = mode != "no_usage"
        interval = ((rule.interval_ms if rule and rule.interval_ms is not None else None) or 0) / 1000.0
        if not conv.stream:
            headers = self.wire.ok_headers(rid)
            if mode == "malformed_json":
                return self._raw(200, b'{"id": "x", "choices": [{"index": 0, "message": {', headers)
            if mode == "truncated_stream":
                full = _dumps(self.wire.unary(conv, plan, rid, usage))
                return self._raw(200, full[: len(full) // 2], headers)
            if mode in ("slow_drip", "endless"):
                return await self._dribble(
                    request, headers, interval or (1.0 if mode == "slow_drip" else 0.01)
                )
            if mode == "stream_error":
                return self._error(rule, (rule.status if rule else None) or 503)
            return self._json(200, self.wire.unary(conv, plan, rid, usage), headers)
        # streaming
        if not sse:  # Gemini streamGenerateContent without alt=sse: a JSON array
            return self._json(
                200, [json.loads(e[6:]) for e in self.wire.stream_events(conv, plan, rid, usage)]
            )
        resp = web.StreamResponse(status=200, headers={**self.wire.sse_headers, **self.wire.ok_headers(rid)})
        state.by_status["200"] = state.by_status.get("200", 0) + 1
        await resp.prepare(request)
        wire = self.wire
        if mode == "malformed_json":
            events = wire.stream_events(conv, plan, rid, usage)
            await resp.write(events[0] + b'data: {"id": "x", "choices": [\n\n' + b"".join(events[1:]))
        elif mode == "truncated_stream":
            events = wire.stream_events(conv, plan, rid, usage)
            await resp.write(b"".join(events[: max(1, len(events) // 2)]))
        elif mode == "stream_error":
            prefix = wire.stream_prefix(conv, rid)
            await resp.write(
                b"".join(prefix)
                + wire.text_event(conv, rid, "partial ")
                + wire.stream_error_event(
                    (rule.status if rule else None) or (529 if state.kind == "anthropic" else 503),
                    rule.error_type if rule else None,
                    rule.message if rule else None,
                )
            )
        elif mode == "slow_drip":
            await resp.write(b"".join(wire.stream_prefix(conv, rid)) or b": start\n\n")
            step = interval or 1.0
            while True:
                await asyncio.sleep(step)
                await resp.write(b":")
        elif mode == "endless":
            for b in wire.stream_prefix(conv, rid):
                await resp.write(b)
            step = interval or 0.01
            event = wire.text_event(conv, rid, "more ")
            while True:
                await resp.write(event)
                await asyncio.sleep(step)
        else:
            events = wire.stream_events(conv, plan, rid, usage)
            chunk_delay = state.chunk_delay_ms / 1000.0
            if chunk_delay > 0:
                for ev in events:
                    await resp.write(ev)
                    await asyncio.sleep(chunk_delay)
            else:
                await resp.write(b"".join(events))
        await resp.write_eof()
        state.bump("completed_streams")
        return resp

    def _raw(self, status: int, body: bytes, headers: dict[str, str]) -> web.Response:
        self.state.by_status[str(status)] = self.state.by_status.get(str(status), 0) + 1
        return web.Response(status=status, body=body, content_type="application/json", headers=headers)

    async def _dribble(
        self, request: web.Request, headers: dict[str, str], step: float
    ) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={**headers, "content-type": "application/json"})
        await resp.prepare(request)
        await resp.write(b"{")
        while True:
            await asyncio.sleep(step)
            await resp.write(b" ")


# --------------------------------------------------------------------------- control API


def _control_routes(state: FakeState) -> list[web.RouteDef]:
    async def set_faults(request: web.Request) -> web.Response:
        try:
            raw = await request.json()
            items = raw if isinstance(raw, list) else [raw]
            rules = [FaultRule.from_json(r) for r in items]
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        state.rules = rules
        return web.json_response({"rules": [asdict(r) for r in rules]})

    async def get_faults(request: web.Request) -> web.Response:
        return web.json_response({"rules": [asdict(r) for r in state.rules]})

    async def clear_faults(request: web.Request) -> web.Response:
        state.rules = []
        return web.json_response({"rules": []})

    async def get_requests(request: web.Request) -> web.Response:
        return web.json_response(list(state.requests))

    async def clear_requests(request: web.Request) -> web.Response:
        state.requests.clear()
        return web.json_response([])

    async def stats(request: web.Request) -> web.Response:
        out: dict[str, Any] = {
            k: state.stats.get(k, 0)
            for k in (
                "requests",
                "streams",
                "completed_streams",
                "cancelled_streams",
                "cancelled_requests",
                "faults_applied",
                "auth_failures",
            )
        }
        out.update({k: v for k, v in state.stats.items() if k not in out})
        out["by_status"] = dict(state.by_status)
        out["kind"] = state.kind
        return web.json_response(out)

    async def reset_stats(request: web.Request) -> web.Response:
        state.stats.clear()
        state.by_status.clear()
        return web.json_response({})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "kind": state.kind})

    return [
        web.post("/_fake/faults", set_faults),
        web.get("/_fake/faults", get_faults),
        web.delete("/_fake/faults", clear_faults),
        web.get("/_fake/requests", get_requests),
        web.delete("/_fake/requests", clear_requests),
        web.get("/_fake/stats", stats),
        web.delete("/_fake/stats", reset_stats),
        web.get("/healthz", healthz),
    ]


def build_app(
    kind: str,
    *,
    api_key: str | None = None,
    delay_ms: int = 0,
    chunk_delay_ms: int = 0,
    faults: Iterable[FaultRule] = (),
) -> web.Application:
    """Build the aiohttp application of a fake provider (``openai_compatible`` = ``openai``)."""
    if kind == "openai_compatible":
        kind = "openai"
    if kind not in KINDS:
        raise ValueError(f"unknown fake kind {kind!r}")
    state = FakeState(kind=kind, api_key=api_key, delay_ms=delay_ms, chunk_delay_ms=chunk_delay_ms)
    state.rules = list(faults)
    provider = _Provider(state)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATE_KEY] = state
    routes = _control_routes(state)
    if kind == "openai":
        routes.append(web.post("/v1/chat/completions", provider.openai))
    elif kind == "anthropic":
        routes.append(web.post("/v1/messages", provider.anthropic))
    else:
        routes.append(web.post("/v1beta/models/{tail}", provider.gemini))
    app.add_routes(routes)
    return app


# --------------------------------------------------------------------------- in-process handle


@dataclass
class FakeHandle:
    """A fake provider running in the current event loop."""

    kind: str
    host: str
    port: int
    app: web.Application
    _runner: web.AppRunner

    @property
    def base_url(self) -> str:
        """Base URL as the adapter for ``kind`` expects it."""
        return base_url_for(self.kind, self.host, self.port)

    @property
    def root_url(self) -> str:
        """``http://host:port`` (control API lives here)."""
        return f"http://{self.host}:{self.port}"

    @property
    def state(self) -> FakeState:
        """Direct access to the fake's state (rules, recorded requests, stats)."""
        return self.app[STATE_KEY]

    async def close(self) -> None:
        """Stop the server."""
        await self._runner.cleanup()


async def start_fake(
    kind: str,
    *,
    api_key: str | None = None,
    delay_ms: int = 0,
    host: str = "127.0.0.1",
    port: int = 0,
    chunk_delay_ms: int = 0,
    faults: Iterable[FaultRule] = (),
) -> FakeHandle:
    """Start a fake provider in this event loop; ``port=0`` picks a free port."""
    app = build_app(kind, api_key=api_key, delay_ms=delay_ms, chunk_delay_ms=chunk_delay_ms, faults=faults)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    site = web.SockSite(runner, sock, backlog=2048)
    await site.start()
    bound = sock.getsockname()[1]
    return FakeHandle(kind=kind, host=host, port=bound, app=app, _runner=runner)


async def run_forever(handle_factory: Callable[[], Awaitable[FakeHandle]], stop: asyncio.Event) -> None:
    """Start a fake and keep it up until ``stop`` is set."""
    handle = await handle_factory()
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await handle.close()


# --------------------------------------------------------------------------- subprocess helper


class FakeProcess:
    """A fake provider in a child process (``python -m services.fakes``), for e2e tests."""

    def __init__(
        self, kind: str, host: str, port: int, proc: subprocess.Popen[bytes], port_file: Path
    ) -> None:
        self.kind = kind
        self.host = host
        self.port = port
        self.proc = proc
        self._port_file = port_file

    @property
    def base_url(self) -> str:
        """Base URL as the adapter for ``kind`` expects it."""
        return base_url_for(self.kind, self.host, self.port)

    @property
    def root_url(self) -> str:
        """``http://host:port`` (control API lives here)."""
        return f"http://{self.host}:{self.port}"

    @classmethod
    def start(
        cls,
        kind: str,
        *,
        api_key: str | None = None,
        delay_ms: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: list[dict[str, Any]] | None = None,
        startup_timeout_s: float = 15.0,
        python: str | None = None,
    ) -> FakeProcess:
        """Spawn the fake and wait until it is listening and healthy."""
        fd, name = tempfile.mkstemp(prefix="igw-fake-", suffix=".port")
        os.close(fd)
        port_file = Path(name)
        port_file.unlink()
        root = Path(__file__).resolve().parents[2]
        cmd = [
            python or sys.executable,
            "-m",
            "services.fakes",
            "--kind",
            kind,
            "--host",
            host,
            "--port",
            str(port),
            "--delay-ms",
            str(delay_ms),
            "--port-file",
            str(port_file),
        ]
        if faults:
            cmd += ["--fault", json.dumps(faults)]
        env = dict(os.environ)
        env.pop("IGW_FAKE_API_KEY", None)
        if api_key is not None:
            env["IGW_FAKE_API_KEY"] = api_key  # not on the command line, where `ps` would show it
        env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        proc = subprocess.Popen(cmd, cwd=str(root), env=env, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + startup_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"fake {kind} exited with {proc.returncode}")
            if port_file.exists():
                text = port_file.read_text().strip()
                if text:
                    handle = cls(kind, host, int(text), proc, port_file)
                    if handle._healthy():
                        return handle
            time.sleep(0.02)
        proc.kill()
        proc.wait()
        raise TimeoutError(f"fake {kind} did not start")

    def _healthy(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as conn:
                conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                return conn.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate the child (SIGTERM, then SIGKILL)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(OSError):
            self._port_file.unlink()

    def __enter__(self) -> FakeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

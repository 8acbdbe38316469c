"""What a fake provider answers: the conversation it read and the reply it plans."""


from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from .common import _ANTHROPIC_TOOL_PREFACE, _TOOL_ARGS, _WORDS, _words

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

"""Provider adapters against the fake providers over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import socket
import time
import traceback
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import httpx
import pytest

from igw.router.v1 import router_pb2
from igw_dev.fakes import FakeHandle, start_fake
from services.router.providers import (
    ChatRequest,
    ContentPart,
    ErrorKind,
    FinishReason,
    Message,
    ProviderError,
    StreamEnd,
    StreamEvent,
    TextDelta,
    Timeouts,
    ToolCall,
    ToolCallDelta,
    ToolDef,
    UsageSoFar,
    get_adapter,
    make_http_client,
)
from services.router.providers.base import estimate_tokens
from services.router.routing import Limits
from services.router.translate import prepare

pytestmark = pytest.mark.asyncio

KINDS = ["openai", "openai_compatible", "anthropic", "gemini"]
FAST = Timeouts(connect_s=2.0, first_byte_s=5.0, idle_s=5.0, total_s=10.0)
SECRET = "sk-test-key"
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = ToolDef("get_weather", "Current weather for a city", json.dumps(WEATHER_SCHEMA))


def _text(role: str, text: str) -> Message:
    return Message(role, (ContentPart("text", text=text),))  # type: ignore[arg-type]


def simple_request(
    text: str = "hello there world", *, tools: tuple[ToolDef, ...] = (), model: str = "model-1", max_out: int = 100
) -> ChatRequest:
    return ChatRequest(
        model=model,
        messages=(_text("system", "be nice"), _text("user", text)),
        max_output_tokens=max_out,
        tools=tools,
    )


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    c = make_http_client(max_connections=64)
    try:
        yield c
    finally:
        await c.aclose()


@pytest.fixture
async def ctl() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5.0) as c:
        yield c


@contextlib.asynccontextmanager
async def running_fake(kind: str, **kwargs: Any) -> AsyncIterator[FakeHandle]:
    fk = await start_fake("openai" if kind == "openai_compatible" else kind, **kwargs)
    fk.kind = kind  # base_url as this adapter kind expects it
    try:
        yield fk
    finally:
        await fk.close()


async def set_faults(ctl: httpx.AsyncClient, fk: FakeHandle, *rules: dict[str, Any]) -> None:
    r = await ctl.post(f"{fk.root_url}/_fake/faults", json=list(rules))
    assert r.status_code == 200, r.text


async def recorded(ctl: httpx.AsyncClient, fk: FakeHandle) -> list[dict[str, Any]]:
    r = await ctl.get(f"{fk.root_url}/_fake/requests")
    assert r.status_code == 200
    data: list[dict[str, Any]] = r.json()
    return data


async def stats(ctl: httpx.AsyncClient, fk: FakeHandle) -> dict[str, Any]:
    r = await ctl.get(f"{fk.root_url}/_fake/stats")
    data: dict[str, Any] = r.json()
    return data


async def collect(agen: AsyncIterator[StreamEvent]) -> list[StreamEvent]:
    return [e async for e in agen]


def assemble_tools(events: list[StreamEvent]) -> dict[int, dict[str, str]]:
    calls: dict[int, dict[str, str]] = {}
    for e in events:
        if isinstance(e, ToolCallDelta):
            if e.index not in calls:
                assert e.id and e.name, "first delta of a tool call carries id and name"
                calls[e.index] = {"id": e.id, "name": e.name, "args": ""}
            else:
                assert e.id == "" and e.name == ""
            calls[e.index]["args"] += e.arguments_fragment
    return calls


async def expect_error(coro: Any) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        await coro
    return info.value


# --------------------------------------------------------------------------- happy paths


# A schema as agents write it (pydantic, zod): $defs/$ref, anyOf with null, additionalProperties.
FULL_JSON_SCHEMA = {
    "type": "object",
    "$defs": {"Unit": {"type": "string", "enum": ["c", "f"]}},
    "properties": {
        "city": {"type": "string"},
        "unit": {"anyOf": [{"$ref": "#/$defs/Unit"}, {"type": "null"}]},
    },
    "required": ["city"],
    "additionalProperties": False,
}


async def test_gemini_tools_go_out_as_parameters_json_schema_unchanged(
    client: httpx.AsyncClient, ctl: httpx.AsyncClient
) -> None:
    """Gemini's `parameters` takes an OpenAPI subset; full JSON Schema belongs in
    `parametersJsonSchema` (FunctionDeclaration, Gemini API reference). The fake refuses
    JSON-Schema-only keywords under `parameters`, as the API does."""
    tool = ToolDef("get_weather", "Current weather for a city", json.dumps(FULL_JSON_SCHEMA))
    req = simple_request("what is the weather in Paris?", tools=(tool,))
    async with running_fake("gemini") as fk:
        resp = await get_adapter("gemini").complete(client, fk.base_url, SECRET, req, FAST)
        events = await collect(get_adapter("gemini").stream(client, fk.base_url, SECRET, req, FAST))
        reqs = await recorded(ctl, fk)
        # The fake's check is real: the old wire shape is refused.
        old = dict(reqs[0]["body"])
        old["tools"] = [{"functionDeclarations": [{"name": "get_weather", "parameters": FULL_JSON_SCHEMA}]}]
        refused = await ctl.post(f"{fk.base_url}/v1beta/models/model-1:generateContent", json=old,
                                 headers={"x-goog-api-key": SECRET})
    assert refused.status_code == 400 and "Unknown name" in refused.text
    assert resp.tool_calls[0].name == "get_weather"
    assert assemble_tools(events)[0]["name"] == "get_weather"
    for r in reqs:
        (decl,) = r["body"]["tools"][0]["functionDeclarations"]
        assert "parameters" not in decl
        assert decl["parametersJsonSchema"] == FULL_JSON_SCHEMA


@pytest.mark.parametrize("kind", KINDS)
async def test_temperature_and_top_p_reach_the_provider_exactly(
    kind: str, client: httpx.AsyncClient, ctl: httpx.AsyncClient
) -> None:
    """0.7 stays 0.7 on its way from the agent's request bytes to the provider's JSON (the
    contract's fields are doubles; a float32 arrived as 0.699999988)."""
    agent = router_pb2.GenerateRequest(model="m", max_output_tokens=100, temperature=0.7, top_p=0.95)
    agent.messages.add(role=router_pb2.ROLE_USER).parts.add(text="hello there world")
    wire = router_pb2.GenerateRequest.FromString(agent.SerializeToString())
    req = replace(prepare(wire, Limits()).chat, model="model-1")
    async with running_fake(kind) as fk:
        await get_adapter(kind).complete(client, fk.base_url, SECRET, req, FAST)
        (sent,) = await recorded(ctl, fk)
    body = sent["body"]
    got = (body["generationConfig"]["temperature"], body["generationConfig"]["topP"]) if kind == "gemini" else (
        body["temperature"], body["top_p"])
    assert got == (0.7, 0.95)


@pytest.mark.parametrize("kind", KINDS)
async def test_unary_text(kind: str, client: httpx.AsyncClient) -> None:
    async with running_fake(kind) as fk:
        resp = await get_adapter(kind).complete(client, fk.base_url, SECRET, simple_request(), FAST)
    assert resp.text == "echo: hello there world"
    assert resp.tool_calls == ()
    assert resp.finish_reason is FinishReason.STOP
    # input = words("be nice") + words("hello there world"); cached = all but the last message
    assert (resp.usage.input_tokens, resp.usage.output_tokens, resp.usage.cached_input_tokens) == (5, 4, 2)
    assert resp.usage.reported is True
    assert resp.response_id.startswith("fake-")


@pytest.mark.parametrize("kind", KINDS)
async def test_unary_length_limit(kind: str, client: httpx.AsyncClient) -> None:
    async with running_fake(kind) as fk:
        resp = await get_adapter(kind).complete(client, fk.base_url, SECRET, simple_request(max_out=2), FAST)
    assert resp.text == "echo: hello"
    assert resp.finish_reason is FinishReason.LENGTH
    assert resp.usage.output_tokens == 2


@pytest.mark.parametrize("kind", KINDS)
async def test_unary_tool_call(kind: str, client: httpx.AsyncClient) -> None:
    req = simple_request("what is the weather in Paris?", tools=(WEATHER,))
    async with running_fake(kind) as fk:
        resp = await get_adapter(kind).complete(client, fk.base_url, SECRET, req, FAST)
    assert resp.finish_reason is FinishReason.TOOL_CALLS
    assert len(resp.tool_calls) == 1
    call = resp.tool_calls[0]
    assert call.name == "get_weather"
    assert call.id
    assert json.loads(call.arguments_json) == {"city": "Paris"}
    assert resp.text == ("Let me check." if kind == "anthropic" else "")
    if kind == "gemini":
        assert call.id == "call_0"


@pytest.mark.parametrize("kind", KINDS)
async def test_stream_text(kind: str, client: httpx.AsyncClient, ctl: httpx.AsyncClient) -> None:
    adapter = get_adapter(kind)
    async with running_fake(kind) as fk:
        unary = await adapter.complete(client, fk.base_url, SECRET, simple_request(), FAST)
        events = await collect(adapter.stream(client, fk.base_url, SECRET, simple_request(), FAST))
        st = await stats(ctl, fk)
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert len(deltas) > 1
    assert "".join(d.text for d in deltas) == unary.text == "echo: hello there world"
    end = events[-1]
    assert isinstance(end, StreamEnd)
    assert sum(isinstance(e, StreamEnd) for e in events) == 1
    assert end.finish_reason is FinishReason.STOP
    assert end.usage == unary.usage  # running totals are not summed
    assert st["completed_streams"] == 1 and st["cancelled_streams"] == 0


@pytest.mark.parametrize("kind", KINDS)
async def test_stream_tool_call(kind: str, client: httpx.AsyncClient) -> None:
    req = simple_request("weather please", tools=(WEATHER,))
    async with running_fake(kind) as fk:
        events = await collect(get_adapter(kind).stream(client, fk.base_url, SECRET, req, FAST))
    calls = assemble_tools(events)
    assert list(calls) == [0]
    assert calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["args"]) == {"city": "Paris"}
    if kind != "gemini":  # Gemini sends a function call whole; the others in fragments
        assert sum(isinstance(e, ToolCallDelta) and e.arguments_fragment != "" for e in events) >= 2
    end = events[-1]
    assert isinstance(end, StreamEnd) and end.finish_reason is FinishReason.TOOL_CALLS
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert text == ("Let me check." if kind == "anthropic" else "")


async def test_openai_compatible_counts_tokens_when_no_usage(client: httpx.AsyncClient, ctl: httpx.AsyncClient) -> None:
    adapter = get_adapter("openai_compatible")
    async with running_fake("openai_compatible") as fk:
        await set_faults(ctl, fk, {"mode": "no_usage"})
        resp = await adapter.complete(client, fk.base_url, SECRET, simple_request(), FAST)
        events = await collect(adapter.stream(client, fk.base_url, SECRET, simple_request(), FAST))
    # "be nice" + "hello there world" = 24 chars -> 6; "echo: hello there world" = 23 chars -> 6
    assert resp.usage.reported is False
    assert (resp.usage.input_tokens, resp.usage.output_tokens) == (6, 6)
    end = events[-1]
    assert isinstance(end, StreamEnd)
    assert end.usage.reported is False
    assert (end.usage.input_tokens, end.usage.output_tokens) == (6, 6)


@pytest.mark.parametrize("kind", ["anthropic", "gemini"])
async def test_anthropic_and_gemini_count_tokens_when_no_usage(
    kind: str, client: httpx.AsyncClient, ctl: httpx.AsyncClient
) -> None:
    adapter = get_adapter(kind)
    async with running_fake(kind) as fk:
        await set_faults(ctl, fk, {"mode": "no_usage"})
        resp = await adapter.complete(client, fk.base_url, SECRET, simple_request(), FAST)
        events = await collect(adapter.stream(client, fk.base_url, SECRET, simple_request(), FAST))
        assert (await stats(ctl, fk))["faults_applied"] == 2  # both answers really came without usage
    # Estimated exactly as for OpenAI-compatible servers: ceil(chars / 4) of the prompt and the reply.
    assert resp.text == "echo: hello there world" and resp.finish_reason is FinishReason.STOP
    assert resp.usage.reported is False
    assert (resp.usage.input_tokens, resp.usage.output_tokens, resp.usage.cached_input_tokens) == (6, 6, 0)
    end = events[-1]
    assert isinstance(end, StreamEnd) and end.finish_reason is FinishReason.STOP
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "echo: hello there world"
    assert end.usage == resp.usage


@pytest.mark.parametrize("kind", KINDS)
async def test_tool_call_arguments_count_as_output_when_no_usage(
    kind: str, client: httpx.AsyncClient, ctl: httpx.AsyncClient
) -> None:
    adapter = get_adapter(kind)
    req = simple_request("weather please", tools=(WEATHER,))
    async with running_fake(kind) as fk:
        await set_faults(ctl, fk, {"mode": "no_usage"})
        resp = await adapter.complete(client, fk.base_url, SECRET, req, FAST)
        events = await collect(adapter.stream(client, fk.base_url, SECRET, req, FAST))
    unary_out = resp.text + "".join(c.arguments_json for c in resp.tool_calls)
    assert resp.usage.reported is False and resp.usage.output_tokens == estimate_tokens(unary_out) > 0
    streamed = "".join(e.text if isinstance(e, TextDelta) else e.arguments_fragment
                       for e in events if isinstance(e, TextDelta | ToolCallDelta))
    end = events[-1]
    assert isinstance(end, StreamEnd) and end.finish_reason is FinishReason.TOOL_CALLS
    assert end.usage.reported is False and end.usage.output_tokens == estimate_tokens(streamed) > 0
    assert end.usage.input_tokens == resp.usage.input_tokens > 0


# --------------------------------------------------------------------------- request translation


def conversation(kind: str) -> ChatRequest:
    png = b"\x89PNG\r\n\x1a\nfake"
    return ChatRequest(
        model="model-1",
        messages=(
            _text("system", "be nice"),
            Message(
                "user",
                (
                    ContentPart("text", text="look at these"),
                    ContentPart("image_url", url="https://example.com/cat.png", mime_type="image/png"),
                    ContentPart("image_bytes", data=png, mime_type="image/png"),
                ),
            ),
            Message(
                "assistant",
                (),
                tool_calls=(ToolCall("call_A", "get_weather", '{"city": "Paris"}'),),
            ),
            Message("tool", (ContentPart("text", text='{"temp_c": 21}'),), tool_call_id="call_A"),
        ),
        max_output_tokens=64,
        tools=(WEATHER,),
        tool_choice="auto",
        temperature=0.5,
        top_p=0.9,
        stop=("END",),
    )


ALLOWED_HEADERS = {
    "host",
    "content-type",
    "content-length",
    "accept",
    "accept-encoding",
    "connection",
    "user-agent",
    "authorization",
    "x-api-key",
    "anthropic-version",
    "x-goog-api-key",
}


@pytest.mark.parametrize("kind", KINDS)
async def test_request_body_as_documented(kind: str, client: httpx.AsyncClient, ctl: httpx.AsyncClient) -> None:
    adapter = get_adapter(kind)
    req = conversation(kind)
    png_b64 = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()
    schema = WEATHER_SCHEMA
    async with running_fake(kind) as fk:
        resp = await adapter.complete(client, fk.base_url, SECRET, req, FAST)
        events = await collect(adapter.stream(client, fk.base_url, SECRET, req, FAST))
        reqs = await recorded(ctl, fk)
    # the fake saw the tool result at the end of the conversation
    assert resp.text.startswith("tool said: ")
    assert "temp_c" in resp.text and "21" in resp.text
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == resp.text
    assert len(reqs) == 2
    unary, streamed = reqs
    for r in reqs:
        assert r["method"] == "POST"
        assert set(r["headers"]) <= ALLOWED_HEADERS, set(r["headers"]) - ALLOWED_HEADERS
        assert r["headers"]["user-agent"] == "igw/0.1"
        assert r["headers"]["content-type"] == "application/json"
    ub, sb = unary["body"], streamed["body"]
    if kind in ("openai", "openai_compatible"):
        assert unary["path"] == streamed["path"] == "/v1/chat/completions"
        assert unary["headers"]["authorization"] == f"Bearer {SECRET}"
        max_field = "max_completion_tokens" if kind == "openai" else "max_tokens"
        other = "max_tokens" if kind == "openai" else "max_completion_tokens"
        assert ub[max_field] == 64 and other not in ub
        assert ub["messages"] == [
            {"role": "system", "content": "be nice"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look at these"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png_b64}"}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_A",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_A", "content": '{"temp_c": 21}'},
        ]
        assert ub["tools"] == [
            {
                "type": "function",
                "function": {"name": "get_weather", "description": WEATHER.description, "parameters": schema},
            }
        ]
        assert ub["tool_choice"] == "auto"
        assert (ub["temperature"], ub["top_p"], ub["stop"]) == (0.5, 0.9, ["END"])
        assert "stream" not in ub
        assert sb["stream"] is True and sb["stream_options"] == {"include_usage": True}
    elif kind == "anthropic":
        assert unary["path"] == "/v1/messages"
        assert unary["headers"]["x-api-key"] == SECRET
        assert unary["headers"]["anthropic-version"] == "2023-06-01"
        assert "authorization" not in unary["headers"]
        assert ub["system"] == "be nice"
        assert all(m["role"] != "system" for m in ub["messages"])
        assert ub["max_tokens"] == 64
        assert ub["messages"] == [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look at these"},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png_b64}},
                ],
            },
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "call_A", "name": "get_weather", "input": {"city": "Paris"}}],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "call_A", "content": '{"temp_c": 21}'}],
            },
        ]
        assert ub["tools"] == [{"name": "get_weather", "description": WEATHER.description, "input_schema": schema}]
        assert ub["tool_choice"] == {"type": "auto"}
        assert (ub["temperature"], ub["top_p"], ub["stop_sequences"]) == (0.5, 0.9, ["END"])
        assert sb["stream"] is True
    else:
        assert unary["path"] == "/v1beta/models/model-1:generateContent"
        assert streamed["path"] == "/v1beta/models/model-1:streamGenerateContent"
        assert unary["query"] == {} and unary["query_string"] == ""
        assert streamed["query"] == {"alt": "sse"}
        for r in reqs:
            assert r["headers"]["x-goog-api-key"] == SECRET
            assert "key" not in r["query"] and SECRET not in r["raw_path"] and SECRET not in r["query_string"]
            assert "authorization" not in r["headers"]
        assert ub["systemInstruction"] == {"parts": [{"text": "be nice"}]}
        assert ub["contents"] == [
            {
                "role": "user",
                "parts": [
                    {"text": "look at these"},
                    {"fileData": {"fileUri": "https://example.com/cat.png", "mimeType": "image/png"}},
                    {"inlineData": {"mimeType": "image/png", "data": png_b64}},
                ],
            },
            {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]},
            {
                "role": "user",
                "parts": [{"functionResponse": {"name": "get_weather", "response": {"temp_c": 21}}}],
            },
        ]
        assert ub["tools"] == [
            {
                "functionDeclarations": [
                    {"name": "get_weather", "description": WEATHER.description, "parametersJsonSchema": schema}
                ]
            }
        ]
        assert ub["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}
        assert ub["generationConfig"] == {
            "maxOutputTokens": 64,
            "temperature": 0.5,
            "topP": 0.9,
            "stopSequences": ["END"],
        }
        assert ub == sb


# --------------------------------------------------------------------------- error mapping

ERROR_CASES: list[tuple[str, dict[str, Any], ErrorKind, float | None]] = [
    ("openai", {"status": 429, "retry_after": 2}, ErrorKind.RATE_LIMITED, 2.0),
    ("openai", {"status": 400, "error_type": "context_length_exceeded"}, ErrorKind.CONTEXT_TOO_LONG, None),
    ("openai", {"status": 400, "error_type": "content_policy_violation"}, ErrorKind.CONTENT_REFUSED, None),
    ("openai", {"status": 400}, ErrorKind.BAD_REQUEST, None),
    ("openai", {"status": 404}, ErrorKind.BAD_REQUEST, None),
    ("openai", {"status": 422}, ErrorKind.BAD_REQUEST, None),
    ("openai", {"status": 401}, ErrorKind.AUTH_FAILED, None),
    ("openai", {"status": 403}, ErrorKind.AUTH_FAILED, None),
    ("openai", {"status": 500}, ErrorKind.SERVER_ERROR, None),
    ("openai", {"status": 502}, ErrorKind.SERVER_ERROR, None),
    ("openai", {"status": 504}, ErrorKind.SERVER_ERROR, None),
    ("openai", {"status": 503}, ErrorKind.OVERLOADED, None),
    ("openai_compatible", {"status": 429, "retry_after": 1.5}, ErrorKind.RATE_LIMITED, 1.5),
    ("anthropic", {"status": 429, "retry_after": 3}, ErrorKind.RATE_LIMITED, 3.0),
    ("anthropic", {"status": 529}, ErrorKind.OVERLOADED, None),
    (
        "anthropic",
        {"status": 400, "message": "prompt is too long: 210000 tokens > 200000 maximum"},
        ErrorKind.CONTEXT_TOO_LONG,
        None,
    ),
    ("anthropic", {"status": 400}, ErrorKind.BAD_REQUEST, None),
    ("anthropic", {"status": 401}, ErrorKind.AUTH_FAILED, None),
    ("anthropic", {"status": 403}, ErrorKind.AUTH_FAILED, None),
    ("anthropic", {"status": 500}, ErrorKind.SERVER_ERROR, None),
    ("gemini", {"status": 429, "retry_after": 5}, ErrorKind.RATE_LIMITED, 5.0),
    ("gemini", {"status": 503}, ErrorKind.OVERLOADED, None),
    (
        "gemini",
        {"status": 400, "message": "The input token count (2000000) exceeds the maximum number of tokens allowed."},
        ErrorKind.CONTEXT_TOO_LONG,
        None,
    ),
    ("gemini", {"status": 400}, ErrorKind.BAD_REQUEST, None),
    ("gemini", {"status": 403}, ErrorKind.AUTH_FAILED, None),
    ("gemini", {"status": 401}, ErrorKind.AUTH_FAILED, None),
    ("gemini", {"status": 500}, ErrorKind.SERVER_ERROR, None),
]


@pytest.mark.parametrize(("kind", "rule", "expected", "retry"), ERROR_CASES)
async def test_error_mapping(
    kind: str,
    rule: dict[str, Any],
    expected: ErrorKind,
    retry: float | None,
    client: httpx.AsyncClient,
    ctl: httpx.AsyncClient,
) -> None:
    adapter = get_adapter(kind)
    async with running_fake(kind) as fk:
        await set_faults(ctl, fk, {"mode": "error", **rule})
        err = await expect_error(adapter.complete(client, fk.base_url, SECRET, simple_request(), FAST))
        serr = await expect_error(collect(adapter.stream(client, fk.base_url, SECRET, simple_request(), FAST)))
    for e in (err, serr):
        assert e.kind is expected, str(e)
        assert e.status_code == rule["status"]
        assert e.retry_after_s == retry
        assert str(e) == e.summary
        assert str(e).startswith(f"{kind}: HTTP {rule['status']}")
        assert e.retryable is (expected in (ErrorKind.RATE_LIMITED, ErrorKind.OVERLOADED, ErrorKind.SERVER_ERROR))
        if "message" in rule:
            assert rule["message"] not in str(e)


@pytest.mark.parametrize("kind", KINDS)
async def test_wrong_key_is_auth_failed(kind: str, client: httpx.AsyncClient) -> None:
    async with running_fake(kind, api_key="the-right-key") as fk:
        err = await expect_error(get_adapter(kind).complete(client, fk.base_url, "wrong-key", simple_request(), FAST))
        ok = await get_adapter(kind).complete(client, fk.base_url, "the-right-key", simple_request(), FAST)
    assert err.kind is ErrorKind.AUTH_FAILED
    assert not err.retryable
    assert ok.text == "echo: hello there world"


@pytest.mark.parametrize("kind", KINDS)
async def test_stream_error_event_inside_200(kind: str, client: httpx.AsyncClient, ctl: httpx.AsyncClient) -> None:
    expected = {
        "openai": ErrorKind.RATE_LIMITED,
        "openai_compatible": ErrorKind.RATE_LIMITED,
        "anthropic": ErrorKind.OVERLOADED,
        "gemini": ErrorKind.OVERLOADED,
    }[kind]
    rule: dict[str, Any] = {"mode": "stream_error"}
    if kind.startswith("openai"):
        rule["error_type"] = "rate_limit_exceeded"
    got: list[StreamEvent] = []
    async with running_fake(kind) as fk:
        await set_faults(ctl, fk, rule)
        with pytest.raises(ProviderError) as info:
            async for ev in get_adapter(kind).stream(client, fk.base_url, SECRET, simple_request(), FAST):
                got.append(ev)
    assert info.value.kind is expected
    assert "stream error" in str(info.value)
    assert [e for e in got if isinstance(e, TextDelta)] == [TextDelta("partial ")]
    assert not any(isinstance(e, StreamEnd) for e in got)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["malformed_json", "truncated_stream"])
async def test_garbage_is_protocol_error(
    kind: str, mode: str, client: httpx.AsyncClient, ctl: httpx.AsyncClient
) -> None:
    adapter = get_adapter(kind)
    async with running_fake(kind) as fk:
        await set_faults(ctl, fk, {"mode": mode})
        err = await expect_error(adapter.complete(client, fk.base_url, SECRET, simple_request(), FAST))
        serr = await expect_error(collect(adapter.stream(client, fk.base_url, SECRET, simple_request(), FAST)))
    assert err.kind is ErrorKind.PROTOCOL_ERROR
    assert serr.kind is ErrorKind.PROTOCOL_ERROR
    assert err.retryable


@pytest.mark.parametrize("kind", KINDS)
async def test_redirect_refused_and_target_untouched(
    kind: str, client: httpx.AsyncClient, ctl: httpx.AsyncClient
) -> None:
    adapter = get_adapter(kind)
    async with running_fake(kind) as fk, running_fake(kind) as target:
        path = {
            "openai": "/v1/chat/completions",
            "openai_compatible": "/v1/chat/completions",
            "anthropic": "/v1/messages",
            "gemini": "/v1beta/models/model-1:generateContent",
        }[kind]
        for status in (302, 307):
            await set_faults(ctl, fk, {"mode": "redirect", "status": status, "location": target.root_url + path})
            err = await expect_error(adapter.complete(client, fk.base_url, SECRET, simple_request(), FAST))
            serr = await expect_error(collect(adapter.stream(client, fk.base_url, SECRET, simple_request(), FAST)))
            for e in (err, serr):
                assert e.kind is ErrorKind.REDIRECT_REFUSED
                assert e.status_code == status
                assert not e.retryable
        assert await recorded(ctl, target) == []
        assert (await stats(ctl, target))["requests"] == 0


@pytest.mark.parametrize("kind", KINDS)
async def test_first_byte_timeout_on_hang(kind: str, client: httpx.AsyncClient, ctl: httpx.AsyncClient) -> None:
    adapter = get_adapter(kind)
    t = Timeouts(connect_s=2.0, first_byte_s=0.3, idle_s=5.0, total_s=10.0)
    async with running_fake(kind) as fk:
        await set_faults(ctl, fk, {"mode": "hang"})
        t0 = time.monotonic()
        err = await expect_error(adapter.complete(client, fk.base_url, SECRET, simple_request(), t))
        serr = await expect_error(collect(adapter.stream(client, fk.base_url, SECRET, simple_request(), t)))
        elapsed = time.monotonic() - t0
    for e in (err, serr):
        assert e.kind is ErrorKind.TIMEOUT
        assert "first_byte timeout" in str(e)
    assert elapsed < 2.0


@pytest.mark.parametrize("kind", KINDS)
async def test_idle_timeout_on_slow_drip(kind: str, client: httpx.AsyncClient, ctl: httpx.AsyncClient) -> None:
    adapter = get_adapter(kind)
    t = Timeouts(connect_s=2.0, first_byte_s=2.0, idle_s=0.3, total_s=10.0)
    async with running_fake(kind) as fk:
        await set_faults(ctl, fk, {"mode": "slow_drip", "interval_ms": 1500})
        t0 = time.monotonic()
        err = await expect_error(adapter.complete(client, fk.base_url, SECRET, simple_request(), t))
        serr = await expect_error(collect(adapter.stream(client, fk.base_url, SECRET, simple_request(), t)))
        elapsed = time.monotonic() - t0
    for e in (err, serr):
        assert e.kind is ErrorKind.TIMEOUT
        assert "idle timeout" in str(e)
    assert elapsed < 2.5


@pytest.mark.parametrize("kind", KINDS)
async def test_total_timeout_on_endless(kind: str, client: httpx.AsyncClient, ctl: httpx.AsyncClient) -> None:
    adapter = get_adapter(kind)
    t = Timeouts(connect_s=2.0, first_byte_s=2.0, idle_s=0.5, total_s=0.8)
    got: list[StreamEvent] = []
    async with running_fake(kind) as fk:
        await set_faults(ctl, fk, {"mode": "endless", "interval_ms": 10})
        t0 = time.monotonic()
        err = await expect_error(adapter.complete(client, fk.base_url, SECRET, simple_request(), t))
        with pytest.raises(ProviderError) as info:
            async for ev in adapter.stream(client, fk.base_url, SECRET, simple_request(), t):
                got.append(ev)
        elapsed = time.monotonic() - t0
    for e in (err, info.value):
        assert e.kind is ErrorKind.TIMEOUT
        assert "total timeout" in str(e)
    assert len([e for e in got if isinstance(e, TextDelta)]) > 5
    assert elapsed < 3.0


async def wait_for_cancelled(ctl: httpx.AsyncClient, fk: FakeHandle, n: int, within_s: float = 1.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < within_s:
        if (await stats(ctl, fk))["cancelled_streams"] >= n:
            return time.monotonic() - t0
        await asyncio.sleep(0.02)
    raise AssertionError(f"fake did not record {n} cancelled stream(s) within {within_s}s")


@pytest.mark.parametrize("kind", ["anthropic", "gemini"])
async def test_a_stream_reports_the_providers_input_count_before_it_ends(
    kind: str, client: httpx.AsyncClient, ctl: httpx.AsyncClient,
) -> None:
    """Anthropic's message_start and Gemini's per-chunk usageMetadata carry the input count: it is
    passed on at once (UsageSoFar), so a stream cut before its end is charged with it."""
    adapter = get_adapter(kind)
    async with running_fake(kind) as fk:
        unary = await adapter.complete(client, fk.base_url, SECRET, simple_request(), FAST)
        events = await collect(adapter.stream(client, fk.base_url, SECRET, simple_request(), FAST))
    first_text = next(i for i, e in enumerate(events) if isinstance(e, TextDelta))
    early = [e for e in events[:first_text + 1] if isinstance(e, UsageSoFar)]
    assert early, "no usage reported before the first text"
    assert early[0].usage.input_tokens == unary.usage.input_tokens > 0
    reports = [e for e in events if isinstance(e, UsageSoFar)]
    end = events[-1]
    assert isinstance(end, StreamEnd) and reports[-1].usage == end.usage  # running totals, the last is final


@pytest.mark.parametrize("kind", KINDS)
async def test_closing_stream_cancels_upstream(kind: str, client: httpx.AsyncClient, ctl: httpx.AsyncClient) -> None:
    adapter = get_adapter(kind)
    async with running_fake(kind) as fk:
        await set_faults(ctl, fk, {"mode": "endless", "interval_ms": 20})
        agen = adapter.stream(client, fk.base_url, SECRET, simple_request(), FAST)
        first = [await agen.__anext__(), await agen.__anext__()]
        while any(isinstance(e, UsageSoFar) for e in first):  # usage reports come before/between text
            first = [e for e in first if not isinstance(e, UsageSoFar)] + [await agen.__anext__()]
        assert all(isinstance(e, TextDelta) for e in first)
        await agen.aclose()  # type: ignore[attr-defined]
        await wait_for_cancelled(ctl, fk, 1)

        # cancel while waiting for the first byte (TTFT)
        await set_faults(ctl, fk, {"mode": "hang"})
        task = asyncio.create_task(collect(adapter.stream(client, fk.base_url, SECRET, simple_request(), FAST)))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_for_cancelled(ctl, fk, 2)

        # and the client is still usable afterwards
        await set_faults(ctl, fk)
        resp = await adapter.complete(client, fk.base_url, SECRET, simple_request(), FAST)
        assert resp.text == "echo: hello there world"


async def test_unary_cancel_reaches_upstream(client: httpx.AsyncClient, ctl: httpx.AsyncClient) -> None:
    adapter = get_adapter("openai")
    async with running_fake("openai") as fk:
        await set_faults(ctl, fk, {"mode": "hang"})
        task = asyncio.create_task(adapter.complete(client, fk.base_url, SECRET, simple_request(), FAST))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        t0 = time.monotonic()
        while (await stats(ctl, fk))["cancelled_requests"] < 1:
            assert time.monotonic() - t0 < 1.0
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model", ["a/../b", "m#frag", "m@evil.com", "m%2Fx", "../../admin", "m?key=1", "m x"])
async def test_bad_model_refused_before_any_request(
    kind: str, model: str, client: httpx.AsyncClient, ctl: httpx.AsyncClient
) -> None:
    adapter = get_adapter(kind)
    async with running_fake(kind) as fk:
        with pytest.raises(ValueError):
            await adapter.complete(client, fk.base_url, SECRET, simple_request(model=model), FAST)
        with pytest.raises(ValueError):
            await collect(adapter.stream(client, fk.base_url, SECRET, simple_request(model=model), FAST))
        assert await recorded(ctl, fk) == []


@pytest.mark.parametrize("kind", KINDS)
async def test_connect_error(kind: str, client: httpx.AsyncClient) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}" + ("/v1" if kind.startswith("openai") else "")
    err = await expect_error(get_adapter(kind).complete(client, base, SECRET, simple_request(), FAST))
    assert err.kind is ErrorKind.CONNECT_ERROR
    assert err.retryable


@pytest.mark.parametrize("kind", KINDS)
async def test_canary_secret_never_leaks(
    kind: str, client: httpx.AsyncClient, ctl: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    canary = f"sk-CANARY-{uuid.uuid4()}"
    adapter = get_adapter(kind)
    errors: list[ProviderError] = []
    caplog.set_level(logging.DEBUG)
    async with running_fake(kind) as fk, running_fake(kind, api_key="something-else") as strict:
        cases = [
            {"mode": "echo_key_error"},
            {"mode": "echo_key_error", "status": 400},
            {"mode": "echo_key_error", "status": 429, "retry_after": 1},
            {"mode": "echo_key_error", "status": 500},
            {"mode": "malformed_json"},
            {"mode": "truncated_stream"},
            {"mode": "stream_error", "message": f"boom {canary}"},
            {"mode": "error", "status": 400, "error_type": canary, "message": canary},
        ]
        for rule in cases:
            await set_faults(ctl, fk, rule)
            errors.append(await expect_error(adapter.complete(client, fk.base_url, canary, simple_request(), FAST)))
            errors.append(
                await expect_error(collect(adapter.stream(client, fk.base_url, canary, simple_request(), FAST)))
            )
        # the real auth failure path (OpenAI's body echoes the key)
        errors.append(await expect_error(adapter.complete(client, strict.base_url, canary, simple_request(), FAST)))
        errors.append(
            await expect_error(collect(adapter.stream(client, strict.base_url, canary, simple_request(), FAST)))
        )
        seen = await recorded(ctl, fk)
    assert any(canary in json.dumps(r["headers"]) for r in seen)  # the key did go upstream
    for e in errors:
        rendered = "".join(traceback.format_exception(e))
        assert canary not in str(e)
        assert canary not in repr(e)
        assert canary not in rendered
        assert all(canary not in str(a) for a in e.args)
    assert errors[-1].kind is ErrorKind.AUTH_FAILED
    assert canary not in caplog.text
    for record in caplog.records:
        assert canary not in record.getMessage()


async def test_control_api_and_request_log(ctl: httpx.AsyncClient, client: httpx.AsyncClient) -> None:
    async with running_fake("openai") as fk:
        r = await ctl.post(f"{fk.root_url}/_fake/faults", json=[{"mode": "nope"}])
        assert r.status_code == 400
        await set_faults(ctl, fk, {"mode": "error", "status": 500, "times": 1})
        err = await expect_error(get_adapter("openai").complete(client, fk.base_url, SECRET, simple_request(), FAST))
        assert err.kind is ErrorKind.SERVER_ERROR
        ok = await get_adapter("openai").complete(client, fk.base_url, SECRET, simple_request(), FAST)
        assert ok.text.startswith("echo:")
        assert len(await recorded(ctl, fk)) == 2
        assert (await ctl.delete(f"{fk.root_url}/_fake/requests")).status_code == 200
        assert await recorded(ctl, fk) == []
        assert (await ctl.delete(f"{fk.root_url}/_fake/faults")).status_code == 200
        assert (await ctl.get(f"{fk.root_url}/healthz")).json()["status"] == "ok"
        st = await stats(ctl, fk)
        assert st["faults_applied"] == 1 and st["by_status"]["500"] == 1

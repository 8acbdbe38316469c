"""The HTTPS edge's translations: OpenAI / Anthropic JSON <-> the engine's messages, and errors."""

from __future__ import annotations

import base64
import json

import pytest

from igw.router.v1 import router_pb2
from services.common import errors as E
from services.router.edge import anthropic_api, openai_api
from services.router.edge.errors import anthropic_error, openai_error

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()


def test_openai_request_translates_messages_tools_images_and_options() -> None:
    body = {
        "model": "fast", "max_completion_tokens": 99, "temperature": 0.5, "top_p": 0.9, "stop": "END",
        "stream": True, "stream_options": {"include_usage": True}, "user": "ignored", "seed": 7,
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "d",
                                                     "parameters": {"type": "object"}}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "look"},
                                         {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                                         {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"a\":1}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
    }
    req, stream, usage = openai_api.parse(body, "rid-1")
    assert (stream, usage, req.request_id, req.model, req.max_output_tokens) == (True, True, "rid-1", "fast", 99)
    assert req.temperature == pytest.approx(0.5) and req.top_p == pytest.approx(0.9) and list(req.stop) == ["END"]
    assert [m.role for m in req.messages] == [router_pb2.ROLE_SYSTEM, router_pb2.ROLE_USER,
                                              router_pb2.ROLE_ASSISTANT, router_pb2.ROLE_TOOL]
    parts = req.messages[1].parts
    assert parts[0].text == "look" and parts[1].image_bytes.mime_type == "image/png"
    assert parts[1].image_bytes.data == base64.b64decode(PNG) and parts[2].image_url == "https://example.com/a.png"
    call = req.messages[2].tool_calls[0]
    assert (call.id, call.name, call.arguments_json) == ("call_1", "get_weather", "{\"a\":1}")
    assert req.messages[3].tool_call_id == "call_1" and req.messages[3].parts[0].text == "sunny"
    assert req.tools[0].name == "get_weather" and json.loads(req.tools[0].parameters_json_schema) == {"type": "object"}
    assert req.tool_choice == "get_weather"


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": []}, "model"),
    ({"model": "m"}, "messages"),
    ({"model": "m", "messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
     "messages[0].content[0].type"),
    ({"model": "m", "messages": [], "n": 2}, "n"),
    ({"model": "m", "messages": [], "max_tokens": "9"}, "max_tokens"),
    ({"model": "m", "messages": [], "temperature": "hot"}, "temperature"),
    ({"model": "m", "messages": [], "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]},
     "messages[0].content[0].image_url"),
])
def test_openai_bad_requests_name_the_field(body: dict[str, object], param: str) -> None:
    with pytest.raises(E.InvalidArgument) as exc:
        openai_api.parse(body, "r")
    assert exc.value.metadata["param"] == param
    out = openai_error(exc.value)
    assert out.status == 400 and out.body["error"]["param"] == param  # type: ignore[index]


def test_openai_stream_chunks_carry_tool_deltas_finish_usage_and_cost_last() -> None:
    s = openai_api.ChunkStream("fast", 1, include_usage=True)
    final = router_pb2.GenerateResponse(request_id="r1", finish_reason=router_pb2.FINISH_REASON_TOOL_CALLS,
                                        usage=router_pb2.Usage(input_tokens=10, output_tokens=3,
                                                               cached_input_tokens=4), cost_nanos=123)
    evs = [router_pb2.GenerateStreamResponse(start=router_pb2.StreamStart(request_id="r1")),
           router_pb2.GenerateStreamResponse(tool_call_delta=router_pb2.ToolCallDelta(
               index=0, id="c1", name="get_weather", arguments_fragment="{\"ci")),
           router_pb2.GenerateStreamResponse(tool_call_delta=router_pb2.ToolCallDelta(
               index=0, arguments_fragment="ty\":1}")),
           router_pb2.GenerateStreamResponse(final=final)]
    chunks = [c for ev in evs for c in s.events(ev)]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    first = chunks[1]["choices"][0]["delta"]["tool_calls"][0]
    assert first == {"index": 0, "id": "c1", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{\"ci"}}
    assert chunks[2]["choices"][0]["delta"]["tool_calls"][0] == {"index": 0, "function": {"arguments": "ty\":1}"}}
    assert chunks[3]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[4]["choices"] == [] and chunks[4]["usage"] == {
        "prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13, "prompt_tokens_details": {"cached_tokens": 4}}
    assert chunks[4]["igw"]["cost_nanos"] == 123 and all(c["id"] == "chatcmpl-r1" for c in chunks)


def test_anthropic_request_splits_tool_results_into_tool_messages_in_order() -> None:
    body = {
        "model": "smart", "max_tokens": 50, "system": [{"type": "text", "text": "sys"}],
        "stop_sequences": ["X"], "top_k": 5, "metadata": {"user_id": "u"},
        "tools": [{"name": "t", "description": "d", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "any"},
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "s"},
                                              {"type": "text", "text": "let me"},
                                              {"type": "tool_use", "id": "tu1", "name": "t", "input": {"q": 1}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "tu1", "content": [{"type": "text", "text": "42"}]},
                {"type": "text", "text": "thanks"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]},
        ],
    }
    req, stream = anthropic_api.parse(body, "rid")
    assert not stream and req.max_output_tokens == 50 and list(req.stop) == ["X"] and req.tool_choice == "required"
    roles = [m.role for m in req.messages]
    assert roles == [router_pb2.ROLE_SYSTEM, router_pb2.ROLE_USER, router_pb2.ROLE_ASSISTANT, router_pb2.ROLE_TOOL,
                     router_pb2.ROLE_USER]
    assert req.messages[2].parts[0].text == "let me" and len(req.messages[2].parts) == 1
    assert json.loads(req.messages[2].tool_calls[0].arguments_json) == {"q": 1}
    assert req.messages[3].tool_call_id == "tu1" and req.messages[3].parts[0].text == "42"
    assert req.messages[4].parts[0].text == "thanks" and req.messages[4].parts[1].image_bytes.mime_type == "image/png"


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "m", "messages": []}, "max_tokens"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "tool_use"}]}]},
     "messages[0].content[0].type"),
    ({"model": "m", "max_tokens": 5, "messages": [], "tool_choice": {"type": "maybe"}}, "tool_choice.type"),
])
def test_anthropic_bad_requests_name_the_field(body: dict[str, object], param: str) -> None:
    with pytest.raises(E.InvalidArgument) as exc:
        anthropic_api.parse(body, "r")
    out = anthropic_error(exc.value)
    assert out.status == 400 and out.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert param in out.body["error"]["message"]  # type: ignore[index]


def test_anthropic_stream_follows_the_providers_block_sequence() -> None:
    s = anthropic_api.EventStream("smart")
    final = router_pb2.GenerateResponse(request_id="r", finish_reason=router_pb2.FINISH_REASON_TOOL_CALLS,
                                        usage=router_pb2.Usage(input_tokens=10, output_tokens=2,
                                                               cached_input_tokens=3))
    evs = [router_pb2.GenerateStreamResponse(start=router_pb2.StreamStart(request_id="r")),
           router_pb2.GenerateStreamResponse(text_delta=router_pb2.TextDelta(text="Let ")),
           router_pb2.GenerateStreamResponse(text_delta=router_pb2.TextDelta(text="me")),
           router_pb2.GenerateStreamResponse(tool_call_delta=router_pb2.ToolCallDelta(index=0, id="a", name="t")),
           router_pb2.GenerateStreamResponse(
               tool_call_delta=router_pb2.ToolCallDelta(index=0, arguments_fragment="{}")),
           router_pb2.GenerateStreamResponse(tool_call_delta=router_pb2.ToolCallDelta(index=1, id="b", name="u",
                                                                                       arguments_fragment="{")),
           router_pb2.GenerateStreamResponse(final=final)]
    out = [pair for ev in evs for pair in s.events(ev)]
    names = [n for n, _ in out]
    assert names == ["message_start", "ping", "content_block_start", "content_block_delta", "content_block_delta",
                     "content_block_stop", "content_block_start", "content_block_delta", "content_block_stop",
                     "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
                     "message_stop"]
    starts = [d for n, d in out if n == "content_block_start"]
    assert [d["index"] for d in starts] == [0, 1, 2]
    assert starts[1]["content_block"] == {"type": "tool_use", "id": "a", "name": "t", "input": {}}
    delta = dict(out)["message_delta"]
    assert delta["delta"]["stop_reason"] == "tool_use"
    assert delta["usage"] == {"input_tokens": 7, "output_tokens": 2, "cache_read_input_tokens": 3,
                              "cache_creation_input_tokens": 0}


def test_budget_refusal_is_each_apis_exhausted_quota_and_is_not_retried() -> None:
    err = E.ResourceExhausted("BUDGET_EXCEEDED", "budget exceeded for team t (DAILY window)",
                              {"remaining_nanos": 5, "requested_nanos": 900})
    oa, an = openai_error(err), anthropic_error(err)
    assert oa.status == 429 and oa.body["error"]["type"] == "insufficient_quota"  # type: ignore[index]
    assert oa.body["error"]["code"] == "insufficient_quota"  # type: ignore[index]
    message = "budget exceeded for team t (DAILY window): remaining 5 nano-USD, needed 900"
    assert an.status == 402 and an.body == {"type": "error", "error": {"type": "billing_error", "message": message}}
    for out in (oa, an):
        assert out.headers["x-should-retry"] == "false" and "retry-after" not in out.headers


def test_rate_limits_and_overload_carry_retry_after_from_retry_info() -> None:
    err = E.ResourceExhausted("ROUTER_OVERLOADED", "too many calls in flight; retry shortly")
    assert openai_error(err).status == 429 and openai_error(err).headers["retry-after"] == "1"
    slow = E.Unavailable("ALL_CANDIDATES_FAILED", "no deployment could answer")
    slow.retry_delay_s = 2.5  # type: ignore[attr-defined]  # RetryInfo, as the engine sets it
    oa, an = openai_error(slow), anthropic_error(slow)
    assert (oa.status, an.status) == (503, 529) and an.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    assert oa.headers["retry-after"] == an.headers["retry-after"] == "3" and oa.headers["retry-after-ms"] == "2500"


@pytest.mark.parametrize(("err", "status", "atype"), [
    (E.NotFound("UNKNOWN_MODEL", "no such model alias"), 404, "not_found_error"),
    (E.PermissionDenied("MODEL_NOT_ALLOWED", "no"), 403, "permission_error"),
    (E.FailedPrecondition("NO_CAPABLE_DEPLOYMENT", "no"), 400, "invalid_request_error"),
    (E.DeadlineExceeded("DEADLINE_EXCEEDED", "late"), 504, "timeout_error"),
    (E.Internal("INTERNAL", "internal error"), 500, "api_error"),
    (E.InvalidArgument("REQUEST_TOO_LARGE", "big"), 413, "request_too_large"),
])
def test_other_codes_follow_the_standard_grpc_to_http_table(err: E.IgwError, status: int, atype: str) -> None:
    an = anthropic_error(err)
    assert an.status == status and an.body["error"]["type"] == atype  # type: ignore[index]
    oa = openai_error(err)
    assert oa.status == status and oa.headers["x-igw-error-reason"] == err.reason
    assert oa.body["error"]["code"] == ("model_not_found" if err.reason == "UNKNOWN_MODEL"  # type: ignore[index]
                                        else err.reason.lower())

"""The official `openai` and `anthropic` SDKs against the router's HTTPS edge.

Real processes (`igw up`: router with its edge, ledger, keyvault, fake providers), real mTLS
with the agent's certificate, the SDKs from PyPI with an httpx client carrying `cert=` and
`verify=`. Each call must leave exactly one spend entry, at the cost the gRPC path charges.
"""

from __future__ import annotations

import json
import ssl
import time
import uuid
from collections.abc import Iterator
from typing import Any

import anthropic
import grpc
import httpx
import httpx2
import openai
import pytest

from igw.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from igw.router.v1 import router_pb2, router_pb2_grpc
from igw_dev import pki as pki_mod
from services.common.errors import error_info_from_rpc_error
from tests.e2e.conftest import Gateway, mtls_channel

WEATHER_OPENAI = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
WEATHER_ANTHROPIC = [{"name": "get_weather", "description": "Weather for a city",
                      "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]


def agent_http_client(gw: Gateway, cert: str | None) -> httpx2.Client:
    """What the README shows: the SDKs' httpx2 client, trusting the igw CA, presenting ``cert``.

    (httpx2 takes the client certificate through the SSL context: ``verify=ctx`` with
    ``ctx.load_cert_chain``; SDK versions built on httpx take ``cert=`` and ``verify=`` instead.)
    """
    ctx = ssl.create_default_context(cafile=str(gw.pki / "ca.pem"))
    if cert:
        ctx.load_cert_chain(str(gw.pki / f"{cert}.pem"), str(gw.pki / f"{cert}-key.pem"))
    return httpx2.Client(verify=ctx, timeout=30)


class Edge:
    """SDK clients for one agent certificate, and the ledger to check what they cost."""

    def __init__(self, gw: Gateway, cert: str = "agent-demo-quickstart") -> None:
        self.gw = gw
        self.http = agent_http_client(gw, cert)
        self.openai = openai.OpenAI(base_url=str(gw.endpoints["openai_base_url"]), api_key="unused",
                                    http_client=self.http)
        self.anthropic = anthropic.Anthropic(base_url=str(gw.endpoints["anthropic_base_url"]), api_key="unused",
                                             http_client=self.http)
        self.ledger = ledger_pb2_grpc.LedgerAdminServiceStub(gw.channel("ledger"))

    def entry(self, request_id: str, timeout: float = 10) -> ledger_pb2.SpendEntry:
        """The one spend entry of ``request_id`` (waits for the settle)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            resp = self.ledger.ListSpendEntries(ledger_pb2.ListSpendEntriesRequest(page_size=1000), timeout=10)
            found = [e for e in resp.entries if e.request_id == request_id]
            if found:
                assert len(found) == 1
                return found[0]
            time.sleep(0.1)
        raise AssertionError(f"no spend entry for {request_id}")

    def close(self) -> None:
        self.http.close()


@pytest.fixture(scope="module")
def edge(gateway: Gateway) -> Iterator[Edge]:
    e = Edge(gateway)
    try:
        yield e
    finally:
        e.close()


def _grpc_cost(gw: Gateway, model: str, text: str, max_tokens: int) -> int:
    """What the same call costs through Router.Generate."""
    with gw.channel("router", "agent-demo-quickstart") as ch:
        msg = router_pb2.Message(role=router_pb2.ROLE_USER)
        msg.parts.add(text=text)
        resp = router_pb2_grpc.RouterServiceStub(ch).Generate(
            router_pb2.GenerateRequest(model=model, messages=[msg], max_output_tokens=max_tokens), timeout=30)
    return resp.cost_nanos


def _fake_requests(gw: Gateway, fake: str) -> int:
    return int(httpx.get(f"{gw.endpoints['fakes'][fake]}/_fake/stats", timeout=10).json().get("requests", 0))


def test_openai_sdk_unary_answers_with_usage_and_costs_what_grpc_costs(edge: Edge) -> None:
    text = "hello there gateway, how are you"
    raw = edge.openai.chat.completions.with_raw_response.create(
        model="fast", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": text}],
        max_tokens=64)
    resp = raw.parse()
    assert resp.choices[0].message.content and resp.choices[0].finish_reason in ("stop", "length")
    assert resp.model == "fast" and resp.usage is not None and resp.usage.prompt_tokens > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    igw = resp.model_extra["igw"]  # type: ignore[index]
    assert igw["served_by"]["deployment"] == "fake-openai-small"
    assert int(raw.headers["x-igw-cost-nanos"]) == igw["cost_nanos"] > 0
    entry = edge.entry(igw["request_id"])
    assert entry.cost_nanos == igw["cost_nanos"]
    assert entry.usage.input_tokens == resp.usage.prompt_tokens
    # The same conversation through gRPC costs the same.
    with edge.gw.channel("router", "agent-demo-quickstart") as ch:
        msgs = [router_pb2.Message(role=router_pb2.ROLE_SYSTEM), router_pb2.Message(role=router_pb2.ROLE_USER)]
        msgs[0].parts.add(text="be brief")
        msgs[1].parts.add(text=text)
        g = router_pb2_grpc.RouterServiceStub(ch).Generate(
            router_pb2.GenerateRequest(model="fast", messages=msgs, max_output_tokens=64), timeout=30)
    assert g.cost_nanos == igw["cost_nanos"]
    assert g.usage.input_tokens == resp.usage.prompt_tokens and g.text == resp.choices[0].message.content


def test_openai_sdk_streams_with_usage_on_the_last_chunk_and_one_spend_entry(edge: Edge) -> None:
    text = "stream me a sentence please"
    chunks = list(edge.openai.chat.completions.create(
        model="fast", messages=[{"role": "user", "content": text}], max_tokens=64, stream=True,
        stream_options={"include_usage": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None and last.usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    igw = last.model_extra["igw"]  # type: ignore[index]
    assert edge.entry(igw["request_id"]).cost_nanos == igw["cost_nanos"] == _grpc_cost(edge.gw, "fast", text, 64)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id == f"chatcmpl-{igw['request_id']}"


def test_openai_sdk_tool_round_trip_unary_and_streamed_argument_deltas(edge: Edge) -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = edge.openai.chat.completions.create(model="fast", messages=messages, tools=WEATHER_OPENAI,  # type: ignore[arg-type]
                                                max_tokens=64)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    # Streamed: the arguments arrive as deltas and add up to the same JSON.
    stream = edge.openai.chat.completions.create(model="fast", messages=messages, tools=WEATHER_OPENAI,  # type: ignore[arg-type]
                                                 max_tokens=64, stream=True)
    args, names, ids = "", set(), set()
    for chunk in stream:
        for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            args += d.function.arguments or "" if d.function else ""
            if d.function and d.function.name:
                names.add(d.function.name)
            if d.id:
                ids.add(d.id)
    assert json.loads(args) == {"city": "Paris"} and names == {"get_weather"} and len(ids) == 1
    # The tool's result goes back; the model answers from it.
    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"})
    second = edge.openai.chat.completions.create(model="fast", messages=messages, tools=WEATHER_OPENAI,  # type: ignore[arg-type]
                                                 max_tokens=64)
    assert second.choices[0].message.content == "tool said: sunny, 21 C"
    assert second.choices[0].finish_reason == "stop"
    # The earlier turns were a cached prefix upstream: cached input tokens come back (and are part of the prompt).
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    assert 0 < (second.usage.prompt_tokens_details.cached_tokens or 0) < second.usage.prompt_tokens


def test_anthropic_sdk_unary_answers_with_usage_and_costs_what_grpc_costs(edge: Edge) -> None:
    text = "hello anthropic style gateway"
    raw = edge.anthropic.messages.with_raw_response.create(
        model="smart", max_tokens=64, system="be brief", messages=[{"role": "user", "content": text}])
    msg = raw.parse()
    assert msg.type == "message" and msg.role == "assistant" and msg.model == "smart"
    assert msg.content[0].type == "text" and msg.content[0].text
    assert msg.stop_reason in ("end_turn", "max_tokens") and msg.usage.input_tokens > 0
    igw = msg.model_extra["igw"]  # type: ignore[index]
    assert igw["served_by"]["deployment"] == "fake-anthropic-large"
    assert int(raw.headers["x-igw-cost-nanos"]) == igw["cost_nanos"] > 0
    assert edge.entry(igw["request_id"]).cost_nanos == igw["cost_nanos"]


def test_anthropic_sdk_streams_the_providers_event_sequence(edge: Edge) -> None:
    text = "stream a few words"
    with edge.anthropic.messages.stream(model="smart", max_tokens=64,
                                        messages=[{"role": "user", "content": text}]) as stream:
        kinds = [ev.type for ev in stream]
        final = stream.get_final_message()
    raw_kinds = [k for k in kinds if k not in ("text",)]
    assert raw_kinds[:2] == ["message_start", "content_block_start"]
    assert raw_kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(raw_kinds[2:-3]) == {"content_block_delta"}
    assert final.content[0].type == "text" and final.content[0].text
    assert final.usage.output_tokens > 0 and final.usage.input_tokens > 0
    assert final.stop_reason in ("end_turn", "max_tokens")
    rid = final.id.removeprefix("msg_")
    cost = _grpc_cost(edge.gw, "smart", text, 64)
    assert edge.entry(rid).cost_nanos == cost


def test_anthropic_sdk_tool_round_trip_with_streamed_input_json(edge: Edge) -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What is the weather like?"}]
    first = edge.anthropic.messages.create(model="smart", max_tokens=64, tools=WEATHER_ANTHROPIC,  # type: ignore[arg-type]
                                           messages=messages)  # type: ignore[arg-type]
    assert first.stop_reason == "tool_use"
    uses = [b for b in first.content if b.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "get_weather" and uses[0].input == {"city": "Paris"}
    with edge.anthropic.messages.stream(model="smart", max_tokens=64, tools=WEATHER_ANTHROPIC,  # type: ignore[arg-type]
                                        messages=messages) as stream:  # type: ignore[arg-type]
        partial = "".join(ev.delta.partial_json for ev in stream
                          if ev.type == "content_block_delta" and ev.delta.type == "input_json_delta")
        streamed = stream.get_final_message()
    assert json.loads(partial) == {"city": "Paris"}
    assert [b.input for b in streamed.content if b.type == "tool_use"] == [{"city": "Paris"}]
    messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]})
    messages.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id,
                                                  "content": "rainy, 12 C"}]})
    second = edge.anthropic.messages.create(model="smart", max_tokens=64, tools=WEATHER_ANTHROPIC,  # type: ignore[arg-type]
                                            messages=messages)  # type: ignore[arg-type]
    assert second.content[0].type == "text" and second.content[0].text == "tool said: rainy, 12 C"
    # Anthropic's usage: input_tokens excludes the cache reads, reported apart.
    assert (second.usage.cache_read_input_tokens or 0) > 0 and second.usage.input_tokens > 0
    igw = second.model_extra["igw"]  # type: ignore[index]
    entry = edge.entry(igw["request_id"])
    assert entry.usage.cached_input_tokens == second.usage.cache_read_input_tokens
    assert entry.usage.input_tokens == second.usage.input_tokens + second.usage.cache_read_input_tokens


def test_a_budget_refusal_is_each_sdks_exhausted_quota_error_and_reaches_no_provider(gateway: Gateway) -> None:
    team = f"broke{uuid.uuid4().hex[:6]}"
    pki_mod.issue_to_dir(gateway.pki, "agent", team, "a1")
    ledger = ledger_pb2_grpc.LedgerAdminServiceStub(gateway.channel("ledger"))
    ledger.SetBudget(ledger_pb2.SetBudgetRequest(team=team, window=ledger_pb2.BUDGET_WINDOW_DAILY, limit_nanos=10),
                     timeout=10)
    broke = Edge(gateway, f"agent-{team}-a1")
    before = {f: _fake_requests(gateway, f) for f in ("fake-openai", "fake-anthropic")}
    try:
        with pytest.raises(openai.RateLimitError) as oa:
            broke.openai.chat.completions.create(model="fast", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=16)
        assert oa.value.status_code == 429 and oa.value.code == "insufficient_quota"
        assert oa.value.type == "insufficient_quota" and oa.value.response.headers["x-should-retry"] == "false"
        assert oa.value.response.headers["x-igw-error-reason"] == "BUDGET_EXCEEDED"
        with pytest.raises(anthropic.PaymentRequiredError) as an:
            broke.anthropic.messages.create(model="smart", max_tokens=16,
                                            messages=[{"role": "user", "content": "hi"}])
        body = an.value.body
        assert isinstance(body, dict) and body["type"] == "error" and body["error"]["type"] == "billing_error"
        with pytest.raises(openai.RateLimitError):  # streamed: refused before the stream starts
            broke.openai.chat.completions.create(model="fast", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=16, stream=True)
    finally:
        broke.close()
    assert {f: _fake_requests(gateway, f) for f in before} == before


def test_bad_requests_are_400s_naming_the_field_in_each_apis_shape(edge: Edge) -> None:
    with pytest.raises(openai.BadRequestError) as oa:
        edge.openai.chat.completions.create(model="fast", messages=[{"role": "wizard", "content": "x"}])  # type: ignore[misc, list-item]
    assert oa.value.param == "messages[0].role" and oa.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as oa2:
        edge.openai.chat.completions.create(model="fast", messages=[{"role": "user", "content": "x"}],
                                            max_tokens=10**9)
    assert oa2.value.code == "bad_max_output_tokens"
    with pytest.raises(openai.NotFoundError) as nf:
        edge.openai.chat.completions.create(model="no-such-alias", messages=[{"role": "user", "content": "x"}])
    assert nf.value.code == "model_not_found"
    resp = edge.http.post(f"{edge.gw.endpoints['anthropic_base_url']}/v1/messages",
                          json={"model": "smart", "messages": [{"role": "user", "content": "x"}]})
    assert resp.status_code == 400
    assert resp.json() == {"type": "error", "error": {"type": "invalid_request_error",
                                                      "message": "max_tokens: Field required"}}
    with pytest.raises(anthropic.BadRequestError) as an:
        edge.anthropic.messages.create(model="smart", max_tokens=16, messages=[
            {"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                       "data": "!!!not base64"}}]}])
    assert "messages[0].content[0].source" in str(an.value.message)
    count = edge.http.post(f"{edge.gw.endpoints['anthropic_base_url']}/v1/messages/count_tokens", json={})
    assert count.status_code == 404 and count.json()["error"]["type"] == "not_found_error"
    garbage = edge.http.post(f"{edge.gw.endpoints['openai_base_url']}/chat/completions", content=b"{nope")
    assert garbage.status_code == 400 and garbage.json()["error"]["code"] == "bad_json"


def test_models_lists_the_teams_aliases(edge: Edge) -> None:
    ids = {m.id for m in edge.openai.models.list()}
    assert {"fast", "smart", "flaky"} <= ids


def test_an_operator_certificate_may_not_generate_and_no_certificate_gets_no_connection(gateway: Gateway) -> None:
    op = Edge(gateway, "operator-admin")
    try:
        with pytest.raises(openai.PermissionDeniedError) as exc:
            op.openai.chat.completions.create(model="fast", messages=[{"role": "user", "content": "x"}])
        assert exc.value.response.headers["x-igw-error-reason"] == "METHOD_NOT_ALLOWED"
        assert {m.id for m in op.openai.models.list()} >= {"fast"}  # operators may read the catalogue
    finally:
        op.close()
    bare = agent_http_client(gateway, None)
    client = openai.OpenAI(base_url=str(gateway.endpoints["openai_base_url"]), api_key="x", http_client=bare,
                           max_retries=0)
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="fast", messages=[{"role": "user", "content": "x"}])
    bare.close()


def test_an_image_input_reaches_an_image_capable_deployment(edge: Edge) -> None:
    png = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==")
    resp = edge.openai.chat.completions.create(model="fast", max_tokens=32, messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is in this picture"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}]}])
    assert resp.choices[0].message.content
    assert resp.model_extra["igw"]["served_by"]["deployment"] == "fake-openai-small"  # type: ignore[index]



def _write_cert(gw: Gateway, name: str, spiffe_id: str, **kw: Any) -> None:
    cert, key = pki_mod.issue_cert((gw.pki / "ca.pem").read_bytes(), (gw.pki / "ca-key.pem").read_bytes(),
                                   spiffe_id, **kw)
    (gw.pki / f"{name}.pem").write_bytes(cert)
    (gw.pki / f"{name}-key.pem").write_bytes(key)


@pytest.mark.parametrize(("spiffe_id", "kw", "reason"), [
    ("spiffe://igw.local/team/t1/agent/a1", {"extra_uri_sans": ["spiffe://igw.local/team/t2/agent/a2"]},
     "AMBIGUOUS_IDENTITY"),
    ("spiffe://other.domain/team/t1/agent/a1", {}, "UNTRUSTED_IDENTITY"),
    ("spiffe://igw.local/ledger", {}, "METHOD_NOT_ALLOWED"),
])
def test_certificates_grpc_refuses_are_refused_by_the_edge_with_the_same_reason(
    gateway: Gateway, spiffe_id: str, kw: dict[str, Any], reason: str,
) -> None:
    name = f"edge-odd-{uuid.uuid4().hex[:6]}"
    _write_cert(gateway, name, spiffe_id, **kw)
    odd = Edge(gateway, name)
    try:
        with pytest.raises(anthropic.PermissionDeniedError) as exc:
            odd.anthropic.messages.create(model="smart", max_tokens=8, messages=[{"role": "user", "content": "x"}])
        assert exc.value.response.headers["x-igw-error-reason"] == reason
    finally:
        odd.close()
    # gRPC says the same.
    with mtls_channel(gateway.addr("router"), gateway.pki, name) as ch, pytest.raises(grpc.RpcError) as rpc:
        msg = router_pb2.Message(role=router_pb2.ROLE_USER)
        msg.parts.add(text="x")
        router_pb2_grpc.RouterServiceStub(ch).Generate(
            router_pb2.GenerateRequest(model="smart", messages=[msg], max_output_tokens=8), timeout=10)
    assert rpc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    info = error_info_from_rpc_error(rpc.value)
    assert info is not None and info.reason == reason


def test_a_certificate_from_another_ca_gets_no_connection(gateway: Gateway, tmp_path: Any) -> None:
    other = pki_mod.init_dev_pki(tmp_path / "other")
    ctx = ssl.create_default_context(cafile=str(gateway.pki / "ca.pem"))
    ctx.load_cert_chain(str(other.agent_demo.cert), str(other.agent_demo.key))
    client = openai.OpenAI(base_url=str(gateway.endpoints["openai_base_url"]), api_key="x", max_retries=0,
                           http_client=httpx2.Client(verify=ctx, timeout=10))
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="fast", messages=[{"role": "user", "content": "x"}])

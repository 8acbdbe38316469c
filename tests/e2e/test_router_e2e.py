"""The router end to end: three real services, fake providers as real HTTP servers.

A second router process runs here with a test routing config (short timeouts, a low
breaker threshold, a dead provider, a canary-keyed provider) next to the gateway's own.
"""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from igw.client import IgwClient
from igw.keyvault.v1 import keyvault_pb2, keyvault_pb2_grpc
from igw.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from igw.router.v1 import router_pb2, router_pb2_grpc
from igw_dev import pki as pki_mod
from igw_dev.fakes import FakeProcess
from igw_dev.procs import ServiceProcess, ServiceStartError, start_service, tls_env
from services.common.errors import error_info_from_rpc_error
from tests.e2e.conftest import Gateway, mtls_channel

CANARY = f"sk-CANARY-{uuid.uuid4()}"


def _fake(root: str, method: str, path: str, body: Any = None) -> Any:
    resp = httpx.request(method, root + path, json=body, timeout=10)
    resp.raise_for_status()
    return resp.json() if resp.content else None


def _user(text: str) -> router_pb2.Message:
    m = router_pb2.Message(role=router_pb2.ROLE_USER)
    m.parts.add(text=text)
    return m


def _req(model: str, text: str = "hello there gateway", **kw: Any) -> router_pb2.GenerateRequest:
    return router_pb2.GenerateRequest(model=model, messages=[_user(text)], max_output_tokens=64, **kw)


class Rig:
    """The second router and the handles a test needs."""

    def __init__(self, gw: Gateway, router: ServiceProcess, fakes: dict[str, str], config: Path,
                 canary: FakeProcess, evil: FakeProcess) -> None:
        self.gw, self.router, self.fakes, self.config = gw, router, fakes, config
        self.canary, self.evil = canary, evil
        self.agent_ch = mtls_channel(router.address, gw.pki, "agent-demo-quickstart")
        self.stub = router_pb2_grpc.RouterServiceStub(self.agent_ch)
        self.op_ch = mtls_channel(router.address, gw.pki, "operator-admin")
        self.admin = router_pb2_grpc.RouterAdminServiceStub(self.op_ch)
        self.ledger_op = ledger_pb2_grpc.LedgerAdminServiceStub(gw.channel("ledger"))

    def entries(self, request_id: str) -> list[ledger_pb2.SpendEntry]:
        resp = self.ledger_op.ListSpendEntries(ledger_pb2.ListSpendEntriesRequest(page_size=1000), timeout=10)
        return [e for e in resp.entries if e.request_id == request_id]

    def wait_entry(self, request_id: str, timeout: float = 10) -> ledger_pb2.SpendEntry:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.entries(request_id)
            if found:
                assert len(found) == 1
                return found[0]
            time.sleep(0.1)
        raise AssertionError(f"no spend entry for {request_id}")

    def requests_seen(self, fake: str) -> int:
        return int(_fake(self.fakes[fake], "GET", "/_fake/stats").get("requests", 0))


def _config(fakes: dict[str, str], canary_url: str) -> str:
    return f"""
providers:
  fake-openai: {{type: openai, base_url: "{fakes['fake-openai']}/v1", local: true}}
  fake-anthropic: {{type: anthropic, base_url: "{fakes['fake-anthropic']}", local: true}}
  fake-gemini: {{type: gemini, base_url: "{fakes['fake-gemini']}", local: true}}
  dead: {{type: openai, base_url: "http://127.0.0.1:9/v1", local: true}}
  canary: {{type: openai, base_url: "{canary_url}", local: true}}
  mismatch: {{type: openai, base_url: "{fakes['fake-openai']}/v1", local: true}}
deployments:
  oa: {{provider: fake-openai, model: fake-small, price: fake-small}}
  oa-solo: {{provider: fake-openai, model: fake-solo, price: fake-small}}
  an: {{provider: fake-anthropic, model: fake-large, price: fake-large, context_window: 200000}}
  an-small-window: {{provider: fake-anthropic, model: fake-ctx, price: fake-large, context_window: 1000}}
  ge: {{provider: fake-gemini, model: fake-small, price: fake-small}}
  ge-big: {{provider: fake-gemini, model: fake-big, price: fake-small, context_window: 2000000}}
  ge-tiny: {{provider: fake-gemini, model: fake-tiny, price: fake-small, context_window: 800}}
  dead-dep: {{provider: dead, model: fake-small, price: fake-small}}
  br: {{provider: fake-gemini, model: fake-breaker, price: fake-small}}
  can: {{provider: canary, model: fake-small, price: fake-small}}
  mm: {{provider: mismatch, model: fake-small, price: fake-small}}
  oa-cache: {{provider: fake-openai, model: fake-small, price: fake-cached}}
  an-cache: {{provider: fake-anthropic, model: fake-large, price: fake-cached}}
  ge-cache: {{provider: fake-gemini, model: fake-small, price: fake-cached}}
models:
  openai-first: {{candidates: [oa, ge]}}
  anthropic-first: {{candidates: [an, oa]}}
  gemini-first: {{candidates: [ge, oa]}}
  dead-first: {{candidates: [dead-dep, oa]}}
  solo: {{candidates: [oa-solo]}}
  ctx: {{candidates: [an-small-window, ge-tiny, oa, ge-big]}}
  breaker: {{candidates: [br]}}
  canary: {{candidates: [can, oa]}}
  canary-solo: {{candidates: [can]}}
  mismatch-first: {{candidates: [mm, oa]}}
  other-team-only: {{candidates: [oa], teams: [someone-else]}}
  cached-openai: {{candidates: [oa-cache]}}
  cached-anthropic: {{candidates: [an-cache]}}
  cached-gemini: {{candidates: [ge-cache]}}
retries: {{max_attempts: 3, backoff_initial_ms: 20, backoff_max_ms: 100, retry_after_cap_ms: 2000}}
timeouts: {{connect_ms: 500, first_byte_ms: 1500, idle_ms: 1000, total_ms: 5000}}
breaker: {{failure_threshold: 1000, cooldown_ms: 1500, probe_timeout_ms: 1000}}
"""


@pytest.fixture(scope="module")
def rig(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("rig")
    fakes = {k: str(v) for k, v in gateway.endpoints["fakes"].items()}
    demo = json.loads((gateway.state_dir / "demo-secrets.json").read_text())
    canary = FakeProcess.start("openai", api_key=CANARY)
    evil = FakeProcess.start("openai")
    vault = keyvault_pb2_grpc.KeyVaultAdminServiceStub(gateway.channel("keyvault"))
    for provider, url, secret in (("dead", "http://127.0.0.1:9/v1", "sk-dead-key-0000"),
                                  ("canary", canary.base_url, CANARY),
                                  # a key whose URL is not the one the config allowlists for its provider
                                  ("mismatch", evil.base_url, "sk-mismatch-key-0000")):
        vault.CreateProviderKey(keyvault_pb2.CreateProviderKeyRequest(
            request_id=uuid.uuid4().hex, name=f"rig-{provider}", provider=provider, secret=secret,
            base_url=url, all_teams=True), timeout=10)
    assert demo  # the gateway's demo keys serve fake-openai / fake-anthropic / fake-gemini
    config = tmp / "router.yaml"
    config.write_text(_config(fakes, canary.base_url))
    env = {**tls_env(gateway.pki, "router"), "IGW_ROUTER_CONFIG": str(config),
           "IGW_LEDGER_ADDR": gateway.addr("ledger"), "IGW_KEYVAULT_ADDR": gateway.addr("keyvault"),
           "IGW_LOG_LEVEL": "DEBUG", "IGW_ROUTER_HTTP_LISTEN": "127.0.0.1:0"}
    router = start_service("router", env, tmp)
    r = Rig(gateway, router, fakes, config, canary, evil)
    try:
        yield r
    finally:
        router.terminate()
        canary.stop()
        evil.stop()


@pytest.fixture(autouse=True)
def _clean_faults(rig: Rig) -> Iterator[None]:
    yield
    for root in [*rig.fakes.values(), rig.canary.root_url]:
        _fake(root, "DELETE", "/_fake/faults")


@pytest.mark.parametrize(("alias", "deployment", "provider"), [
    ("openai-first", "oa", "fake-openai"), ("anthropic-first", "an", "fake-anthropic"),
    ("gemini-first", "ge", "fake-gemini"),
])
def test_each_provider_answers_unary_and_streaming_with_usage_and_exact_cost(
    rig: Rig, alias: str, deployment: str, provider: str
) -> None:
    resp = rig.stub.Generate(_req(alias, "say hello to the gateway please"), timeout=15)
    assert resp.text == "echo: say hello to the gateway please"
    assert resp.served_by.deployment == deployment and resp.served_by.provider == provider
    assert resp.finish_reason == router_pb2.FINISH_REASON_STOP
    assert resp.usage.output_tokens == len(resp.text.split()) and resp.usage.input_tokens > 0
    entry = rig.wait_entry(resp.request_id)
    assert entry.cost_nanos == resp.cost_nanos > 0
    assert entry.usage.input_tokens == resp.usage.input_tokens
    assert entry.provider == provider
    # The cost, worked out here from the published prices (not with the gateway's own formula):
    # each component rounded up to a whole nano-dollar.
    catalogue = rig.ledger_op.ListPrices(ledger_pb2.ListPricesRequest(version=entry.price_version), timeout=10)
    price = next(p for p in catalogue.prices if p.model == entry.model)

    def up(tokens: int, per_mtok: int) -> int:
        return (tokens * per_mtok + 999_999) // 1_000_000

    assert resp.cost_nanos == (up(resp.usage.input_tokens, price.input_per_mtok_nanos)
                               + up(resp.usage.output_tokens, price.output_per_mtok_nanos))

    msgs = list(rig.stub.GenerateStream(_req(alias, "stream this text back"), timeout=15))
    assert msgs[0].WhichOneof("event") == "start" and msgs[-1].WhichOneof("event") == "final"
    text = "".join(m.text_delta.text for m in msgs if m.WhichOneof("event") == "text_delta")
    final = msgs[-1].final
    assert text == final.text == "echo: stream this text back"
    assert final.usage.output_tokens == len(text.split()) and not final.usage.estimated
    assert rig.wait_entry(final.request_id).cost_nanos == final.cost_nanos > 0


@pytest.mark.parametrize("alias", ["cached-openai", "cached-anthropic", "cached-gemini"])
def test_cached_input_tokens_are_reported_and_charged_at_the_cached_price(rig: Rig, alias: str) -> None:
    """A follow-up turn: each fake reports the earlier turns as cached input in its own wire
    format (OpenAI prompt_tokens_details, Anthropic cache_read_input_tokens, Gemini
    cachedContentTokenCount). The router passes the count on and the ledger charges those
    tokens at the cached price, unary and streamed."""
    rig.ledger_op.SetPrices(ledger_pb2.SetPricesRequest(
        request_id=f"cached-price-{uuid.uuid4().hex}",
        prices=[ledger_pb2.ModelPrice(model="fake-cached", input_per_mtok_nanos=1_000_000_000,
                                      output_per_mtok_nanos=2_000_000_000, cached_input_per_mtok_nanos=100_000_000)],
    ), timeout=10)

    def up(tokens: int, per_mtok: int) -> int:
        return (tokens * per_mtok + 999_999) // 1_000_000

    def conversation() -> router_pb2.GenerateRequest:
        answer = router_pb2.Message(role=router_pb2.ROLE_ASSISTANT)
        answer.parts.add(text="it routes calls and keeps every team inside its budget")
        turns = [_user("tell me about the gateway and its budgets please"), answer,
                 _user("what did we say about the gateway before")]
        return router_pb2.GenerateRequest(model=alias, messages=turns, max_output_tokens=64)

    resp = rig.stub.Generate(conversation(), timeout=15)
    msgs = list(rig.stub.GenerateStream(conversation(), timeout=15))
    final = msgs[-1].final
    for rid, usage, cost in ((resp.request_id, resp.usage, resp.cost_nanos),
                             (final.request_id, final.usage, final.cost_nanos)):
        assert 0 < usage.cached_input_tokens < usage.input_tokens
        entry = rig.wait_entry(rid)
        # Priced at its hold's catalogue version: this one, or (a busy key's budget slice pins its
        # version until it retires) an earlier one holding the same prices.
        held_at = {p.model: p for p in rig.ledger_op.ListPrices(
            ledger_pb2.ListPricesRequest(version=entry.price_version), timeout=10).prices}["fake-cached"]
        assert (held_at.input_per_mtok_nanos, held_at.output_per_mtok_nanos, held_at.cached_input_per_mtok_nanos) == (
            1_000_000_000, 2_000_000_000, 100_000_000)
        assert entry.price_version >= 1 and entry.model == "fake-cached"
        assert (entry.usage.input_tokens, entry.usage.cached_input_tokens, entry.usage.output_tokens) == (
            usage.input_tokens, usage.cached_input_tokens, usage.output_tokens)
        expected = (up(usage.input_tokens - usage.cached_input_tokens, 1_000_000_000)
                    + up(usage.cached_input_tokens, 100_000_000) + up(usage.output_tokens, 2_000_000_000))
        assert entry.cost_nanos == cost == expected
        # Cheaper than the same tokens at the full input price: the cached price was applied.
        assert expected < up(usage.input_tokens, 1_000_000_000) + up(usage.output_tokens, 2_000_000_000)


@pytest.mark.parametrize("alias", ["openai-first", "anthropic-first", "gemini-first"])
def test_tool_calls_come_back_unary_and_streamed(rig: Rig, alias: str) -> None:
    tool = router_pb2.ToolDefinition(name="get_weather", description="weather by city",
                                     parameters_json_schema='{"type":"object","properties":{"city":{"type":"string"}}}')
    resp = rig.stub.Generate(_req(alias, "what is the weather in Paris", tools=[tool]), timeout=15)
    assert resp.finish_reason == router_pb2.FINISH_REASON_TOOL_CALLS
    assert [(c.name, json.loads(c.arguments_json)) for c in resp.tool_calls] == [("get_weather", {"city": "Paris"})]
    msgs = list(rig.stub.GenerateStream(_req(alias, "what is the weather in Paris", tools=[tool]), timeout=15))
    deltas = [m.tool_call_delta for m in msgs if m.WhichOneof("event") == "tool_call_delta"]
    # OpenAI and Anthropic stream arguments in fragments; Gemini sends each call whole.
    assert len(deltas) >= (1 if alias == "gemini-first" else 2)
    assert json.loads("".join(d.arguments_fragment for d in deltas)) == {"city": "Paris"}
    final = msgs[-1].final
    assert final.tool_calls[0].name == "get_weather" and json.loads(final.tool_calls[0].arguments_json) == {
        "city": "Paris"}


@pytest.mark.parametrize(("fault", "outcome"), [
    ({"status": 429, "retry_after": 0}, router_pb2.ATTEMPT_OUTCOME_RATE_LIMITED),
    ({"status": 500}, router_pb2.ATTEMPT_OUTCOME_SERVER_ERROR),
    ({"status": 503}, router_pb2.ATTEMPT_OUTCOME_OVERLOADED),
    ({"mode": "hang"}, router_pb2.ATTEMPT_OUTCOME_TIMEOUT),
    ({"mode": "malformed_json"}, router_pb2.ATTEMPT_OUTCOME_PROTOCOL_ERROR),
])
def test_retryable_failures_fall_back_to_the_next_deployment(rig: Rig, fault: dict[str, Any], outcome: int) -> None:
    _fake(rig.fakes["fake-openai"], "POST", "/_fake/faults", [{**fault, "match_model": "fake-small", "times": 1}])
    resp = rig.stub.Generate(_req("openai-first"), timeout=15)
    assert resp.served_by.deployment == "ge"
    assert [a.outcome for a in resp.attempts] == [outcome, router_pb2.ATTEMPT_OUTCOME_SUCCESS]


def test_anthropic_overloaded_529_falls_back(rig: Rig) -> None:
    _fake(rig.fakes["fake-anthropic"], "POST", "/_fake/faults", [{"status": 529, "times": 1}])
    resp = rig.stub.Generate(_req("anthropic-first"), timeout=15)
    assert resp.served_by.deployment == "oa"
    assert resp.attempts[0].outcome == router_pb2.ATTEMPT_OUTCOME_OVERLOADED and resp.attempts[0].http_status == 529


def test_connection_refused_falls_back(rig: Rig) -> None:
    resp = rig.stub.Generate(_req("dead-first"), timeout=15)
    assert resp.served_by.deployment == "oa"
    assert resp.attempts[0].outcome == router_pb2.ATTEMPT_OUTCOME_CONNECT_ERROR


@pytest.mark.parametrize(("fault", "code", "reason"), [
    ({"status": 400}, grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_BAD_REQUEST"),
    ({"status": 400, "error_type": "content_policy_violation"}, grpc.StatusCode.FAILED_PRECONDITION,
     "CONTENT_REFUSED"),
])
def test_bad_request_and_content_refusal_do_not_fall_back(
    rig: Rig, fault: dict[str, Any], code: grpc.StatusCode, reason: str
) -> None:
    before = rig.requests_seen("fake-gemini")
    _fake(rig.fakes["fake-openai"], "POST", "/_fake/faults", [{**fault, "match_model": "fake-small", "times": 1}])
    with pytest.raises(grpc.RpcError) as exc:
        rig.stub.Generate(_req("openai-first"), timeout=15)
    assert exc.value.code() == code
    assert error_info_from_rpc_error(exc.value).reason == reason
    assert rig.requests_seen("fake-gemini") == before


def test_context_too_long_falls_back_only_to_a_larger_window(rig: Rig) -> None:
    _fake(rig.fakes["fake-anthropic"], "POST", "/_fake/faults",
          [{"status": 400, "match_model": "fake-ctx", "error_type": "invalid_request_error",
            "message": "prompt is too long: 5000 tokens > 1000 maximum", "times": 1}])
    resp = rig.stub.Generate(_req("ctx"), timeout=15)
    # ge-tiny (800) is no larger than the window that overflowed (1000): never tried, although it
    # comes next. oa has the default 128k window, so it is allowed and serves.
    assert [(a.deployment, a.outcome) for a in resp.attempts] == [
        ("an-small-window", router_pb2.ATTEMPT_OUTCOME_CONTEXT_TOO_LONG), ("oa", router_pb2.ATTEMPT_OUTCOME_SUCCESS)]
    assert resp.served_by.deployment == "oa"


def test_retry_after_is_honoured_before_retrying_the_same_deployment(rig: Rig) -> None:
    _fake(rig.fakes["fake-openai"], "POST", "/_fake/faults",
          [{"status": 429, "retry_after": 1, "match_model": "fake-solo", "times": 1}])
    t0 = time.monotonic()
    resp = rig.stub.Generate(_req("solo"), timeout=15)
    elapsed = time.monotonic() - t0
    assert [a.outcome for a in resp.attempts] == [router_pb2.ATTEMPT_OUTCOME_RATE_LIMITED,
                                                  router_pb2.ATTEMPT_OUTCOME_SUCCESS]
    assert resp.attempts[0].retry_after.seconds == 1
    assert 1.0 <= elapsed < 2.5


def _own_router(rig: Rig, tmp_path: Path, config_text: str) -> ServiceProcess:
    cfg = tmp_path / "router.yaml"
    cfg.write_text(config_text)
    env = {**tls_env(rig.gw.pki, "router"), "IGW_ROUTER_CONFIG": str(cfg),
           "IGW_LEDGER_ADDR": rig.gw.addr("ledger"), "IGW_KEYVAULT_ADDR": rig.gw.addr("keyvault")}
    return start_service("router", env, tmp_path)


def test_breaker_opens_after_the_threshold_half_opens_after_cooldown_and_recovers(rig: Rig, tmp_path: Path) -> None:
    # A router of its own, with a low threshold, so other tests' failures do not count.
    proc = _own_router(rig, tmp_path, rig.config.read_text().replace("failure_threshold: 1000", "failure_threshold: 3"))
    try:
        with mtls_channel(proc.address, rig.gw.pki, "agent-demo-quickstart") as ach, \
                mtls_channel(proc.address, rig.gw.pki, "operator-admin") as och:
            _breaker_walk(rig, router_pb2_grpc.RouterServiceStub(ach), router_pb2_grpc.RouterAdminServiceStub(och))
    finally:
        proc.terminate()


def _breaker_walk(rig: Rig, stub: Any, admin: Any) -> None:
    ge = rig.fakes["fake-gemini"]
    _fake(ge, "POST", "/_fake/faults", [{"status": 500, "match_model": "fake-breaker"}])
    # max_attempts=3 against one deployment: three failures in one call trip it (threshold 3).
    with pytest.raises(grpc.RpcError):
        stub.Generate(_req("breaker"), timeout=15)
    deps = {d.name: d for d in admin.ListDeployments(router_pb2.ListDeploymentsRequest(), timeout=5).deployments}
    assert deps["br"].breaker_state == router_pb2.BREAKER_STATE_OPEN
    seen = rig.requests_seen("fake-gemini")
    with pytest.raises(grpc.RpcError) as exc:
        stub.Generate(_req("breaker"), timeout=15)
    assert error_info_from_rpc_error(exc.value).reason == "ALL_BREAKERS_OPEN"
    assert rig.requests_seen("fake-gemini") == seen  # skipped without calling upstream
    # The probe after the cooldown hangs; it must not wedge the breaker.
    _fake(ge, "POST", "/_fake/faults", [{"mode": "hang", "match_model": "fake-breaker"}])
    time.sleep(1.6)
    with pytest.raises(grpc.RpcError):
        stub.Generate(_req("breaker"), timeout=15)
    _fake(ge, "DELETE", "/_fake/faults")
    deadline = time.monotonic() + 10
    while True:
        try:
            resp = stub.Generate(_req("breaker"), timeout=15)
            break
        except grpc.RpcError:
            assert time.monotonic() < deadline, "breaker never recovered"
            time.sleep(0.3)
    assert resp.served_by.deployment == "br"
    deps = {d.name: d for d in admin.ListDeployments(router_pb2.ListDeploymentsRequest(), timeout=5).deployments}
    assert deps["br"].breaker_state == router_pb2.BREAKER_STATE_CLOSED


def test_exhausted_budget_refuses_with_remaining_and_makes_no_upstream_call(rig: Rig) -> None:
    team = f"broke{uuid.uuid4().hex[:6]}"
    pki_mod.issue_to_dir(rig.gw.pki, "agent", team, "a1")
    rig.ledger_op.SetBudget(ledger_pb2.SetBudgetRequest(team=team, window=ledger_pb2.BUDGET_WINDOW_DAILY,
                                                        limit_nanos=10), timeout=10)
    before = rig.requests_seen("fake-openai")
    with mtls_channel(rig.router.address, rig.gw.pki, f"agent-{team}-a1") as ch:
        with pytest.raises(grpc.RpcError) as exc:
            router_pb2_grpc.RouterServiceStub(ch).Generate(_req("openai-first"), timeout=15)
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info_from_rpc_error(exc.value)
    assert info.reason == "BUDGET_EXCEEDED" and "remaining_nanos" in info.metadata
    assert rig.requests_seen("fake-openai") == before


def test_a_lease_for_another_url_than_the_allowlisted_one_is_never_used(rig: Rig) -> None:
    _fake(rig.evil.root_url, "DELETE", "/_fake/requests")
    resp = rig.stub.Generate(_req("mismatch-first"), timeout=15)
    assert [(a.deployment, a.outcome) for a in resp.attempts] == [
        ("mm", router_pb2.ATTEMPT_OUTCOME_NO_CREDENTIAL), ("oa", router_pb2.ATTEMPT_OUTCOME_SUCCESS)]
    assert _fake(rig.evil.root_url, "GET", "/_fake/requests") == []  # the key's own URL saw nothing


def test_the_router_checks_the_ledger_and_the_vault_with_grpcs_own_tls_on_igw_pki_certificates(rig: Rig) -> None:
    # igw pki states each service's identity as a DNS name too, so after one probe handshake (the
    # tunnel's full check) the router reaches both without the Python tunnel (upstream_tls.py).
    added = [json.loads(line) for line in rig.router.log_text().splitlines()
             if line.startswith("{") and '"replica added"' in line]
    assert sorted(e["service"] for e in added) == ["keyvault", "ledger"]
    assert {e["identity_check"] for e in added} == {"native"}
    assert "server identity refused" not in rig.router.log_text()


def test_the_agents_client_checks_the_router_with_grpcs_own_tls_on_igw_pki_certificates(rig: Rig) -> None:
    team = f"cli{uuid.uuid4().hex[:6]}"
    cert, key = pki_mod.issue_to_dir(rig.gw.pki, "agent", team, "a1")
    kw = {"addresses": [rig.router.address], "cert": cert, "key": key, "ca": rig.gw.pki / "ca.pem",
          "max_attempts": 1, "timeout": 15}
    for check, mode in (("auto", "native"), ("uri", "tunnel")):
        with IgwClient(**kw, identity_check=check) as client:
            assert "openai-first" in {m.alias for m in client.list_models().models}
            assert client._links[0].mode == mode


def test_list_models_shows_the_teams_aliases_with_prices_and_capabilities(rig: Rig) -> None:
    models = {m.alias: m for m in rig.stub.ListModels(router_pb2.ListModelsRequest(), timeout=10).models}
    assert "other-team-only" not in models and {"openai-first", "ctx", "solo"} <= set(models)
    ctx = {c.deployment: c for c in models["ctx"].candidates}
    assert list(ctx) == ["an-small-window", "ge-tiny", "oa", "ge-big"]
    assert ctx["an-small-window"].context_window == 1000 and ctx["ge-big"].context_window == 2_000_000
    assert ctx["oa"].provider == "fake-openai" and ctx["oa"].provider_model == "fake-small"
    assert ctx["oa"].price.input_per_mtok_nanos > 0 and ctx["oa"].price.output_per_mtok_nanos > 0
    assert ctx["oa"].supports_streaming


def test_get_budget_returns_the_callers_own_team_budget(rig: Rig) -> None:
    team = f"own{uuid.uuid4().hex[:6]}"
    pki_mod.issue_to_dir(rig.gw.pki, "agent", team, "a1")
    rig.ledger_op.SetBudget(ledger_pb2.SetBudgetRequest(team=team, window=ledger_pb2.BUDGET_WINDOW_MONTHLY,
                                                        limit_nanos=7_000_000_000), timeout=10)
    with mtls_channel(rig.router.address, rig.gw.pki, f"agent-{team}-a1") as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        resp = stub.Generate(_req("openai-first"), timeout=15)
        time.sleep(0.5)  # the settle follows the answer
        budgets = stub.GetBudget(router_pb2.GetBudgetRequest(), timeout=10).budgets
    assert [(b.team, b.window, b.limit_nanos) for b in budgets] == [
        (team, ledger_pb2.BUDGET_WINDOW_MONTHLY, 7_000_000_000)]
    assert budgets[0].spent_nanos == resp.cost_nanos > 0
    assert budgets[0].remaining_nanos == 7_000_000_000 - resp.cost_nanos
    # The demo agent sees its own team's budgets, never this one.
    assert all(b.team != team for b in rig.stub.GetBudget(router_pb2.GetBudgetRequest(), timeout=10).budgets)


def test_an_alias_of_another_team_is_refused(rig: Rig) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        rig.stub.Generate(_req("other-team-only"), timeout=15)
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_agent_cancel_mid_stream_cancels_upstream_and_settles_once(rig: Rig) -> None:
    oa = rig.fakes["fake-openai"]
    _fake(oa, "POST", "/_fake/faults", [{"mode": "endless", "interval_ms": 200, "match_model": "fake-solo"}])
    cancelled_before = _fake(oa, "GET", "/_fake/stats").get("cancelled_streams", 0)
    rid = uuid.uuid4().hex
    call = rig.stub.GenerateStream(_req("solo", "one two three four five six seven eight", request_id=rid),
                                   timeout=30)
    got = []
    for msg in call:
        got.append(msg)
        if len(got) >= 3:
            break
    call.cancel()
    deadline = time.monotonic() + 1.5
    while _fake(oa, "GET", "/_fake/stats").get("cancelled_streams", 0) == cancelled_before:
        assert time.monotonic() < deadline, "upstream stream was not cancelled within a second"
        time.sleep(0.05)
    entry = rig.wait_entry(rid)
    assert entry.outcome == ledger_pb2.CALL_OUTCOME_CANCELLED and entry.usage.output_tokens > 0
    time.sleep(0.5)
    assert len(rig.entries(rid)) == 1


def test_nothing_in_a_request_can_redirect_a_call(rig: Rig) -> None:
    evil_root = rig.evil.root_url
    _fake(evil_root, "DELETE", "/_fake/requests")
    # 1. A base URL in metadata.
    resp = rig.stub.Generate(_req("openai-first"), timeout=15,
                             metadata=(("x-base-url", evil_root + "/v1"), ("host", "evil.example"),
                                       ("x-forwarded-host", "evil.example")))
    assert resp.served_by.deployment == "oa"
    # 2. A base URL in an unknown field (field 99) of the request.
    raw = _req("openai-first").SerializeToString()
    url = (evil_root + "/v1").encode()
    raw += bytes([0x9A, 0x06, len(url)]) + url  # field 99, wire type 2
    call = rig.agent_ch.unary_unary("/igw.router.v1.RouterService/Generate", request_serializer=lambda b: b,
                                    response_deserializer=router_pb2.GenerateResponse.FromString)
    assert call(raw, timeout=15).served_by.deployment == "oa"
    # 3. Model names with URL-significant characters.
    for name in ("oa/../evil", "oa#frag", "user@evil.example", "oa%2Fevil", "http://evil.example/v1"):
        with pytest.raises(grpc.RpcError) as exc:
            rig.stub.Generate(_req(name), timeout=15)
        assert exc.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
    # 4. An upstream that answers with a redirect to the evil host.
    _fake(rig.fakes["fake-openai"], "POST", "/_fake/faults",
          [{"mode": "redirect", "location": evil_root + "/v1/chat/completions", "match_model": "fake-small",
            "times": 1}])
    resp = rig.stub.Generate(_req("openai-first"), timeout=15)
    assert resp.attempts[0].outcome == router_pb2.ATTEMPT_OUTCOME_PROTOCOL_ERROR
    assert _fake(evil_root, "GET", "/_fake/requests") == [] or _fake(evil_root, "GET", "/_fake/requests").get(
        "requests", []) == []
    # And no client metadata travelled upstream.
    seen = _fake(rig.fakes["fake-openai"], "GET", "/_fake/requests")
    reqs = seen["requests"] if isinstance(seen, dict) else seen
    assert reqs and all("x-base-url" not in {k.lower() for k in r["headers"]} for r in reqs)


def test_a_pinned_config_refuses_a_changed_file_and_a_broken_reload_keeps_the_old_one(
    rig: Rig, tmp_path: Path
) -> None:
    cfg = tmp_path / "router.yaml"
    cfg.write_bytes(rig.config.read_bytes())
    digest = hashlib.sha256(cfg.read_bytes()).hexdigest()
    env = {**tls_env(rig.gw.pki, "router"), "IGW_ROUTER_CONFIG": str(cfg), "IGW_ROUTER_CONFIG_SHA256": digest,
           "IGW_LEDGER_ADDR": rig.gw.addr("ledger"), "IGW_KEYVAULT_ADDR": rig.gw.addr("keyvault")}
    proc = start_service("router", env, tmp_path / "a")
    try:
        with mtls_channel(proc.address, rig.gw.pki, "operator-admin") as ch:
            admin = router_pb2_grpc.RouterAdminServiceStub(ch)
            assert admin.GetConfig(router_pb2.GetConfigRequest(), timeout=5).sha256 == digest
            cfg.write_bytes(cfg.read_bytes() + b"\n# tampered\n")
            with pytest.raises(grpc.RpcError) as exc:
                admin.ReloadConfig(router_pb2.ReloadConfigRequest(), timeout=5)
            assert error_info_from_rpc_error(exc.value).reason == "CONFIG_INVALID"
            got = admin.GetConfig(router_pb2.GetConfigRequest(), timeout=5)
            assert got.sha256 == digest and "pinned" in got.last_reload_error
        with mtls_channel(proc.address, rig.gw.pki, "agent-demo-quickstart") as ch:
            assert router_pb2_grpc.RouterServiceStub(ch).Generate(_req("openai-first"), timeout=15).text
    finally:
        proc.terminate()
    # A pinned digest that does not match at start: the router refuses to start.
    with pytest.raises(ServiceStartError):
        start_service("router", env, tmp_path / "b", timeout=20)
    # Unpinned: a broken file on reload keeps the old config serving.
    env.pop("IGW_ROUTER_CONFIG_SHA256")
    cfg.write_bytes(rig.config.read_bytes())
    proc = start_service("router", env, tmp_path / "c")
    try:
        cfg.write_text("providers: [this is: not valid")
        with mtls_channel(proc.address, rig.gw.pki, "operator-admin") as ch:
            with pytest.raises(grpc.RpcError) as exc:
                router_pb2_grpc.RouterAdminServiceStub(ch).ReloadConfig(router_pb2.ReloadConfigRequest(), timeout=5)
            assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with mtls_channel(proc.address, rig.gw.pki, "agent-demo-quickstart") as ch:
            assert router_pb2_grpc.RouterServiceStub(ch).Generate(_req("openai-first"), timeout=15).text
        assert "config reload rejected" in proc.log_text()
    finally:
        proc.terminate()


def _edge_calls(rig: Rig, prompt: str) -> list[str]:
    """The canary calls again through the HTTPS edge (OpenAI and Anthropic dialects); returns error texts."""
    pki = rig.gw.pki
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    ctx.load_cert_chain(str(pki / "agent-demo-quickstart.pem"), str(pki / "agent-demo-quickstart-key.pem"))
    base = f"https://127.0.0.1:{rig.router.http_port}"
    chat = {"model": "canary-solo", "max_tokens": 32, "messages": [{"role": "user", "content": prompt}]}
    errors: list[str] = []
    _fake(rig.canary.root_url, "DELETE", "/_fake/faults")
    with httpx.Client(verify=ctx, timeout=30) as http:
        assert http.post(f"{base}/v1/chat/completions", json=chat).json()["igw"]["served_by"]["deployment"] == "can"
        assert "[DONE]" in http.post(f"{base}/v1/chat/completions", json={**chat, "stream": True}).text
        assert http.post(f"{base}/v1/messages", json=chat).status_code == 200
        for fault in ({"mode": "echo_key_error", "status": 400}, {"mode": "hang"}, {"status": 500},
                      {"mode": "echo_key_error", "status": 401}):
            for path in ("/v1/chat/completions", "/v1/messages"):
                for stream in (False, True):
                    _fake(rig.canary.root_url, "POST", "/_fake/faults", [fault])
                    resp = http.post(base + path, json={**chat, "stream": stream})
                    assert resp.status_code >= 400, resp.text
                    errors.append(resp.text + repr(dict(resp.headers)))
        # A provider stream that breaks after the first bytes: the error arrives inside the stream.
        _fake(rig.canary.root_url, "POST", "/_fake/faults", [{"mode": "stream_error"}])
        errors.append(http.post(f"{base}/v1/messages", json={**chat, "stream": True}).text)
    return errors


def test_the_canary_key_never_reaches_logs_errors_or_metrics(rig: Rig) -> None:
    forms = {CANARY, base64.b64encode(CANARY.encode()).decode(), json.dumps(CANARY)[1:-1],
             CANARY.replace("-", "\\u002d")}
    prompt = f"prompt-canary-{uuid.uuid4().hex}"
    errors: list[str] = []
    # Success.
    assert rig.stub.Generate(_req("canary-solo"), timeout=15).served_by.deployment == "can"
    list(rig.stub.GenerateStream(_req("canary-solo"), timeout=15))
    # Fallback after a provider error that echoes the key (like OpenAI's 401 body does).
    _fake(rig.canary.root_url, "POST", "/_fake/faults", [{"mode": "echo_key_error", "status": 401, "times": 1}])
    resp = rig.stub.Generate(_req("canary"), timeout=15)
    assert resp.served_by.deployment == "oa"
    # Provider error without fallback, and a timeout.
    for fault in ({"mode": "echo_key_error", "status": 400}, {"mode": "hang"}, {"status": 500}):
        _fake(rig.canary.root_url, "POST", "/_fake/faults", [fault])
        with pytest.raises(grpc.RpcError) as exc:
            rig.stub.Generate(_req("canary-solo"), timeout=15)
        errors.append(exc.value.details() or "")
        errors.append(repr(exc.value.trailing_metadata()))
    # The same through the HTTPS edge: its error bodies, headers and in-stream errors.
    errors += _edge_calls(rig, prompt)
    metrics = "".join(httpx.get(u, timeout=10).text for u in rig.gw.endpoints["metrics"].values())
    metrics += httpx.get(f"http://127.0.0.1:{rig.router.metrics_port}/metrics", timeout=10).text
    assert 'igw_http_server_handled_total{api="openai",route="chat.completions",status="200"}' in metrics
    assert 'igw_http_server_handled_total{api="anthropic",route="messages",status="400"}' in metrics
    # The vault's audit log, with how each canary lease ended (used, returned), carries no secret either.
    vault_admin = keyvault_pb2_grpc.KeyVaultAdminServiceStub(rig.gw.channel("keyvault"))
    deadline = time.monotonic() + 10
    while True:
        audit = vault_admin.ListAuditEvents(keyvault_pb2.ListAuditEventsRequest(page_size=1000), timeout=10)
        ends = [e for e in audit.events if e.provider == "canary" and e.action == keyvault_pb2.AUDIT_ACTION_LEASE_USED]
        if len(ends) >= 6 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(ends) >= 6  # two successes, one fallback, three failures: each lease was used
    haystacks = {"errors": "\n".join(errors), "metrics": metrics, "router log": rig.router.log_text(),
                 "gateway logs": rig.gw.all_logs(), "audit": str(audit)}
    for where, text in haystacks.items():
        for form in forms:
            assert form not in text, f"canary found in {where}"
        assert prompt not in text, f"the prompt found in {where}"
    assert '"route": "chat.completions"' in rig.router.log_text()  # the edge does log its requests
    # And the canary really was used upstream (the test is not vacuous).
    assert _fake(rig.canary.root_url, "GET", "/_fake/stats").get("requests", 0) > 0


def test_overload_is_refused_fast_instead_of_queueing(rig: Rig, tmp_path: Path) -> None:
    proc = _own_router(rig, tmp_path, rig.config.read_text() + "limits: {max_in_flight: 2}\n")
    _fake(rig.fakes["fake-openai"], "POST", "/_fake/faults",
          [{"mode": "ok", "delay_ms": 1500, "match_model": "fake-small"}])
    results: list[Any] = []
    try:
        with mtls_channel(proc.address, rig.gw.pki, "agent-demo-quickstart") as ch:
            stub = router_pb2_grpc.RouterServiceStub(ch)

            def one() -> None:
                try:
                    results.append(stub.Generate(_req("openai-first"), timeout=15))
                except grpc.RpcError as err:
                    results.append(err)

            threads = [threading.Thread(target=one) for _ in range(5)]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        proc.terminate()
    refused = [r for r in results if isinstance(r, grpc.RpcError)]
    assert len(refused) == 3 and all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
    assert len(results) - len(refused) == 2
    assert time.monotonic() - t0 < 10


def test_sighup_reloads_a_changed_config_and_the_new_alias_serves(rig: Rig, tmp_path: Path) -> None:
    import signal as _signal

    proc = _own_router(rig, tmp_path, rig.config.read_text())
    cfg = Path(proc.env["IGW_ROUTER_CONFIG"])
    try:
        with mtls_channel(proc.address, rig.gw.pki, "operator-admin") as och, \
                mtls_channel(proc.address, rig.gw.pki, "agent-demo-quickstart") as ach:
            admin = router_pb2_grpc.RouterAdminServiceStub(och)
            old = admin.GetConfig(router_pb2.GetConfigRequest(), timeout=5).sha256
            cfg.write_text(cfg.read_text().replace("models:\n", "models:\n  added-later: {candidates: [oa]}\n", 1))
            proc.proc.send_signal(_signal.SIGHUP)
            deadline = time.monotonic() + 10
            while admin.GetConfig(router_pb2.GetConfigRequest(), timeout=5).sha256 == old:
                assert time.monotonic() < deadline, "SIGHUP did not reload the config"
                time.sleep(0.1)
            got = admin.GetConfig(router_pb2.GetConfigRequest(), timeout=5)
            assert got.sha256 == hashlib.sha256(cfg.read_bytes()).hexdigest() and "added-later" in got.aliases
            resp = router_pb2_grpc.RouterServiceStub(ach).Generate(_req("added-later"), timeout=15)
            assert resp.served_by.deployment == "oa"
            # The config-digest metric follows: the new digest reads 1, the old one is gone.
            metrics = httpx.get(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=10).text
            assert f'igw_router_config_info{{sha256="{got.sha256}"}} 1.0' in metrics
            assert old not in metrics
    finally:
        proc.terminate()


def test_the_agent_deadline_bounds_the_upstream_call(rig: Rig) -> None:
    _fake(rig.fakes["fake-openai"], "POST", "/_fake/faults", [{"mode": "hang", "match_model": "fake-solo"}])
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as exc:
        rig.stub.Generate(_req("solo"), timeout=0.7)
    elapsed = time.monotonic() - t0
    assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 1.2  # not the 1.5 s first-byte timeout, not a retry round


def test_generate_stream_falls_back_before_the_first_byte(rig: Rig) -> None:
    _fake(rig.fakes["fake-openai"], "POST", "/_fake/faults",
          [{"status": 429, "retry_after": 0, "match_model": "fake-small", "match_stream": True, "times": 1}])
    msgs = list(rig.stub.GenerateStream(_req("openai-first", "stream this text back"), timeout=15))
    assert msgs[0].WhichOneof("event") == "start" and msgs[0].start.served_by.deployment == "ge"
    final = msgs[-1].final
    assert final.text == "echo: stream this text back" and final.served_by.deployment == "ge"
    assert [a.outcome for a in final.attempts] == [router_pb2.ATTEMPT_OUTCOME_RATE_LIMITED,
                                                   router_pb2.ATTEMPT_OUTCOME_SUCCESS]
    # Nothing of the failed attempt reached the agent, and only the serving attempt is charged.
    assert sum(m.WhichOneof("event") == "start" for m in msgs) == 1
    entry = rig.wait_entry(final.request_id)
    assert entry.provider == "fake-gemini" and entry.cost_nanos == final.cost_nanos > 0


@pytest.mark.parametrize(("alias", "fake", "model"), [
    ("anthropic-first", "fake-anthropic", "fake-large"), ("gemini-first", "fake-gemini", "fake-small"),
])
def test_a_provider_that_reports_no_usage_is_counted_from_the_text(rig: Rig, alias: str, fake: str, model: str) -> None:
    _fake(rig.fakes[fake], "POST", "/_fake/faults", [{"mode": "no_usage", "match_model": model, "times": 2}])
    resp = rig.stub.Generate(_req(alias, "count me without usage"), timeout=15)
    assert resp.text == "echo: count me without usage" and resp.usage.estimated
    assert [a.outcome for a in resp.attempts] == [router_pb2.ATTEMPT_OUTCOME_SUCCESS]
    # The stream that sent all its text ends with a final answer, not UPSTREAM_STREAM_BROKEN.
    msgs = list(rig.stub.GenerateStream(_req(alias, "stream me without usage"), timeout=15))
    final = msgs[-1].final
    assert msgs[-1].WhichOneof("event") == "final" and final.text == "echo: stream me without usage"
    assert final.usage.estimated and final.usage.output_tokens > 0 and final.usage.input_tokens > 0
    for rid, cost in ((resp.request_id, resp.cost_nanos), (final.request_id, final.cost_nanos)):
        entry = rig.wait_entry(rid)
        assert entry.outcome == ledger_pb2.CALL_OUTCOME_SUCCESS and entry.cost_nanos == cost > 0
        assert ledger_pb2.SPEND_FLAG_USAGE_ESTIMATED in entry.flags


def test_an_orphan_tool_result_is_refused_before_any_hold_or_upstream_call(rig: Rig) -> None:
    team = f"orphan{uuid.uuid4().hex[:6]}"
    pki_mod.issue_to_dir(rig.gw.pki, "agent", team, "a1")
    rig.ledger_op.SetBudget(ledger_pb2.SetBudgetRequest(team=team, window=ledger_pb2.BUDGET_WINDOW_DAILY,
                                                        limit_nanos=10**12), timeout=10)
    tool = router_pb2.Message(role=router_pb2.ROLE_TOOL, tool_call_id="call_nowhere")
    tool.parts.add(text='{"temp_c": 21}')
    req = _req("gemini-first")
    req.messages.append(tool)
    before = {f: rig.requests_seen(f) for f in ("fake-gemini", "fake-openai")}
    with mtls_channel(rig.router.address, rig.gw.pki, f"agent-{team}-a1") as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        for call in (stub.Generate, lambda r, timeout: list(stub.GenerateStream(r, timeout=timeout))):
            with pytest.raises(grpc.RpcError) as exc:
                call(req, timeout=15)
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error_info_from_rpc_error(exc.value).reason == "BAD_TOOL_RESULT"
            assert "temp_c" not in (exc.value.details() or "")
    ledger = ledger_pb2_grpc.LedgerServiceStub(rig.gw.channel("ledger"))
    (budget,) = ledger.GetBudget(ledger_pb2.GetBudgetRequest(team=team), timeout=10).budgets
    assert (budget.held_nanos, budget.spent_nanos) == (0, 0)
    assert {f: rig.requests_seen(f) for f in before} == before

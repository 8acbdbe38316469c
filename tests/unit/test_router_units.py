"""Router units: strict config validation, digest pinning, breaker state machine, request checks."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from igw.router.v1 import router_pb2
from services.common.errors import InvalidArgument
from services.common.money import call_cost
from services.router.breaker import Breaker, State
from services.router.routing import BreakerCfg, ConfigError, Limits, load_config, parse_config
from services.router.translate import prepare

GOOD = b"""
providers:
  p: {type: openai, base_url: "https://api.example.com/v1"}
  local: {type: openai_compatible, base_url: "http://127.0.0.1:8000/v1", local: true}
deployments:
  d1: {provider: p, model: gpt-x, price: gpt-x}
  d2: {provider: local, model: "meta-llama/Llama-3-8B", price: llama}
models:
  fast: {candidates: [d1, d2], strategy: priority, teams: [demo]}
"""


def test_a_valid_config_loads_with_its_sha256() -> None:
    cfg = parse_config(GOOD)
    assert cfg.sha256 == hashlib.sha256(GOOD).hexdigest()
    assert cfg.aliases["fast"].candidates == ("d1", "d2")
    assert cfg.aliases["fast"].allows("demo") and not cfg.aliases["fast"].allows("other")


@pytest.mark.parametrize(
    ("mutation", "needle"),
    [
        (lambda s: s.replace(b"models:", b"surprise: 1\nmodels:"), "unknown key"),
        (lambda s: s.replace(b"strategy: priority", b"strategy: random"), "strategy"),
        (lambda s: s.replace(b"https://api.example.com/v1", b"http://api.example.com/v1"), "https"),
        (lambda s: s.replace(b"https://api.example.com/v1", b"http://api.example.com/v1"), "must be https"),
        (lambda s: s.replace(b"https://api.example.com/v1", b"https://user:pw@api.example.com/v1"), "credentials"),
        (lambda s: s.replace(b"model: gpt-x", b"model: gpt-x/../admin"), "safe name"),
        (lambda s: s.replace(b"model: gpt-x", b"model: \"gpt#x\""), "safe name"),
        (lambda s: s.replace(b"model: gpt-x", b"model: \"gpt@evil\""), "safe name"),
        (lambda s: s.replace(b"model: gpt-x", b"model: \"gpt%2Fx\""), "safe name"),
        # Exactly what the adapters refuse (check_body_model): no empty path segment, no trailing slash.
        (lambda s: s.replace(b"meta-llama/Llama-3-8B", b"meta-llama//Llama-3-8B"), "safe name"),
        (lambda s: s.replace(b"meta-llama/Llama-3-8B", b"meta-llama/"), "safe name"),
        (lambda s: s.replace(b"[d1, d2]", b"[d1, nope]"), "unknown deployment"),
        (lambda s: s + b"retries: {max_attempts: 0}\n", "max_attempts"),
        (lambda s: s.replace(b"price: gpt-x}", b"price: gpt-x, base_url: 'https://evil'}"), "unknown key"),
    ],
)
def test_an_invalid_config_is_refused_with_a_reason(mutation, needle: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as exc:
        parse_config(mutation(GOOD))
    assert needle in str(exc.value)


def test_a_pinned_digest_refuses_a_changed_file(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_bytes(GOOD)
    digest = hashlib.sha256(GOOD).hexdigest()
    assert load_config(path, digest).sha256 == digest
    path.write_bytes(GOOD + b"\n# changed\n")
    with pytest.raises(ConfigError, match="pinned"):
        load_config(path, digest)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_at_the_threshold_and_half_opens_after_the_cooldown() -> None:
    clock = FakeClock()
    b = Breaker(BreakerCfg(failure_threshold=3, cooldown_ms=10_000, probe_timeout_ms=2_000), clock=clock)
    for _ in range(2):
        assert b.try_acquire() is True
        b.record_failure()
    assert b.state() is State.CLOSED
    b.record_failure()
    assert b.state() is State.OPEN and b.try_acquire() is False
    clock.now += 10
    assert b.state() is State.HALF_OPEN
    assert b.try_acquire() == "probe"
    assert b.try_acquire() is False  # only one probe at a time
    b.record_success(0.1)
    assert b.state() is State.CLOSED and b.failures == 0


def test_a_failed_probe_reopens_the_breaker() -> None:
    clock = FakeClock()
    b = Breaker(BreakerCfg(failure_threshold=1, cooldown_ms=1_000, probe_timeout_ms=500), clock=clock)
    b.record_failure()
    clock.now += 1
    assert b.try_acquire() == "probe"
    b.record_failure()
    assert b.state() is State.OPEN


def test_a_hanging_probe_does_not_wedge_the_breaker() -> None:
    clock = FakeClock()
    b = Breaker(BreakerCfg(failure_threshold=1, cooldown_ms=1_000, probe_timeout_ms=500), clock=clock)
    b.record_failure()
    clock.now += 1
    assert b.try_acquire() == "probe"  # this probe never returns
    clock.now += 0.6  # past the probe's own deadline
    assert b.try_acquire() is False  # counted failed: re-opened
    assert b.state() is State.OPEN
    clock.now += 1
    assert b.try_acquire() == "probe"  # and a new probe goes after the cooldown


def _req(**kw: object) -> router_pb2.GenerateRequest:
    req = router_pb2.GenerateRequest(model="fast", **kw)  # type: ignore[arg-type]
    if not req.messages:
        req.messages.add(role=router_pb2.ROLE_USER).parts.add(text="hello")
    return req


def _msg(role: int, text: str = "hi", **kw: object) -> router_pb2.Message:
    m = router_pb2.Message(role=role, **kw)  # type: ignore[arg-type]
    if text:
        m.parts.add(text=text)
    return m


def _call(call_id: str = "call_1") -> router_pb2.Message:
    return _msg(router_pb2.ROLE_ASSISTANT, "", tool_calls=[router_pb2.ToolCall(id=call_id, name="f")])


def _tool_result(call_id: str = "call_1") -> router_pb2.Message:
    return _msg(router_pb2.ROLE_TOOL, "{}", tool_call_id=call_id)


def test_the_prompt_bound_covers_every_byte_of_text() -> None:
    req = _req()
    req.messages.add(role=router_pb2.ROLE_USER).parts.add(text="é" * 100)
    prep = prepare(req, Limits())
    assert prep.prompt_tokens_upper_bound >= len(b"hello") + len(("é" * 100).encode())
    assert prep.chat.max_output_tokens == Limits().default_output_tokens


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda: router_pb2.GenerateRequest(model="fast"), "NO_MESSAGES"),
        (lambda: _req(max_output_tokens=10_000_000), "BAD_MAX_OUTPUT_TOKENS"),
        (lambda: _req(temperature=3.5), "BAD_TEMPERATURE"),
        (lambda: _req(stop=["a"] * 9), "BAD_STOP_SEQUENCES"),
        (lambda: _req(tools=[router_pb2.ToolDefinition(name="bad name!", parameters_json_schema="{}")]), "BAD_TOOL"),
        (lambda: _req(tools=[router_pb2.ToolDefinition(name="t", parameters_json_schema="[1]")]), "BAD_JSON"),
        (lambda: _req(tool_choice="nope"), "BAD_TOOL_CHOICE"),
        (lambda: _req(tools=[router_pb2.ToolDefinition(name="t", parameters_json_schema="[" * 100_000)]), "BAD_JSON"),
        # Names are checked for every role, not only tool results.
        (lambda: _req(messages=[_msg(router_pb2.ROLE_USER, name="al\x1bice")]), "BAD_NAME"),
        (lambda: _req(messages=[_msg(router_pb2.ROLE_SYSTEM, name="ops\n")]), "BAD_NAME"),
        (lambda: _req(messages=[_msg(router_pb2.ROLE_ASSISTANT, name="bob\u202e")]), "BAD_NAME"),
        (lambda: _req(messages=[_msg(router_pb2.ROLE_USER, name="x" * 65)]), "BAD_NAME"),
        # A tool result must answer an earlier assistant tool call (Gemini cannot send an orphan).
        (lambda: _req(messages=[_msg(router_pb2.ROLE_USER), _tool_result()]), "BAD_TOOL_RESULT"),
        (lambda: _req(messages=[_msg(router_pb2.ROLE_USER), _call("call_1"), _tool_result("call_2")]),
         "BAD_TOOL_RESULT"),
        (lambda: _req(messages=[_msg(router_pb2.ROLE_USER), _tool_result(), _call("call_1")]), "BAD_TOOL_RESULT"),
    ],
)
def test_bad_requests_are_refused_with_a_reason(build, reason: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgument) as exc:
        prepare(build(), Limits())
    assert exc.value.reason == reason


def test_tool_results_of_earlier_calls_and_printable_names_are_accepted() -> None:
    req = _req(messages=[_msg(router_pb2.ROLE_USER, name="Zoë Smith"), _call("call_1"), _tool_result("call_1"),
                         _msg(router_pb2.ROLE_ASSISTANT, "done", name="x" * 64)])
    prep = prepare(req, Limits())
    assert [m.role for m in prep.chat.messages] == ["user", "assistant", "tool", "assistant"]
    assert prep.chat.messages[0].name == "Zoë Smith"


def test_message_without_role_is_refused() -> None:
    req = router_pb2.GenerateRequest(model="fast")
    req.messages.add().parts.add(text="x")
    with pytest.raises(InvalidArgument, match="role"):
        prepare(req, Limits())


def test_cost_rounds_every_component_up_and_uses_integers_only() -> None:
    # 1 token at $0.10 per million = 100 nanos; 1 token at $0.15/M = 150 nanos.
    assert call_cost(1, 0, 0, 100_000_000, 400_000_000, 0) == 100
    assert call_cost(3, 1, 0, 1, 1, 0) == 2  # ceil(3/1e6) + ceil(1/1e6)
    assert call_cost(10, 0, 4, 1_000_000, 0, 500_000) == 6 + 2
    assert isinstance(call_cost(2**40, 2**40, 0, 10**12, 10**12, 0), int)


def _router_for(cfg_text: bytes):  # type: ignore[no-untyped-def]
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from services.router.metrics import RouterMetrics
    from services.router.service import Router

    backends = SimpleNamespace(ledger=None, ledger_admin=None, vault=None)
    return Router(parse_config(cfg_text), backends, http=None, metrics=RouterMetrics(CollectorRegistry()))  # type: ignore[arg-type]


STRATS = b"""
providers:
  p: {type: openai, base_url: "https://api.example.com/v1"}
deployments:
  pricey: {provider: p, model: a, price: pricey, weight: 1}
  cheap: {provider: p, model: b, price: cheap, weight: 0}
  mid: {provider: p, model: c, price: mid, weight: 3}
models:
  by-priority: {candidates: [pricey, cheap, mid]}
  by-cost: {candidates: [pricey, cheap, mid], strategy: cheapest}
  by-latency: {candidates: [pricey, cheap, mid], strategy: latency}
  by-weight: {candidates: [pricey, cheap, mid], strategy: weighted}
"""


def test_strategies_order_candidates_by_config_price_latency_and_weight() -> None:
    from igw.ledger.v1 import ledger_pb2
    from services.router.call.plan import order

    r = _router_for(STRATS)
    cfg = r.config
    prices = {
        "pricey": ledger_pb2.ModelPrice(model="pricey", input_per_mtok_nanos=10_000, output_per_mtok_nanos=50_000),
        "cheap": ledger_pb2.ModelPrice(model="cheap", input_per_mtok_nanos=1_000, output_per_mtok_nanos=2_000),
        "mid": ledger_pb2.ModelPrice(model="mid", input_per_mtok_nanos=5_000, output_per_mtok_nanos=5_000),
    }

    def names(alias: str) -> list[str]:
        return [d.name for d in order(cfg.aliases[alias], cfg, prices, r.breakers)]

    assert names("by-priority") == ["pricey", "cheap", "mid"]
    assert names("by-cost") == ["cheap", "mid", "pricey"]
    r.breakers["pricey"].record_success(0.300)
    r.breakers["cheap"].record_success(0.050)
    # "mid" is unobserved: tried first (explore), then by observed latency.
    assert names("by-latency") == ["mid", "cheap", "pricey"]
    # Weighted: weight 0 is never picked; "mid" (3) leads "pricey" (1) about 3 times in 4.
    firsts = [names("by-weight") for _ in range(2000)]
    assert all("cheap" not in order for order in firsts)
    share = sum(order[0] == "mid" for order in firsts) / len(firsts)
    assert 0.68 < share < 0.82


def test_a_local_provider_may_use_http_inside_the_cluster_but_a_remote_one_may_not() -> None:
    cluster = GOOD.replace(b"http://127.0.0.1:8000/v1", b"http://vllm.inference.svc:8000/v1")
    assert parse_config(cluster).providers["local"].base_url == "http://vllm.inference.svc:8000/v1"
    remote = GOOD.replace(b"local: true", b"local: false").replace(b"http://127.0.0.1", b"http://vllm.inference.svc")
    with pytest.raises(ConfigError, match="must be https"):
        parse_config(remote)


async def test_router_drain_sends_notes_then_settles_then_releases_slices_then_the_rest() -> None:
    # A slice's release makes the ledger forget its draws and settles go against the slice: the
    # draw notes go first, then the settles, then the slices are released; background releases
    # and lease ends last. Each step gets what is left of the one timeout.
    router = _router_for(STRATS)
    order: list[tuple[str, float]] = []

    def step(name: str):  # type: ignore[no-untyped-def]
        async def run(timeout: float) -> bool:
            order.append((name, timeout))
            return True
        return run

    router.notes.drain = step("notes")
    router.settler.drain = step("settles")
    router.slices.close = step("slices")
    router.background.wait = step("background")
    router.lease_ends.drain = step("lease_ends")
    await router.drain(5.0)
    assert [name for name, _ in order] == ["notes", "settles", "slices", "background", "lease_ends"]
    assert all(0 < t <= 5.0 for _, t in order)


def test_new_backends_reach_every_part_that_calls_the_ledger_or_the_vault() -> None:
    from types import SimpleNamespace

    r = _router_for(STRATS)
    ledger, admin, vault = object(), object(), object()
    r.backends = SimpleNamespace(ledger=ledger, ledger_admin=admin, vault=vault)  # type: ignore[assignment]
    assert r.holds.ledger is ledger
    assert (r.settler._ledger, r.slices._ledger, r.notes._ledger) == (ledger, ledger, ledger)
    assert r.prices.admin is admin
    assert (r.credentials.vault, r.lease_ends._vault) == (vault, vault)

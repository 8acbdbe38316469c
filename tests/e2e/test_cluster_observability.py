"""The ecosystem's observability conventions, on the real processes.

``process_*`` and ``igw_build_info{version,commit}`` on every service; an agent's ``traceparent``
(sent as call metadata through the typed client) becomes the parent of the gateway's spans;
RPC spans carry ``rpc.grpc.status_code``; the GenAI attributes are there; JSON log lines carry
the trace and span ids. No prompt and no key in any of it.
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from igw.client import ClientConfig, IgwClient, IgwError
from tests.e2e.conftest import Gateway, start_gateway, stop_gateway

PROMPT = "observability-canary-prompt-" + secrets.token_hex(4)


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory, pg: object) -> Iterator[tuple[Gateway, Path]]:
    state = tmp_path_factory.mktemp("obs")
    spans = state / "spans.jsonl"
    gw = start_gateway(state / "gw", pg, {"IGW_TRACE_FILE": str(spans)})
    try:
        yield gw, spans
    finally:
        stop_gateway(gw)


def _metrics(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def _spans(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _client(gw: Gateway) -> IgwClient:
    ep = gw.endpoints
    return IgwClient(ClientConfig([str(ep["router"])], str(ep["agent_cert"]), str(ep["agent_key"]), str(ep["ca"]),
                                  max_attempts=1))


def test_every_service_exports_process_metrics_and_its_build(traced: tuple[Gateway, Path]) -> None:
    gw, _ = traced
    for name in ("router", "ledger", "keyvault"):
        text = _metrics(gw.endpoints["metrics"][name])  # type: ignore[index]
        assert "process_cpu_seconds_total" in text and "process_resident_memory_bytes" in text
        assert "process_open_fds" in text
        build = [line for line in text.splitlines() if line.startswith("igw_build_info{")]
        assert len(build) == 1 and build[0].endswith(" 1.0"), build
        assert f'service="{name}"' in build[0] and 'version="' in build[0] and 'commit="' in build[0]
        assert 'commit=""' not in build[0]


def test_an_agents_traceparent_joins_the_gateways_trace_with_rpc_and_genai_attributes(
    traced: tuple[Gateway, Path],
) -> None:
    gw, path = traced
    trace_id = secrets.token_hex(16)
    parent = secrets.token_hex(8)
    md = [("traceparent", f"00-{trace_id}-{parent}-01")]
    with _client(gw) as client:
        answer = client.generate("fast", PROMPT, max_output_tokens=16, metadata=md)
        assert answer.request_id
        with pytest.raises(IgwError):
            other = f"00-{secrets.token_hex(16)}-{parent}-01"
            client.generate("no-such-alias", PROMPT, metadata=[("traceparent", other)])

    deadline = time.monotonic() + 15
    while True:
        spans = _spans(path) if path.exists() else []
        mine = [s for s in spans if s["trace_id"] == trace_id]
        if {s["service"] for s in mine} >= {"igw-router", "igw-ledger", "igw-keyvault"}:
            break
        assert time.monotonic() < deadline, f"trace {trace_id} incomplete: {[s['name'] for s in mine]}"
        time.sleep(0.2)
    root = next(s for s in mine if s["name"] == "igw.router.v1.RouterService/Generate")
    assert root["parent_span_id"] == parent  # the agent's span is the parent
    attrs = root["attributes"]
    assert attrs["rpc.grpc.status_code"] == 0
    assert attrs["gen_ai.request.max_tokens"] == 16
    assert list(attrs["gen_ai.response.finish_reasons"]) in (["stop"], ["length"])
    attempt = next(s for s in mine if s["name"].startswith("chat "))
    assert attempt["attributes"]["server.address"] == "127.0.0.1"
    assert isinstance(attempt["attributes"]["server.port"], int)
    for s in mine:
        if s["kind"] in ("SERVER", "CLIENT") and s["name"].startswith("igw."):
            assert s["attributes"]["rpc.grpc.status_code"] == 0, s
    # A refused call: its server span says NOT_FOUND (5).
    refused = [s for s in spans if s["name"] == "igw.router.v1.RouterService/Generate"
               and s["attributes"].get("rpc.grpc.status_code") == 5]
    assert refused

    # JSON log lines of that call carry its trace id and a span id.
    router_lines = [json.loads(line) for line in gw.log("router").splitlines() if line.startswith("{")]
    traced_lines = [line for line in router_lines if line.get("trace_id") == trace_id]
    assert traced_lines and all(len(line["span_id"]) == 16 for line in traced_lines)
    # Never the prompt or a provider key, anywhere: spans (with the new attributes) and logs.
    demo_keys = json.loads((gw.state_dir / "demo-secrets.json").read_text()).values()
    for text in (path.read_text(), gw.all_logs()):
        assert PROMPT not in text
        for key in demo_keys:
            assert key not in text
